"""Expert output scales for `expert_weighting="probs"`: the weighting llama.cpp's MoE architectures implement.

With "probs", a selected expert's output is multiplied by its router probability p_e (softmax over all experts, no
renormalisation), so a freshly carved model would shrink every routed output to a fraction of what the slice of the
dense FFN computes. Each expert therefore gets one scale c_e, folded into its down_proj (exact: the output is linear in
down_proj), fitted after router calibration by least squares on the calibration tokens:

    min_c  sum_t || R_t - sum_{e selected at t} c_e p_te y_te ||²  +  lam · sum_e A_ee (c_e - c0_e)²

where y_te is expert e's output, R_t = sum_e y_te the full routed output (the dense FFN minus the shared expert), and
c0_e = 1 / (the mean probability expert e has when selected), the scale that restores weight 1 on average; the ridge
keeps rarely selected experts near it. The normal equations are E x E per layer.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tiny_onn.model import select_experts


@torch.no_grad()
def fit_expert_scales(model, ffn_inputs: list[torch.Tensor], lam: float = 1e-2, chunk: int = 2048) -> list[dict]:
    """Fit and fold each routed expert's scale into its down_proj (in place); return per-layer diagnostics."""
    cfg = model.config
    assert cfg.expert_weighting == "probs", "expert scales only make sense with expert_weighting='probs'"
    report = []
    for i, x_TD in enumerate(tqdm(ffn_inputs, desc="fit expert scales", unit="layer", leave=False)):
        block = model.model.layers[i].mlp
        experts = block.experts
        E = experts.num_experts
        A_EE = torch.zeros(E, E, dtype=torch.float64)
        b_E = torch.zeros(E, dtype=torch.float64)
        w_sum_E = torch.zeros(E, dtype=torch.float64)  # sum of p over the tokens that select e
        n_sel_E = torch.zeros(E, dtype=torch.float64)
        target_sq = 0.0
        for start in range(0, x_TD.shape[0], chunk):
            x = x_TD[start : start + chunk].to(experts.down_proj.device, experts.down_proj.dtype)
            y_ETD = torch.stack([experts.expert_forward(e, x).float() for e in range(E)])
            R_TD = y_ETD.sum(0)
            _, p_TE = block.router(x)
            sel_TE = select_experts(p_TE, cfg.num_experts_per_tok, cfg.router_top_p, cfg.min_experts_per_tok,
                                    cfg.max_experts_per_tok)
            w_TE = p_TE.float() * sel_TE  # the weight llama.cpp (and "probs") gives each expert
            z_EX = (w_TE.T[:, :, None] * y_ETD).reshape(E, -1)  # prediction = sum_e c_e z_e, flattened over (t, d)
            A_EE += (z_EX @ z_EX.T).double().cpu()
            b_E += (z_EX @ R_TD.reshape(-1)).double().cpu()
            w_sum_E += w_TE.sum(0).double().cpu()
            n_sel_E += sel_TE.sum(0).double().cpu()
            target_sq += R_TD.double().pow(2).sum().item()
        c0_E = torch.where(w_sum_E > 0, n_sel_E / w_sum_E.clamp_min(1e-12), torch.ones_like(w_sum_E))
        reg_E = lam * A_EE.diagonal().clamp_min(A_EE.diagonal().mean() * 1e-3)
        c_E = torch.linalg.solve(A_EE + torch.diag(reg_E), b_E + reg_E * c0_E)
        experts.down_proj.mul_(c_E.to(experts.down_proj.dtype)[:, None, None])

        def rel_err(c: torch.Tensor) -> float:  # ||R - sum c z||² / ||R||² from the normal-equation terms
            return float((target_sq - 2 * c @ b_E + c @ A_EE @ c) / max(target_sq, 1e-30))

        report.append({"layer": i, "scale_mean": round(c_E.mean().item(), 4), "scale_min": round(c_E.min().item(), 4),
                       "scale_max": round(c_E.max().item(), 4), "rel_err_unscaled": round(rel_err(c0_E * 0 + 1), 4),
                       "rel_err_mean_restoring": round(rel_err(c0_E), 4), "rel_err_fitted": round(rel_err(c_E), 4)})
    return report
