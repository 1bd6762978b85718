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


def oracle_distribution_logits(gains_NE: torch.Tensor) -> torch.Tensor:
    """The calibration's target logits from expert gains [N, E]: centred per token, divided by their standard deviation
    (softmax of these is the distribution the carve fits routers to)."""
    g = gains_NE.float() - gains_NE.float().mean(-1, keepdim=True)
    return g / g.std().clamp_min(1e-12)


def router_distill_kl(logp_NE: torch.Tensor, gains_NE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(softmax(oracle logits of the teacher's gains) ‖ router), both [N, E]."""
    if logp_NE.shape[0] == 0:
        return logp_NE.sum() * 0.0
    target = oracle_distribution_logits(gains_NE).log_softmax(-1)
    return F.kl_div(logp_NE, target, log_target=True, reduction="batchmean")


def specificity_loss(probs_NE: torch.Tensor, category_N: torch.Tensor, num_categories: int) -> torch.Tensor:
    """How unspecific the experts are, in [0, 1]: Σ_e u_e·H_e / log C. For expert e, m_ce is its mean routing probability
    on the tokens of category c (so categories count alike whatever their token counts), H_e the entropy of m_·e
    normalised over c, u_e = Σ_c m_ce / Σ_c,e' m_ce' its share of the routing mass; C the categories present.
    Zero when every expert with routing mass is chosen by one category only, positive otherwise; tokens with category
    < 0 (padding, replay) are left out."""
    keep = category_N >= 0
    p_NE, cat_N = probs_NE[keep].float(), category_N[keep]
    onehot_NC = F.one_hot(cat_N, num_categories).float()
    count_C = onehot_NC.sum(0)
    present = count_C > 0
    if int(present.sum()) < 2:
        return probs_NE.sum() * 0.0
    m_CE = (onehot_NC.T @ p_NE)[present] / count_C[present, None]  # mean routing probability per category
    mass_E = m_CE.sum(0)
    q_CE = m_CE / mass_E.clamp_min(1e-12)
    entropy_E = -(q_CE * q_CE.clamp_min(1e-12).log()).sum(0) / math.log(int(present.sum()))
    return (mass_E / mass_E.sum().clamp_min(1e-12) * entropy_E).sum()


def pi_schedule(pi: float, act_k: int, lr_floor: float) -> tuple[float, int]:
    """The PI-driven schedule: (learning-rate scale, experts to update) = (floor + (1 − floor)·(1 − PI),
    max(1, round(act_k·(1 − PI)))), act_k the experts that computed in the layer this step. A model that predicts well
    (PI → 1) takes small steps on few experts; a surprised one (PI → 0) full steps on every expert that computed."""
    return lr_floor + (1.0 - lr_floor) * (1.0 - pi), max(1, round(act_k * (1.0 - pi)))


def hidden_distill_sum(student_LBTD: list[torch.Tensor], teacher_LBTD: list[torch.Tensor],
                       labels_BT: torch.Tensor) -> torch.Tensor:
    """Hidden-state distillation, summed over the positions KD scores (those that predict a response token): for each,
    the mean over layers of ‖h_student − h_teacher‖² / ‖h_teacher‖², h a decoder layer's output [B, T, D]. Relative
    per token, so the few tokens with very large hidden states do not outweigh the others."""
    if len(student_LBTD) != len(teacher_LBTD) or not student_LBTD:
        raise ValueError(f"hidden distillation needs one teacher state per student layer, got {len(student_LBTD)} "
                         f"student and {len(teacher_LBTD)} teacher layers")
    _, scored = scored_positions(labels_BT)  # [B, T-1]
    total = torch.zeros((), device=student_LBTD[0].device)
    for s_BTD, t_BTD in zip(student_LBTD, teacher_LBTD, strict=True):
        s_ND, t_ND = s_BTD[:, :-1][scored].float(), t_BTD[:, :-1][scored].float()  # [scored tokens, D]
        total = total + ((s_ND - t_ND).pow(2).sum(-1) / t_ND.pow(2).sum(-1).clamp_min(1e-12)).sum()
    return total / len(student_LBTD)
