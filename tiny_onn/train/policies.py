"""Expert update policies, applied per MoE layer after backward and before the optimizer step (design.md "Training").

- full: every expert with a gradient updates.
- smk (Surprise Min-K): only the min_k experts with the lowest gradient norm update (optionally only among experts that
  received tokens).
- smk2 (ΔSC Max-K): ΔSC_e = z(act_e) − z(grad_e), act_e the mean norm of the expert's routed outputs, grad_e its
  parameter-gradient norm; only the max_k highest update.
"""

from __future__ import annotations

import torch

from tiny_onn.scan import zscore

POLICIES = ("full", "smk", "smk2")


def expert_grad_norms(experts) -> torch.Tensor:
    """[E] gradient norm of each expert's (gate_up, down) slices."""
    g1 = experts.gate_up_proj.grad
    g2 = experts.down_proj.grad
    if g1 is None or g2 is None:
        return torch.zeros(experts.num_experts, device=experts.gate_up_proj.device)
    return (g1.float().pow(2).sum(dim=(1, 2)) + g2.float().pow(2).sum(dim=(1, 2))).sqrt()


def update_mask(
    policy: str, grad_E: torch.Tensor, act_E: torch.Tensor, routed_E: torch.Tensor, k: int, only_routed: bool = True
) -> torch.Tensor:
    """Boolean [E]: which experts of one layer update this step."""
    has_grad = grad_E > 0
    if policy == "full":
        return has_grad
    candidates = has_grad & routed_E if only_routed else has_grad
    if not candidates.any():
        return candidates
    k = min(k, int(candidates.sum()))
    if policy == "smk":
        score = torch.where(candidates, -grad_E, torch.full_like(grad_E, -float("inf")))
    elif policy == "smk2":
        dsc = zscore(act_E.float()) - zscore(grad_E.float())
        score = torch.where(candidates, dsc, torch.full_like(dsc, -float("inf")))
    else:
        raise ValueError(policy)
    mask = torch.zeros_like(candidates)
    mask[score.topk(k).indices] = True
    return mask
