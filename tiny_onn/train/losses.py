"""Training losses, each returned separately so they can be logged: response CE, load balance, router z-loss, KD, and PI."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tiny_onn.data import scored_positions


def response_ce_sum(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token CE over response tokens, mean predictive entropy over them); both 0-d."""
    targets, scored = scored_positions(labels_BT)
    logits_SV = logits_BTV[:, :-1][scored].float()
    ce = F.cross_entropy(logits_SV, targets[scored], reduction="sum")
    with torch.no_grad():
        logp = logits_SV.log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1).mean() if logits_SV.shape[0] else torch.zeros(())
    return ce, entropy


def kd_sum(student_BTV: torch.Tensor, teacher_BTV: torch.Tensor, labels_BT: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(teacher ‖ student) summed over response positions (the teacher's temperature-softened distribution)."""
    _, scored = scored_positions(labels_BT)
    s = (student_BTV[:, :-1][scored].float() / temperature).log_softmax(-1)
    t = (teacher_BTV[:, :-1][scored].float() / temperature).log_softmax(-1)
    return temperature**2 * F.kl_div(s, t, log_target=True, reduction="sum")


def performance_index(ce: float, entropy: float, grad_norm: float, alpha: float, gamma: float) -> float:
    """PI = exp(−α·((1−γ)·ε/τ + γ·S)), ε the CE loss, τ the mean predictive entropy, S the global gradient norm."""
    tau = max(entropy, 1e-6)
    return math.exp(-alpha * ((1 - gamma) * ce / tau + gamma * grad_norm))
