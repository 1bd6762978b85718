"""Router calibration's fast pieces equal the direct computations they replace: expert and group gains from the experts'
actual outputs, and the chunked Adam refinement from torch.optim.Adam on the autograd loss."""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import tiny_moe
from tiny_onn.carve.calibrate import _token_chunk, expert_and_group_gains, refine_kl


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


@pytest.mark.parametrize("groups", [1, 2])
def test_refinement_takes_torch_adam_steps(groups):
    gen = torch.Generator().manual_seed(1)
    T = 3 * _token_chunk(torch.zeros(1, 16)) + 17  # several chunks, the last one partial
    x = torch.randn(T, 16, generator=gen)
    w0 = torch.randn(6, 16, generator=gen, dtype=torch.float64) * 0.1
    target = torch.randn(T, 6, generator=gen) * 2
    got = refine_kl(x, w0, target, groups, steps=25, lr=1e-2)

    w = w0.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-2)
    p = target.view(T, groups, -1).softmax(-1)
    for _ in range(25):
        loss = -(p * (x @ w.T).view(T, groups, -1).log_softmax(-1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert got.dtype == w0.dtype
    assert (got - w0).abs().max() > 0.05  # it moved
    torch.testing.assert_close(got, w.detach().double(), atol=1e-6, rtol=1e-5)
