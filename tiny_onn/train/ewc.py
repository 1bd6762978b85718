"""Elastic weight consolidation (EWC) on the expert weights, for perpetual training.

Penalty (λ/2)·Σ_i F̂_i·(θ_i − θ*_i)² over the FFN expert weights (routed and shared experts; a dense model's FFNs),
θ* the weights when training starts and F̂ a diagonal Fisher estimate normalised to mean 1 over those weights, so λ
means the same whatever the model's gradient scale. The estimate is the *empirical* Fisher: the squared gradient of
each earlier-data sequence's mean response CE, averaged over sequences (one backward per sequence), at θ*. The scan's
per-neuron statistics are not used: they hold mean |∂L/∂h| per neuron (a first moment of activation gradients), not
the second moment of each weight's gradient.
"""

from __future__ import annotations

import torch

from tiny_onn.data import PackedData
from tiny_onn.train.losses import response_ce_sum


def expert_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The trainable FFN expert weights EWC guards: every `.mlp.` parameter except the routers'."""
    return {n: p for n, p in model.named_parameters() if ".mlp." in n and ".mlp.router." not in n and p.requires_grad}


def empirical_fisher(model, data: PackedData, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Mean over the sequences of `data` of the squared gradient of each sequence's mean response CE (float32)."""
    device = next(model.parameters()).device
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    used = 0
    for seq in data.batches(1):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=seq["input_ids"].to(device), attention_mask=seq["attention_mask"].to(device), use_cache=False)
        ce, _ = response_ce_sum(out.logits, seq["labels"].to(device))
        scored = int((seq["labels"][:, 1:] >= 0).sum())
        if scored == 0:
            continue
        (ce / scored).backward()
        used += 1
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().float().square()
    model.zero_grad(set_to_none=True)
    return {n: f / max(used, 1) for n, f in fisher.items()}


class EWC:
    """The anchor θ*, the normalised Fisher F̂ and the strength λ; `penalty()` is differentiable in the weights."""

    def __init__(self, params: dict[str, torch.nn.Parameter], anchor: dict[str, torch.Tensor],
                 fisher: dict[str, torch.Tensor], strength: float):
        self.params, self.anchor, self.fisher, self.strength = params, anchor, fisher, strength

    @classmethod
    def estimate(cls, model, data: PackedData, strength: float) -> EWC:
        """Anchor at the current weights; Fisher from `data` (earlier data), normalised to mean 1."""
        params = expert_parameters(model)
        fisher = empirical_fisher(model, data, params)
        total = sum(float(f.sum()) for f in fisher.values())
        count = sum(f.numel() for f in fisher.values())
        scale = count / total if total > 0 else 1.0
        anchor = {n: p.detach().float().clone() for n, p in params.items()}
        return cls(params, anchor, {n: f * scale for n, f in fisher.items()}, strength)

    def penalty(self) -> torch.Tensor:
        """(λ/2)·Σ F̂·(θ − θ*)² (0-d)."""
        total = sum((self.fisher[n] * (p.float() - self.anchor[n]).square()).sum() for n, p in self.params.items())
        return 0.5 * self.strength * total

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must keep (the anchor cannot be recomputed once the weights moved)."""
        return {**{f"anchor.{n}": t for n, t in self.anchor.items()}, **{f"fisher.{n}": t for n, t in self.fisher.items()}}

    @classmethod
    def from_state(cls, model, tensors: dict[str, torch.Tensor], strength: float) -> EWC:
        params = expert_parameters(model)
        device = next(iter(params.values())).device
        return cls(params, {n: tensors[f"anchor.{n}"].to(device) for n in params},
                   {n: tensors[f"fisher.{n}"].to(device) for n in params}, strength)
