"""MaskedAdamW in bf16: float32 master weights and moments, masked slices frozen, state kept through a checkpoint;
gradient clipping over what updates."""

from __future__ import annotations

import io

import torch

from tiny_onn.train import MaskedAdamW


def _pair(values: torch.Tensor) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """The same weights (exactly representable in bf16) as a float32 reference and as a bf16 parameter."""
    values = values.to(torch.bfloat16)
    return torch.nn.Parameter(values.float()), torch.nn.Parameter(values.clone())


def _grads(steps: int, shape) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # exactly representable in bf16, so both runs see the same gradients
    return [(1e-3 * (torch.rand(shape, generator=g) + 0.5)).to(torch.bfloat16).float() for _ in range(steps)]


def test_bf16_small_updates_accumulate_like_fp32():
    # lr 1e-4 on weights near 1: every single update is far below half a bf16 step (2^-8 ≈ 0.004)
    w32, w16 = _pair(torch.ones(4, 8))
    opt32 = MaskedAdamW([w32], lr=1e-4, weight_decay=0.01)
    opt16 = MaskedAdamW([w16], lr=1e-4, weight_decay=0.01)
    for grad in _grads(200, w32.shape):
        w32.grad, w16.grad = grad.clone(), grad.to(torch.bfloat16)
        opt32.step()
        opt16.step()
    # the fp32 run moved by ~0.02 in total, several bf16 steps
    assert (1 - w32.detach()).min() > 0.015
    assert w16.dtype == torch.bfloat16
    # the bf16 weight is the fp32 trajectory rounded to bf16 (before the fix it stayed at exactly 1.0)
    torch.testing.assert_close(w16.detach().float(), w32.detach().to(torch.bfloat16).float(), rtol=0, atol=2**-7)
    assert not torch.equal(w16.detach(), torch.ones_like(w16))
    # float32 state, equal to the reference's: the second moment decays (bf16 would round v·0.999 back to v)
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt16.state[w16][key].dtype == torch.float32
        torch.testing.assert_close(opt16.state[w16][key], opt32.state[w32][key], rtol=1e-5, atol=0)
    torch.testing.assert_close(opt16.state[w16]["master"], w32.detach(), rtol=1e-6, atol=0)


def test_bf16_masked_slices_do_not_move():
    w32, w16 = _pair(torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1)))
    opt32 = MaskedAdamW([w32], lr=1e-3, weight_decay=0.1)
    opt16 = MaskedAdamW([w16], lr=1e-3, weight_decay=0.1)
    grads = _grads(12, w32.shape)
    for grad in grads[:4]:  # momentum everywhere first
        w32.grad, w16.grad = grad.clone(), grad.to(torch.bfloat16)
        opt32.step()
        opt16.step()
    mask = torch.tensor([True, False, True, False, False])
    before = {"w": w16.detach().clone(), **{k: v.clone() for k, v in opt16.state[w16].items()}}
    for grad in grads[4:]:
        w32.grad, w16.grad = grad.clone(), grad.to(torch.bfloat16)
        for opt, w in ((opt32, w32), (opt16, w16)):
            opt.set_update_mask(w, mask)
            opt.step()
    after = {"w": w16.detach(), **opt16.state[w16]}
    for key, old in before.items():
        assert torch.equal(after[key][~mask], old[~mask]), f"masked slice moved: {key}"
        assert not torch.equal(after[key][mask], old[mask]), f"updated slice did not change: {key}"
    # the slices that did update follow the fp32 reference
    torch.testing.assert_close(opt16.state[w16]["master"], w32.detach(), rtol=1e-5, atol=1e-6)


def test_bf16_state_survives_a_checkpoint():
    _, w = _pair(torch.ones(3, 2))
    opt = MaskedAdamW([w], lr=1e-4)
    w.grad = torch.full_like(w, 1e-3)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    restored = MaskedAdamW([w], lr=1e-4)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for key in ("exp_avg", "exp_avg_sq", "master"):
        assert restored.state[w][key].dtype == torch.float32
        assert torch.equal(restored.state[w][key], opt.state[w][key])


def test_clip_counts_only_what_updates():
    experts = torch.nn.Parameter(torch.zeros(4, 2, 3))
    other = torch.nn.Parameter(torch.zeros(5))
    opt = MaskedAdamW([experts, other], lr=1e-3)
    g = torch.Generator().manual_seed(2)
    experts.grad = torch.randn(4, 2, 3, generator=g)
    experts.grad[1] *= 100  # a masked expert with a huge gradient
    other.grad = torch.randn(5, generator=g)
    raw = experts.grad.clone(), other.grad.clone()
    mask = torch.tensor([True, False, True, False])
    opt.set_update_mask(experts, mask)
    expected = (raw[0][mask].pow(2).sum() + raw[1].pow(2).sum()).sqrt()
    norm = opt.clip_grad_norm_(0.5)
    assert abs(norm - float(expected)) < 1e-5
    clipped = (experts.grad[mask].pow(2).sum() + other.grad.pow(2).sum()).sqrt()
    assert abs(float(clipped) - 0.5) < 1e-5  # what updates has exactly the clip norm
    torch.testing.assert_close(other.grad, raw[1] * 0.5 / expected)
    # measuring only (inf) leaves the gradients alone
    before = other.grad.clone()
    opt.clip_grad_norm_(float("inf"))
    assert torch.equal(other.grad, before)
