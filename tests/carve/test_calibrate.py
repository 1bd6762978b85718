"""Router calibration's fast pieces against the direct computations they replace: expert and group gains from the experts'
actual outputs, the chunked loss and gradient from autograd, the chunked Adam refinement from torch.optim.Adam, and the
L-BFGS refinement against many Adam steps."""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import tiny_moe
from tiny_onn.carve import CarveConfig
from tiny_onn.carve.calibrate import _token_chunk, expert_and_group_gains, kl_loss_and_grad, refine_kl
from tiny_onn.errors import TinyOnnError


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gains_equal_those_of_the_expert_outputs(groups):
    model = tiny_moe(num_experts=8, router_type="hierarchical" if groups > 1 else "flat", num_expert_groups=groups)
    experts = model.model.layers[1].mlp.experts
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(0))
    gains_TE, gains_TG = expert_and_group_gains(model.model.layers[1].mlp, x, groups, chunk=128)
    with torch.no_grad():
        y_ETD = torch.stack([experts.expert_forward(e, x) for e in range(8)])
        R = y_ETD.sum(0)
        want_TE = (2 * (y_ETD * R).sum(-1) - y_ETD.pow(2).sum(-1)).T
        y_GTD = y_ETD.view(groups, 8 // groups, 300, 32).sum(1)
        want_TG = (2 * (y_GTD * R).sum(-1) - y_GTD.pow(2).sum(-1)).T
    scale = want_TE.abs().max()
    torch.testing.assert_close(gains_TE, want_TE, atol=1e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(gains_TG, want_TG, atol=1e-5 * scale, rtol=1e-4)


def _problem(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    T = 3 * _token_chunk(torch.zeros(1, 16)) + 17  # several chunks, the last one partial
    x = torch.randn(T, 16, generator=gen)
    w0 = torch.randn(6, 16, generator=gen, dtype=torch.float64) * 0.1
    w_true = torch.randn(6, 16, generator=gen)  # targets a linear router can approach, plus noise
    target = x @ w_true.T + torch.randn(T, 6, generator=gen)
    return x, w0, target


def _autograd_loss(x, w, target, groups):
    T = x.shape[0]
    p = target.view(T, groups, -1).softmax(-1)
    return -(p * (x @ w.T).view(T, groups, -1).log_softmax(-1)).sum(-1).mean()


@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_loss_and_gradient_equal_autograd(groups):
    x, w0, target = _problem()
    x, target = x.double(), target.double()  # float64: chunked and whole sums agree to rounding
    w = w0.clone().requires_grad_(True)
    want = _autograd_loss(x, w, target, groups)
    want.backward()
    T = x.shape[0]
    p_ET = target.view(T, groups, -1).softmax(-1).view(T, -1).T.contiguous()
    loss, grad = kl_loss_and_grad(x, w.detach(), p_ET, groups)
    torch.testing.assert_close(loss, want.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad, w.grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("groups", [1, 2])
def test_adam_refinement_takes_torch_adam_steps(groups):
    x, w0, target = _problem()
    got = refine_kl(x, w0, target, groups, steps=25, optimizer="adam", lr=1e-2)
    w = w0.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-2)
    for _ in range(25):
        loss = _autograd_loss(x, w, target, groups)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert got.dtype == w0.dtype
    assert (got - w0).abs().max() > 0.05  # it moved
    torch.testing.assert_close(got, w.detach().double(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_lbfgs_refinement_reaches_the_minimum_adam_approaches(groups):
    """20 L-BFGS iterations end at a stationary point (the loss is convex in W, so at its minimum), no higher than 500
    Adam steps (the earlier refinement) and clearly below 20 Adam steps."""
    x, w0, target = _problem()
    got = refine_kl(x, w0, target, groups, steps=20, optimizer="lbfgs")
    assert got.dtype == w0.dtype
    w_got = got.float().requires_grad_(True)
    lbfgs_loss = _autograd_loss(x, w_got, target, groups)
    lbfgs_loss.backward()
    assert w_got.grad.abs().max() < 1e-5
    adam_500 = _autograd_loss(x, refine_kl(x, w0, target, groups, steps=500, optimizer="adam").float(), target, groups)
    adam_20 = _autograd_loss(x, refine_kl(x, w0, target, groups, steps=20, optimizer="adam").float(), target, groups)
    assert lbfgs_loss <= adam_500 + 1e-6 and adam_500 < adam_20 - 0.1


def test_unknown_refinement_is_refused():
    x, w0, target = _problem()
    with pytest.raises(ValueError, match="lbfgs, adam"):
        refine_kl(x, w0, target, steps=2, optimizer="sgd")
    with pytest.raises(TinyOnnError, match="calib_refine must be one of lbfgs, adam"):
        CarveConfig(calib_refine="newton")
