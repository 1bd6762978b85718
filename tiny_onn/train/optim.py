"""AdamW whose expert tensors update slice by slice: a masked expert does not move at all.

Zeroing a masked expert's gradient is not enough with AdamW: its momentum would still move it and weight decay would
shrink it. Here every parameter registered with `expert_dims` keeps its Adam state per slice along dim 0 (one slice per
expert), including the step count used for bias correction, and only the slices in the current update mask are touched.
Other parameters update as in torch's AdamW.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class MaskedAdamW(Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.update_masks: dict[torch.nn.Parameter, torch.Tensor] = {}

    def set_update_mask(self, param: torch.nn.Parameter, mask_E: torch.Tensor) -> None:
        """For the next step only, update just the slices param[e] with mask_E[e] True."""
        self.update_masks[param] = mask_E

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                mask = self.update_masks.get(p)
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    # one step count per slice along dim 0, so a slice's bias correction counts only its own updates
                    state["step"] = torch.zeros(p.shape[0] if p.dim() else 1, dtype=torch.float32)
                if mask is None:
                    rows = None
                else:
                    rows = mask.nonzero().squeeze(-1).cpu()
                    if rows.numel() == 0:
                        continue
                self._update(p, state, rows, group, beta1, beta2)
        self.update_masks = {}
        return loss

    @staticmethod
    def _update(p, state, rows, group, beta1, beta2) -> None:
        shape = (-1, *([1] * (p.dim() - 1))) if p.dim() else (-1,)
        if rows is None:
            param, grad, m, v = p, p.grad, state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            step = state["step"].to(p.device).view(shape)
            if not p.dim():
                step = step[0]
        else:
            param, grad = p[rows], p.grad[rows]
            m, v = state["exp_avg"][rows], state["exp_avg_sq"][rows]
            state["step"][rows] += 1
            step = state["step"][rows].to(p.device).view(shape)
        param.mul_(1 - group["lr"] * group["weight_decay"])
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1**step
        bias2 = 1 - beta2**step
        denom = (v / bias2).sqrt().add_(group["eps"])
        param.addcdiv_(m / bias1, denom, value=-group["lr"])
        if rows is not None:  # fancy indexing copied: write the updated slices back
            p[rows] = param
            state["exp_avg"][rows] = m
            state["exp_avg_sq"][rows] = v
