"""AdamW whose expert tensors update slice by slice: a masked expert does not move at all.

Zeroing a masked expert's gradient is not enough with AdamW: its momentum would still move it and weight decay would
shrink it. Here every parameter with an update mask keeps its Adam state per slice along dim 0 (one slice per expert),
including the step count used for bias correction, and only the slices in the current update mask are touched.
Other parameters update as in torch's AdamW.

Mixed precision: the optimizer state is always float32. A parameter stored in a lower precision (bf16 on CUDA) gets a
float32 master copy (`state["master"]`); updates are computed and accumulated on the master and the parameter is the
master rounded to its dtype. Without it an update smaller than half a bf16 step (2⁻⁸ relative) is lost every time, and
`exp_avg_sq * 0.999` rounds back to itself, so the second moment never decays.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class MaskedAdamW(Optimizer):
    """AdamW with per-expert update masks, float32 moments and float32 master weights for low-precision parameters."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.update_masks: dict[torch.nn.Parameter, torch.Tensor] = {}

    def set_update_mask(self, param: torch.nn.Parameter, mask_E: torch.Tensor) -> None:
        """For the next step only, update just the slices param[e] with mask_E[e] True."""
        self.update_masks[param] = mask_E

    def _updating_rows(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """Indices of the slices of `p` the next step updates; None = the whole parameter."""
        mask = self.update_masks.get(p)
        return None if mask is None else mask.nonzero().squeeze(-1).to(p.device)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale the gradients so that the norm over what the next step updates is at most `max_norm` (inf = measure only).

        Call after the update masks are set: a masked expert's gradient neither counts in the norm nor shrinks the step of
        the experts that do update. Returns the norm before clipping (as torch's clip_grad_norm_).
        """
        squares = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows = self._updating_rows(p)
                grad = p.grad if rows is None else p.grad[rows]
                squares.append(grad.float().pow(2).sum())
        if not squares:
            return 0.0
        total = torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()
        if max_norm != float("inf"):
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
        return float(total)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                rows = self._updating_rows(p)
                if rows is not None and rows.numel() == 0:
                    continue
                self._update(p, state, rows, group, beta1, beta2)
        self.update_masks = {}
        return loss

    @staticmethod
    def _init_state(p: torch.nn.Parameter, state: dict) -> None:
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        # one step count per slice along dim 0, so a slice's bias correction counts only its own updates
        state["step"] = torch.zeros(p.shape[0] if p.dim() else 1, dtype=torch.float32)
        if p.dtype != torch.float32:
            state["master"] = p.detach().float()

    @staticmethod
    def _update(p, state, rows, group, beta1, beta2) -> None:
        """One AdamW step on `p` (rows None) or on the slices p[rows], computed in float32."""
        master = state.get("master", p)  # float32: the parameter itself, or its master copy
        shape = (-1, *([1] * (p.dim() - 1))) if p.dim() else (-1,)
        if rows is None:
            param, grad, m, v = master, p.grad.float(), state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            step = state["step"].to(p.device).view(shape)
            if not p.dim():
                step = step[0]
        else:
            param, grad = master[rows], p.grad[rows].float()
            m, v = state["exp_avg"][rows], state["exp_avg_sq"][rows]
            cpu_rows = rows.cpu()
            state["step"][cpu_rows] += 1
            step = state["step"][cpu_rows].to(p.device).view(shape)
        param.mul_(1 - group["lr"] * group["weight_decay"])
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1**step
        bias2 = 1 - beta2**step
        denom = (v / bias2).sqrt().add_(group["eps"])
        param.addcdiv_(m / bias1, denom, value=-group["lr"])
        if rows is not None:  # fancy indexing copied: write the updated slices back
            master[rows] = param
            state["exp_avg"][rows] = m
            state["exp_avg_sq"][rows] = v
        if master is not p:  # the low-precision parameter follows its master (only the slices that moved)
            if rows is None:
                p.copy_(master)
            else:
                p[rows] = master[rows].to(p.dtype)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the float32 moments and master weights stay float32 (torch casts state to the parameter dtype)."""
        super().load_state_dict(state_dict)
        saved_groups = state_dict["param_groups"]
        params = {pid: p for saved, group in zip(saved_groups, self.param_groups, strict=True)
                  for pid, p in zip(saved["params"], group["params"], strict=True)}
        for pid, saved_state in state_dict["state"].items():
            p = params[pid]
            for key, value in saved_state.items():
                if key != "step" and torch.is_tensor(value):
                    self.state[p][key] = value.to(p.device, torch.float32)
