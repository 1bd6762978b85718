"""Router calibration: fit each router, experts frozen, to rank experts by how much of the FFN output they carry.

For calibration tokens x (the FFN inputs of the *dense* source) and every routed expert e with output y_e(x), the target
is the gain of using e alone, g_e = ||R||² - ||R - y_e||² = 2<R, y_e> - ||y_e||², where R = sum_e y_e is the full routed
output (the FFN minus the shared expert). Router logits are fitted to the per-token-centred gains by ridge regression
(closed form), a single temperature is fitted so that softmax(logits) matches softmax(gains), and a few Adam steps
on that KL refine the ranking. Hierarchical routers
fit the main router on group gains and the sub-routers on expert gains.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from tiny_onn.data import PackedData
from tiny_onn.sources import swiglu_mlps


@torch.no_grad()
def collect_ffn_inputs(source: PreTrainedModel, data: PackedData, batch_size: int = 8) -> list[torch.Tensor]:
    """The dense source's FFN inputs (post-attention-norm hidden states) at every non-padding token: [T, D] per layer."""
    device = next(source.parameters()).device
    inputs: list[list[torch.Tensor]] = [[] for _ in swiglu_mlps(source)]
    keep: list[torch.Tensor] = []

    def hook(layer: int):
        def pre_hook(module, args):
            x = args[0]
            inputs[layer].append(x.reshape(-1, x.shape[-1])[keep[0]].float().cpu())

        return pre_hook

    handles = [m.module.register_forward_pre_hook(hook(m.layer)) for m in swiglu_mlps(source)]
    try:
        for batch in data.batches(batch_size):
            keep[:] = [batch["attention_mask"].reshape(-1).bool().to(device)]
            source(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(xs) for xs in inputs]


def _centred_scaled(g_TE: torch.Tensor) -> torch.Tensor:
    g = g_TE - g_TE.mean(dim=-1, keepdim=True)  # softmax and top-k ignore per-token offsets
    return g / g.std().clamp_min(1e-12)


def ridge(x_TD: torch.Tensor, y_TE: torch.Tensor, alpha: float) -> torch.Tensor:
    """argmin_W ||x W - y||² + alpha·(tr(xᵀx)/D)·||W||², returned as router weights [E, D]."""
    xtx = x_TD.T @ x_TD
    reg = alpha * xtx.diagonal().mean() * torch.eye(xtx.shape[0], dtype=xtx.dtype)
    return torch.linalg.solve(xtx + reg, x_TD.T @ y_TE).T


def refine_kl(x_TD: torch.Tensor, w_ED: torch.Tensor, target_TE: torch.Tensor, groups: int = 1, steps: int = 200,
              lr: float = 1e-2) -> torch.Tensor:
    """Refine router weights by Adam on KL(softmax(target) || softmax(x W)) within each group (a ranking loss the
    least-squares start does not optimise)."""
    T, E = target_TE.shape
    x = x_TD.float()
    p_tgt = target_TE.float().view(T, groups, E // groups).softmax(-1)
    w = w_ED.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            logq = (x @ w.T).view(T, groups, E // groups).log_softmax(-1)
            loss = -(p_tgt * logq).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach().to(w_ED.dtype)


def fit_temperature(pred_TE: torch.Tensor, target_TE: torch.Tensor, groups: int = 1) -> float:
    """The scale s minimising KL(softmax(target) || softmax(s·pred)) (within each group of experts), by grid search."""
    T, E = pred_TE.shape
    pred, tgt = pred_TE.view(T, groups, E // groups), target_TE.view(T, groups, E // groups)
    p_tgt = tgt.softmax(-1)
    best, best_kl = 1.0, float("inf")
    for s in torch.logspace(-1.5, 1.5, 31).tolist():
        kl = (p_tgt * (p_tgt.clamp_min(1e-12).log() - (s * pred).log_softmax(-1))).sum(-1).mean().item()
        if kl < best_kl:
            best, best_kl = s, kl
    return best


@torch.no_grad()
def expert_and_group_gains(moe_block, x_TD: torch.Tensor, groups: int = 1, chunk: int = 2048):
    """Gains 2<R, y> - ||y||² of every expert [T, E] and of every whole group of experts [T, G] (R = sum of all routed
    experts' outputs), from one pass of the experts over the calibration tokens."""
    experts = moe_block.experts
    E = experts.num_experts
    dtype = experts.gate_up_proj.dtype
    per_expert, per_group = [], []
    for start in range(0, x_TD.shape[0], chunk):
        x = x_TD[start : start + chunk].to(experts.gate_up_proj.device, dtype)
        y_ETD = torch.stack([experts.expert_forward(e, x).float() for e in range(E)])
        R_TD = y_ETD.sum(0)
        per_expert.append((2 * (y_ETD * R_TD).sum(-1) - (y_ETD**2).sum(-1)).T.cpu())  # [t, E]
        y_GTD = y_ETD.view(groups, E // groups, *y_ETD.shape[1:]).sum(1)
        per_group.append((2 * (y_GTD * R_TD).sum(-1) - (y_GTD**2).sum(-1)).T.cpu())  # [t, G]
    return torch.cat(per_expert), torch.cat(per_group)


@torch.no_grad()
def calibrate_routers(
    model: PreTrainedModel, ffn_inputs: list[torch.Tensor], alpha: float = 1e-3, refine_steps: int = 200
) -> list[dict]:
    """Fit every layer's router in place; returns per-layer fit diagnostics (oracle top-k agreement)."""
    report = []
    layers = model.model.layers
    for i, x_TD in enumerate(tqdm(ffn_inputs, desc="calibrate routers", unit="layer", leave=False)):
        block = layers[i].mlp
        router = block.router
        x64 = x_TD.double()
        gains_TE, gains_TG = expert_and_group_gains(block, x_TD, router.num_groups)
        g_TE = _centred_scaled(gains_TE.double())
        E, G = g_TE.shape[1], router.num_groups
        if router.hierarchical:
            per = E // G
            sub_target = g_TE.view(-1, G, per)
            sub_target = (sub_target - sub_target.mean(-1, keepdim=True)).reshape(-1, E)
            w_sub = ridge(x64, sub_target, alpha)
            w_sub = fit_temperature(x64 @ w_sub.T, sub_target, G) * w_sub
            g_TG = _centred_scaled(gains_TG.double())
            w_main = ridge(x64, g_TG, alpha)
            w_main = fit_temperature(x64 @ w_main.T, g_TG) * w_main
            if refine_steps:
                w_sub = refine_kl(x_TD, w_sub, sub_target, G, refine_steps)
                w_main = refine_kl(x_TD, w_main, g_TG, 1, refine_steps)
            router.weight.copy_(w_sub.to(router.weight.dtype))
            router.group_weight.copy_(w_main.to(router.group_weight.dtype))
        else:
            w = ridge(x64, g_TE, alpha)
            w = fit_temperature(x64 @ w.T, g_TE) * w
            if refine_steps:
                w = refine_kl(x_TD, w, g_TE, 1, refine_steps)
            router.weight.copy_(w.to(router.weight.dtype))
        _, probs = router(x_TD.to(router.weight.device, router.weight.dtype))
        k = model.config.num_experts_per_tok
        chosen = probs.topk(k, -1).indices.cpu()
        oracle = g_TE.topk(k, -1).indices
        overlap = (chosen[:, :, None] == oracle[:, None, :]).any(-1).float().mean().item()
        report.append({"layer": i, "top_k_overlap_with_oracle": round(overlap, 4)})
    return report
