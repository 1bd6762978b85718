"""Expert output scales for `expert_weighting="probs"`: the weighting llama.cpp's MoE architectures implement.

With "probs", a selected expert's output is multiplied by its router probability p_e (softmax over all experts, no
renormalisation), so a freshly carved model would shrink every routed output to a fraction of what the slice of the
dense FFN computes, by a factor that changes from token to token. Two exact changes undo most of that, per layer:

- the router logits are multiplied by a temperature factor s > 0. Top-k selection depends only on the ranking, so the
  routing is unchanged, but a small s makes the selected probabilities nearly constant (p_e -> 1/E as s -> 0);
- each expert gets one scale c_e, folded into its down_proj (its output is linear in down_proj).

For each s on a grid, c is fitted by least squares on the calibration tokens,

    min_c  sum_t || R_t - sum_{e selected at t} c_e p_te y_te ||²  +  lam · sum_e A_ee (c_e - c0_e)²,

with y_te expert e's output, R_t = sum_e y_te the full routed output (the dense FFN minus the shared expert), and
c0_e = 1 / (the mean probability of e when selected), which restores weight 1 on average; the ridge keeps rarely selected
experts near it. The s with the smallest error is kept. As s -> 0 the model tends to the straight-through carve (weight 1
on every selected expert), so the fit is never much worse than the default weighting before training.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tiny_onn.model import select_experts

TEMPERATURES = (1.0, 0.5, 0.25, 0.1, 0.05, 0.02)


def _normal_equations(block, x_TD: torch.Tensor, temps: tuple[float, ...], chunk: int) -> list[dict]:
    """Per temperature factor s: A [E, E], b [E], the selected probability mass and counts, ||R||², and the error of
    weight exactly 1 (straight-through), accumulated over the calibration tokens."""
    cfg, experts = block.config, block.experts
    E = experts.num_experts
    acc = [{"A": torch.zeros(E, E, dtype=torch.float64), "b": torch.zeros(E, dtype=torch.float64),
            "w_sum": torch.zeros(E, dtype=torch.float64), "n_sel": torch.zeros(E, dtype=torch.float64)} for _ in temps]
    target_sq = st_err = 0.0
    for start in range(0, x_TD.shape[0], chunk):
        x = x_TD[start : start + chunk].to(experts.down_proj.device, experts.down_proj.dtype)
        y_ETD = torch.stack([experts.expert_forward(e, x).float() for e in range(E)])
        R_TD = y_ETD.sum(0)
        logits_TE = torch.nn.functional.linear(x.float(), block.router.weight.float())
        sel_TE = select_experts(logits_TE.softmax(-1), cfg.num_experts_per_tok)  # the same for every s > 0
        st = (sel_TE.T[:, :, None] * y_ETD).sum(0)  # [T, D] weight-1 sum of the selected experts
        st_err += (R_TD - st).double().pow(2).sum().item()
        target_sq += R_TD.double().pow(2).sum().item()
        for s, a in zip(temps, acc, strict=True):
            w_TE = (s * logits_TE).softmax(-1) * sel_TE  # the weight llama.cpp (and "probs") gives each expert
            z_EX = (w_TE.T[:, :, None] * y_ETD).reshape(E, -1)  # prediction = sum_e c_e z_e, flattened over (t, d)
            a["A"] += (z_EX @ z_EX.T).double().cpu()
            a["b"] += (z_EX @ R_TD.reshape(-1)).double().cpu()
            a["w_sum"] += w_TE.sum(0).double().cpu()
            a["n_sel"] += sel_TE.sum(0).double().cpu()
    for a in acc:
        a["target_sq"], a["st_err"] = target_sq, st_err
    return acc


def _solve(a: dict, lam: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(fitted scales c, mean-restoring scales c0, relative error of c)."""
    A, b, target_sq = a["A"], a["b"], max(a["target_sq"], 1e-30)
    c0 = torch.where(a["w_sum"] > 0, a["n_sel"] / a["w_sum"].clamp_min(1e-12), torch.ones_like(a["w_sum"]))
    reg = lam * A.diagonal().clamp_min(A.diagonal().mean() * 1e-3)
    c = torch.linalg.solve(A + torch.diag(reg), b + reg * c0)
    return c, c0, float((target_sq - 2 * c @ b + c @ A @ c) / target_sq)


@torch.no_grad()
def fit_expert_scales(model, ffn_inputs: list[torch.Tensor], lam: float = 1.0, chunk: int = 2048,
                      temps: tuple[float, ...] = TEMPERATURES) -> list[dict]:
    """Pick each router's temperature factor, fit the expert scales, fold both in (in place); per-layer diagnostics."""
    assert model.config.expert_weighting == "probs", "expert scales only make sense with expert_weighting='probs'"
    assert model.config.router_type == "flat" and not model.config.router_top_p, "fitted for flat top-k routers"
    report = []
    for i, x_TD in enumerate(tqdm(ffn_inputs, desc="fit expert scales", unit="layer", leave=False)):
        block = model.model.layers[i].mlp
        acc = _normal_equations(block, x_TD, temps, chunk)
        fits = [_solve(a, lam) for a in acc]
        best = min(range(len(temps)), key=lambda j: fits[j][2])
        c, c0, err = fits[best]
        block.router.weight.mul_(temps[best])
        block.experts.down_proj.mul_(c.to(block.experts.down_proj.dtype)[:, None, None])
        a = acc[best]
        err_c0 = float((a["target_sq"] - 2 * c0 @ a["b"] + c0 @ a["A"] @ c0) / a["target_sq"])
        report.append({"layer": i, "router_temperature_factor": temps[best], "scale_mean": round(c.mean().item(), 4),
                       "scale_min": round(c.min().item(), 4), "scale_max": round(c.max().item(), 4),
                       "rel_err_straight_through": round(a["st_err"] / a["target_sq"], 4),
                       "rel_err_mean_restoring": round(err_c0, 4), "rel_err_fitted": round(err, 4)})
    return report
