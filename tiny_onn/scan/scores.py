"""Neuron scores from scan statistics (design.md, "Definitions"). All z-scores are taken across the neurons of one layer."""

from __future__ import annotations

import torch

_EPS = 1e-12


def zscore(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std across the last dimension; a constant vector maps to zeros."""
    x = x.double()
    std = x.std(dim=-1, keepdim=True, unbiased=False)
    return ((x - x.mean(dim=-1, keepdim=True)) / std.clamp_min(_EPS)).float()


def delta_sc(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """ΔSC = z(activation) − z(surprise): high activation with low gradient is high synergy."""
    return zscore(act) - zscore(grad)


def s_p(act: torch.Tensor, grad: torch.Tensor, freq: torch.Tensor, weights: tuple[float, float, float]) -> torch.Tensor:
    """S_p = w1·z(a) + w2·z(1/s) + w3·z(f), the seed's selection score."""
    w_act, w_inv_grad, w_freq = weights
    inv_grad = 1.0 / grad.double().clamp_min(_EPS)
    return w_act * zscore(act) + w_inv_grad * zscore(inv_grad) + w_freq * zscore(freq)
