"""Router calibration: fit each router, experts frozen, to rank experts by how much of the FFN output they carry.

For calibration tokens x (the FFN inputs of the *dense* source) and every routed expert e with output y_e(x), the target
is the gain of using e alone, g_e = ||R||² - ||R - y_e||² = 2<R, y_e> - ||y_e||², where R = sum_e y_e is the full routed
output (the FFN minus the shared expert). Router logits are fitted to the per-token-centred gains by ridge regression
(closed form), a single temperature is fitted so that softmax(logits) matches softmax(gains), and L-BFGS (or Adam)
on that KL refines the ranking. Hierarchical routers
fit the main router on group gains and the sub-routers on expert gains.

Cost per layer (T calibration tokens, D hidden, F FFN neurons, E experts): the gains take about 1.3 dense FFN passes over
the tokens (all experts' activations in one GEMM, the output norms from the down projections' Gram matrices); the
refinement takes two [T, D] x [D, E] GEMMs per loss evaluation (an Adam step, or about 1.1 per L-BFGS iteration),
run over cache-sized token chunks. The collected FFN inputs
are T·D values per layer for all layers at once, kept in the source's dtype on the CPU; each layer is moved to the
experts' device while it is calibrated.
"""

from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from tiny_onn.data import PackedData
from tiny_onn.sources import swiglu_mlps


@torch.no_grad()
def collect_ffn_inputs(source: PreTrainedModel, data: PackedData, batch_size: int = 8) -> list[torch.Tensor]:
    """The dense source's FFN inputs (post-attention-norm hidden states) at every non-padding token: [T, D] per layer,
    on the CPU in the source's dtype (float32 for a float32 source; half the memory, and no rounding, for bf16 ones)."""
    device = next(source.parameters()).device
    inputs: list[list[torch.Tensor]] = [[] for _ in swiglu_mlps(source)]
    keep: list[torch.Tensor] = []

    def hook(layer: int):
        def pre_hook(module, args):
            x = args[0]
            inputs[layer].append(x.reshape(-1, x.shape[-1])[keep[0]].cpu())

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


def ridge(x_TD: torch.Tensor, y_TE: torch.Tensor, alpha: float, xtx: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_W ||x W - y||² + alpha·(tr(xᵀx)/D)·||W||², returned as router weights [E, D] (`xtx`: xᵀx when known)."""
    xtx = x_TD.T @ x_TD if xtx is None else xtx
    reg = alpha * xtx.diagonal().mean() * torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    return torch.linalg.solve(xtx + reg, x_TD.T @ y_TE).T


def _token_chunk(x_TD: torch.Tensor, cache_bytes: int = 4 << 20) -> int:
    """Tokens per chunk so that one chunk of x stays in a CPU cache between the two GEMMs of a step."""
    return max(256, cache_bytes // (x_TD.shape[1] * x_TD.element_size()))


REFINERS = ("lbfgs", "adam")


def kl_loss_and_grad(x_TD: torch.Tensor, w_ED: torch.Tensor, p_ET: torch.Tensor, groups: int = 1):
    """The refinement loss -mean over tokens and groups of Σ p log softmax(x Wᵀ) (the KL up to a constant) and its
    gradient ((q - p)ᵀ x) / (T·G), summed over token chunks: each chunk's logits and gradient reuse x while it is in
    cache, where one GEMM over all T tokens would read x from memory twice. `p_ET`: the target probabilities,
    transposed; the [E, T] layout (logitsᵀ = W xᵀ) runs faster than x Wᵀ for E << D on CPU."""
    T, E = x_TD.shape[0], w_ED.shape[0]
    chunk = _token_chunk(x_TD)
    grad = torch.zeros_like(w_ED)
    loss = torch.zeros((), dtype=torch.float64, device=w_ED.device)
    for lo in range(0, T, chunk):
        x_c, p_c = x_TD[lo : lo + chunk], p_ET[:, lo : lo + chunk]
        logq_Et = (w_ED @ x_c.T).view(groups, E // groups, -1).log_softmax(1).view(E, -1)  # [E, t]
        loss -= (p_c * logq_Et).sum().double()
        grad.addmm_(logq_Et.exp_() - p_c, x_c)  # [E, D]
    return loss / (T * groups), grad / (T * groups)


def refine_kl(x_TD: torch.Tensor, w_ED: torch.Tensor, target_TE: torch.Tensor, groups: int = 1, steps: int = 60,
              optimizer: str = "lbfgs", lr: float = 1e-2) -> torch.Tensor:
    """Refine router weights to minimise KL(softmax(target) || softmax(x W)) within each group (a ranking loss the
    least-squares start does not optimise).

    optimizer "lbfgs": `steps` iterations of `torch.optim.LBFGS` with a strong-Wolfe line search (about 1.1 loss
    evaluations per iteration; the loss is smooth and convex in W, so a few dozen iterations reach its minimum).
    "adam": `steps` steps of `torch.optim.Adam` (learning rate `lr`), written out on the chunked gradient (the refinement
    before L-BFGS; the same steps as Adam on the autograd loss)."""
    if optimizer not in REFINERS:
        raise ValueError(f"unknown router refinement {optimizer!r}: use one of {', '.join(REFINERS)}")
    T, E = target_TE.shape
    x = x_TD.float()
    p_ET = target_TE.float().view(T, groups, E // groups).softmax(-1).view(T, E).T.contiguous()  # [E, T]
    if optimizer == "lbfgs":
        w = w_ED.float().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            loss, w.grad = kl_loss_and_grad(x, w.detach(), p_ET, groups)
            return loss

        with torch.no_grad():
            opt.step(closure)
        return w.detach().to(w_ED.dtype)
    w = w_ED.float().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    beta1, beta2, eps = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults
    for step in range(1, steps + 1):
        _, grad = kl_loss_and_grad(x, w, p_ET, groups)
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
        w.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
    return w.to(w_ED.dtype)


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
    experts' outputs), in float32.

    Without materialising any expert's output: with a the activations [t, E, I] and W_e the down projection of expert e,
    <R, y_e> = a_e · (W_eᵀ R) and ||y_e||² = a_eᵀ (W_eᵀ W_e) a_e; only the G group outputs are formed (their sum is R),
    so a chunk costs about 1.3 dense FFN passes."""
    experts = moe_block.experts
    E, D, inter = experts.down_proj.shape
    per = E // groups
    gate_up = experts.gate_up_proj.detach().float().reshape(-1, D)  # [E·2I, D]
    down_EDI = experts.down_proj.detach().float()  # [E, D, I]
    down_DF = down_EDI.permute(1, 0, 2).reshape(D, E * inter)  # [D, E·I]
    down_GJD = down_DF.T.reshape(groups, per * inter, D)  # [G, per·I, D]: each group's neurons
    gram_E = torch.bmm(down_EDI.transpose(1, 2), down_EDI)  # [E, I, I]
    per_expert, per_group = [], []
    for start in range(0, x_TD.shape[0], chunk):
        x = x_TD[start : start + chunk].to(gate_up.device, torch.float32)
        t = x.shape[0]
        h = (x @ gate_up.T).view(t, E, 2 * inter)
        a = experts.act_fn(h[..., :inter]) * h[..., inter:]  # [t, E, I]
        y_GtD = torch.bmm(a.reshape(t, groups, per * inter).transpose(0, 1), down_GJD)  # [G, t, D]: group outputs
        R = y_GtD.sum(0)  # [t, D]: all routed experts' output
        Ry = ((R @ down_DF).view(t, E, inter) * a).sum(-1)  # [t, E]: <R, y_e>
        a_E = a.transpose(0, 1)  # [E, t, I]
        yy = (torch.bmm(a_E, gram_E) * a_E).sum(-1).T  # [t, E]: ||y_e||²
        per_expert.append((2 * Ry - yy).cpu())
        per_group.append((2 * Ry.view(t, groups, per).sum(-1) - y_GtD.pow(2).sum(-1).T).cpu())  # [t, G]
    return torch.cat(per_expert), torch.cat(per_group)


@torch.no_grad()
def calibrate_routers(
    model: PreTrainedModel, ffn_inputs: list[torch.Tensor], alpha: float = 1e-3, refine_steps: int = 60,
    refine: str = "lbfgs",
) -> list[dict]:
    """Fit every layer's router in place (`refine`, `refine_steps`: see `refine_kl`); returns per-layer fit
    diagnostics (oracle top-k agreement)."""
    report = []
    for i, x_in in enumerate(tqdm(ffn_inputs, desc="calibrate routers", unit="layer", leave=False)):
        overlap = calibrate_layer(model.model.layers[i].mlp, x_in, model.config.num_experts_per_tok, alpha,
                                  refine_steps, refine)
        report.append({"layer": i, "top_k_overlap_with_oracle": round(overlap, 4)})
    return report


@torch.no_grad()
def calibrate_layer(block, x_in: torch.Tensor, k: int, alpha: float = 1e-3, refine_steps: int = 60,
                    refine: str = "lbfgs") -> float:
    """Fit one MoE block's linear router on its FFN inputs x_in [T, D]; returns the share of the oracle's top-k
    experts the fitted router also picks."""
    router = block.router
    if router.lowrank:
        return fit_lowrank_router(block, x_in, k)
    x_TD = x_in.to(router.weight.device, torch.float32)
    x64 = x_TD.double()
    xtx = x64.T @ x64  # shared by every least-squares fit of this layer
    gains_TE, gains_TG = expert_and_group_gains(block, x_TD, router.num_groups)
    g_TE = _centred_scaled(gains_TE.double()).to(x64.device)
    E, G = g_TE.shape[1], router.num_groups
    if router.hierarchical:
        per = E // G
        sub_target = g_TE.view(-1, G, per)
        sub_target = (sub_target - sub_target.mean(-1, keepdim=True)).reshape(-1, E)
        w_sub = ridge(x64, sub_target, alpha, xtx)
        w_sub = fit_temperature(x64 @ w_sub.T, sub_target, G) * w_sub
        g_TG = _centred_scaled(gains_TG.double()).to(x64.device)
        w_main = ridge(x64, g_TG, alpha, xtx)
        w_main = fit_temperature(x64 @ w_main.T, g_TG) * w_main
        if refine_steps:
            w_sub = refine_kl(x_TD, w_sub, sub_target, G, refine_steps, refine)
            w_main = refine_kl(x_TD, w_main, g_TG, 1, refine_steps, refine)
        router.weight.copy_(w_sub.to(router.weight.dtype))
        router.group_weight.copy_(w_main.to(router.group_weight.dtype))
    else:
        w = ridge(x64, g_TE, alpha, xtx)
        w = fit_temperature(x64 @ w.T, g_TE) * w
        if refine_steps:
            w = refine_kl(x_TD, w, g_TE, 1, refine_steps, refine)
        router.weight.copy_(w.to(router.weight.dtype))
    logp = router.log_probs(x_TD.to(router.weight.dtype))
    return _oracle_overlap(logp, g_TE, k)


@torch.no_grad()
def fit_lowrank_router(block, x_in: torch.Tensor, k: int) -> float:
    """Fit an activation-scoring router ("lowrank" or "gate") to its FFN inputs x_in [T, D]: for the routed neurons'
    gate and up projections W [E·I, D] and the inputs' second moment C, the rank-r factors of the best rank-r estimate
    of x Wᵀ over those inputs (`tiny_onn.carve.neuron_predictor`; a "gate" router reads the exact gate and has only
    up factors), and c_j = ‖d_j‖ (the neurons' down-projection columns) — times the up pre-activation's root mean
    square sqrt(w_j C w_jᵀ) for a "gate" router without up factors; a two-stage gate router's exact stage weighs by
    ‖d_j‖. Returns the share of the oracle's top-k experts by
    gain that the fitted router also picks (on up to 2048 of the tokens)."""
    from tiny_onn.carve.neuron_predictor import low_rank_factors, projection_rms, sqrt_psd

    router, experts = block.router, block.experts
    E, I2, D = experts.gate_up_proj.shape
    inter = I2 // 2
    x64 = x_in.to(torch.float64)
    c_DD = x64.T @ x64 / max(x64.shape[0], 1)
    sqrt_c = sqrt_psd(c_DD)
    w = experts.gate_up_proj.detach().cpu()
    gate_FD, up_FD = w[:, :inter].reshape(E * inter, D), w[:, inter:].reshape(E * inter, D)
    factors = {"up_in": ("up_out", up_FD)} if hasattr(router, "up_in") else {}
    if not router.exact_gate:
        factors["gate_in"] = ("gate_out", gate_FD)
    for name_in, (name_out, rows) in factors.items():
        a_Dr, b_rF = low_rank_factors(rows, sqrt_c, getattr(router, name_in).shape[0])
        getattr(router, name_in).copy_(a_Dr.T.to(getattr(router, name_in)))
        getattr(router, name_out).copy_(b_rF.T.to(getattr(router, name_out)))
    down_norm_F = experts.down_proj.detach().cpu().norm(dim=1).reshape(-1).double()  # [E·I]
    scale_F = down_norm_F if hasattr(router, "up_in") else down_norm_F * projection_rms(up_FD, c_DD)  # × RMS of u_j
    router.neuron_scale.copy_(scale_F.to(router.neuron_scale))
    if router.num_candidates:  # the second stage weighs the exact |h_j| by ‖d_j‖
        router.down_norm.copy_(down_norm_F.to(router.down_norm))
    x_TD = x_in[:2048].to(router.neuron_scale.device, torch.float32)
    gains_TE, _ = expert_and_group_gains(block, x_TD, 1)
    logp = router.log_probs(x_TD.to(router.neuron_scale.dtype))
    return _oracle_overlap(logp, gains_TE, k)


def _oracle_overlap(logp_TE: torch.Tensor, gains_TE: torch.Tensor, k: int) -> float:
    """Mean share of each token's top-k experts by gain that the router's top-k also holds."""
    chosen, oracle = logp_TE.topk(k, -1).indices.cpu(), gains_TE.topk(k, -1).indices.cpu()
    return (chosen[:, :, None] == oracle[:, None, :]).any(-1).float().mean().item()


class _InputsCaptured(Exception):
    """Raised by the capturing hook: the rest of the forward is not needed."""


@torch.no_grad()
def collect_block_inputs(model: PreTrainedModel, data: PackedData, layer: int, batch_size: int = 8) -> torch.Tensor:
    """A carved model's own inputs to MoE block `layer` (its post-attention-norm hidden states, given every earlier
    layer as it is now) at every non-padding token: [T, D] on the CPU, in the order of `collect_ffn_inputs`. Each
    forward stops at that block."""
    block = model.model.layers[layer].mlp
    device = next(model.parameters()).device
    rows: list[torch.Tensor] = []
    keep: list[torch.Tensor] = []

    def capture(module, args):
        x = args[0]
        rows.append(x.reshape(-1, x.shape[-1])[keep[0]].cpu())
        raise _InputsCaptured

    handle = block.register_forward_pre_hook(capture)
    try:
        for batch in data.batches(batch_size):
            keep[:] = [batch["attention_mask"].reshape(-1).bool().to(device)]
            with contextlib.suppress(_InputsCaptured):
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      use_cache=False)
    finally:
        handle.remove()
    return torch.cat(rows)


@torch.no_grad()
def calibrate_sequentially(model: PreTrainedModel, data: PackedData, alpha: float = 1e-3, refine_steps: int = 60,
                           refine: str = "lbfgs", batch_size: int = 8) -> tuple[list[dict], list[torch.Tensor]]:
    """Calibrate the routers layer by layer on the carved model's own FFN inputs: layer i's router is fitted on the
    hidden states that layers 0..i-1 of the carved model produce, their routers already calibrated, so the fit sees
    the inputs it will get, errors of the earlier layers included (with `collect_ffn_inputs` every router sees the
    dense source's inputs instead). Costs about L/2 extra forwards of the calibration tokens for L layers. Returns
    the per-layer diagnostics and the collected inputs."""
    was_training = model.training
    model.eval()
    router_inputs = collect_router_inputs(model, data, batch_size)
    k = model.config.num_experts_per_tok
    report, inputs = [], []
    try:
        for i in tqdm(range(len(model.model.layers)), desc="calibrate routers (carved inputs)", unit="layer",
                      leave=False):
            x_TD = collect_block_inputs(model, data, i, batch_size)
            inputs.append(x_TD)
            block = model.model.layers[i].mlp
            if router_inputs is None and not block.router.gaussian:  # linear or lowrank
                overlap = calibrate_layer(block, x_TD, k, alpha, refine_steps, refine)
            else:
                overlap = fit_layer_router(block, x_TD, None if router_inputs is None else router_inputs[i], k, alpha,
                                           refine_steps, refine)
            report.append({"layer": i, "top_k_overlap_with_oracle": round(overlap, 4)})
    finally:
        model.train(was_training)
    return report, inputs


@torch.no_grad()
def fit_output_biases(model: PreTrainedModel, source: PreTrainedModel, ffn_inputs: list[torch.Tensor],
                      chunk: int = 2048) -> list[dict]:
    """Set every MoE block's output bias (a layout with `moe_output_bias`) to the mean, over the FFN inputs
    `ffn_inputs` [T, D] per layer, of the dense source's FFN output minus the block's (routers calibrated): the
    average of what the neurons a token does not run would have added. Returns per layer the bias norm and the
    block's mean squared error against the dense FFN before and after, each relative to the dense output's mean square."""
    dense_mlps = {m.layer: m.module for m in swiglu_mlps(source)}
    report = []
    for i, x_in in enumerate(tqdm(ffn_inputs, desc="fit output biases", unit="layer", leave=False)):
        block = model.model.layers[i].mlp
        if block.output_bias is None:
            raise ValueError("fit_output_biases needs a layout with moe_output_bias=True")
        device = block.output_bias.device
        block.output_bias.zero_()
        residual_sum = torch.zeros(x_in.shape[1], dtype=torch.float64, device=device)
        residual_sq = dense_sq = 0.0
        for start in range(0, x_in.shape[0], chunk):
            x_nD = x_in[start:start + chunk].to(device)
            dense_nD = dense_mlps[i](x_nD).double()
            r_nD = dense_nD - block(x_nD[None], routing_outputs=False)[0][0].double()  # [n, D]
            residual_sum += r_nD.sum(0)
            residual_sq += r_nD.pow(2).sum().item()
            dense_sq += dense_nD.pow(2).sum().item()
        T = x_in.shape[0]
        bias = residual_sum / T
        block.output_bias.copy_(bias.to(block.output_bias.dtype))
        # Σ‖r − b‖² = Σ‖r‖² − T‖b‖² for the mean b
        after = residual_sq - T * bias.pow(2).sum().item()
        report.append({"layer": i, "output_bias_norm": round(bias.norm().item(), 5),
                       "relative_mse_before": round(residual_sq / max(dense_sq, 1e-30), 5),
                       "relative_mse_after": round(after / max(dense_sq, 1e-30), 5)})
    return report


# ---- routers the least-squares calibration above does not cover: Gaussian scorers and side inputs -----------------

@torch.no_grad()
def collect_router_inputs(model: PreTrainedModel, data: PackedData, batch_size: int = 8) -> list[torch.Tensor] | None:
    """The carved model's routing inputs at every non-padding token, [T, D] per layer, in the order of
    `collect_ffn_inputs` on the same data; None when the routers read their FFN input."""
    from tiny_onn.model.modeling_tiny_onn import router_side_input

    kind = getattr(model.config, "router_input", "ffn")
    if kind == "ffn":
        return None
    embed = model.get_input_embeddings()
    device = embed.weight.device
    rows = []
    for batch in data.batches(batch_size):
        mask_BT = batch["attention_mask"].to(device)
        side_ND = router_side_input(embed(batch["input_ids"].to(device)), mask_BT, kind)
        rows.append(side_ND[mask_BT.reshape(-1).bool()].float().cpu())
    side_TD = torch.cat(rows)
    return [side_TD] * len(model.model.layers)  # the side input is the same for every layer


def _best_tokens(gains_TK: torch.Tensor, min_tokens: int) -> torch.Tensor:
    """Boolean [T, K]: option k's tokens are those whose best (highest-gain) option is k, topped up with k's
    highest-gain tokens when fewer than `min_tokens` prefer it."""
    T, K = gains_TK.shape
    chosen_TK = torch.nn.functional.one_hot(gains_TK.argmax(-1), K).bool()
    for k in range(K):
        if int(chosen_TK[:, k].sum()) < min(min_tokens, T):
            chosen_TK[gains_TK[:, k].topk(min(min_tokens, T)).indices, k] = True
    return chosen_TK


@torch.no_grad()
def gaussian_moments(r_TD: torch.Tensor, gains_TK: torch.Tensor, groups: int = 1, min_tokens: int = 8,
                     shrink: float = 16.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Means [K, D], log standard deviations [K, D] and log priors [K] of K diagonal Gaussians, each fitted to the
    routing inputs of the tokens it serves best. Variances are shrunk towards the variance of all tokens with the
    weight of `shrink` pseudo-tokens (few tokens in many dimensions give noisy variances); priors are each option's
    share of the tokens within its group (`groups` equal, contiguous groups; add-one smoothed)."""
    r = r_TD.double()
    var_all_D = r.var(0, unbiased=False).clamp_min(1e-6)
    chosen_TK = _best_tokens(gains_TK, min_tokens)
    means, log_stds = [], []
    for k in range(gains_TK.shape[1]):
        x = r[chosen_TK[:, k]]
        n = x.shape[0]
        var_D = (n * x.var(0, unbiased=False) + shrink * var_all_D) / (n + shrink)
        means.append(x.mean(0))
        log_stds.append(0.5 * var_D.clamp_min(1e-6).log())
    counts_K = chosen_TK.sum(0).double().view(groups, -1)
    log_prior_K = ((counts_K + 1) / (counts_K.sum(-1, keepdim=True) + counts_K.shape[1])).log().reshape(-1)
    return torch.stack(means), torch.stack(log_stds), log_prior_K


def _set_scorer(router, prefix: str, r_TD: torch.Tensor, target_TK: torch.Tensor, groups: int, alpha: float,
                gains_TK: torch.Tensor) -> None:
    """Initialise one scorer (prefix "" the experts or sub-routers, "group_" the main router) to rank like
    `target_TK` (softmax within `groups` groups): a Gaussian scorer takes the moments of the tokens each option serves
    best by `gains_TK`, a linear one least squares; then one fitted temperature (β of a Gaussian scorer)."""
    T, K = target_TK.shape
    if router.gaussian:
        mean, log_std, log_prior = gaussian_moments(r_TD, gains_TK, groups)
        for name, value in (("mean", mean), ("log_std", log_std), ("log_prior", log_prior)):
            getattr(router, prefix + name).copy_(value.to(getattr(router, prefix + name).dtype))
        getattr(router, prefix + "log_beta").zero_()
        loglik_TK = router.scores(r_TD.float(), prefix).double() - log_prior.to(torch.float64)
        loglik_TK = loglik_TK.view(T, groups, K // groups)
        loglik_TK = (loglik_TK - loglik_TK.mean(-1, keepdim=True)).reshape(T, K)  # softmax ignores per-token offsets
        spread = loglik_TK.std().clamp_min(1e-12)
        beta = fit_temperature(loglik_TK / spread, target_TK, groups) / spread
        getattr(router, prefix + "log_beta").fill_(math.log(float(beta)))
    else:
        w = ridge(r_TD.double(), target_TK, alpha)
        w = fit_temperature(r_TD.double() @ w.T, target_TK, groups) * w
        getattr(router, prefix + "weight").copy_(w.to(getattr(router, prefix + "weight").dtype))


def refine_router(router, r_TD: torch.Tensor, target_TE: torch.Tensor, steps: int, lr: float = 1e-2,
                  optimizer: str = "lbfgs") -> None:
    """Minimise KL(softmax(target) ‖ router) over the whole expert distribution (hierarchical: p_main·p_sub) by
    `steps` iterations of L-BFGS (strong-Wolfe line search) or steps of Adam (`lr`), on a float32 copy of the router's
    parameters, written back at the end."""
    if optimizer not in REFINERS:
        raise ValueError(f"unknown router refinement {optimizer!r}: use one of {', '.join(REFINERS)}")
    route = _RouteOnly(router)
    params = {f"router.{n}": p.detach().float().clone().requires_grad_(True) for n, p in router.named_parameters()}
    p_tgt = target_TE.float().softmax(-1)
    r = r_TD.float()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logq, _ = torch.func.functional_call(route, params, (r,))
        loss = -(p_tgt * logq).sum(-1).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        if optimizer == "lbfgs":
            opt = torch.optim.LBFGS(params.values(), lr=1.0, max_iter=steps, history_size=20,
                                    line_search_fn="strong_wolfe")
            opt.step(closure)
        else:
            opt = torch.optim.Adam(params.values(), lr=lr)
            for _ in range(steps):
                opt.step(closure)
    with torch.no_grad():
        for n, p in router.named_parameters():
            p.copy_(params[f"router.{n}"].to(p.dtype))


class _RouteOnly(torch.nn.Module):
    """Calls the router's `route` (no z-loss, no side input), so that functional_call can swap its parameters."""

    def __init__(self, router):
        super().__init__()
        self.router = router

    def forward(self, r_TD: torch.Tensor):
        return self.router.route(r_TD)


@torch.no_grad()
def fit_router(router, r_TD: torch.Tensor, gains_TE: torch.Tensor, gains_TG: torch.Tensor, alpha: float = 1e-3,
               refine_steps: int = 60, refine: str = "lbfgs") -> None:
    """Calibrate one router of any scorer (linear or Gaussian) on routing inputs r_TD [T, D] from the experts' gains
    [T, E] (and the groups' gains [T, G]): per-scorer initialisation (`_set_scorer`), then `refine_router`."""
    g_TE = _centred_scaled(gains_TE.double())
    E, G = g_TE.shape[1], router.num_groups
    if router.hierarchical:
        sub = g_TE.view(-1, G, E // G)
        _set_scorer(router, "", r_TD, (sub - sub.mean(-1, keepdim=True)).reshape(-1, E), G, alpha, g_TE)
        g_TG = _centred_scaled(gains_TG.double())
        _set_scorer(router, "group_", r_TD, g_TG, 1, alpha, g_TG)
    else:
        _set_scorer(router, "", r_TD, g_TE, 1, alpha, g_TE)
    if refine_steps:
        refine_router(router, r_TD, g_TE, refine_steps, optimizer=refine)


@torch.no_grad()
def fit_routers(model: PreTrainedModel, ffn_inputs: list[torch.Tensor], router_inputs: list[torch.Tensor] | None = None,
                alpha: float = 1e-3, refine_steps: int = 60, refine: str = "lbfgs") -> list[dict]:
    """Calibrate every router that `calibrate_routers` does not cover (Gaussian scorers, side inputs; linear FFN-input
    routers work too): the experts' gains come from the FFN inputs, the fit uses the routing inputs (`router_inputs`,
    default the FFN inputs). Returns per-layer diagnostics (oracle top-k agreement)."""
    report = []
    k = model.config.num_experts_per_tok
    for i, x_TD in enumerate(tqdm(ffn_inputs, desc="fit routers", unit="layer", leave=False)):
        overlap = fit_layer_router(model.model.layers[i].mlp, x_TD, None if router_inputs is None else router_inputs[i],
                                   k, alpha, refine_steps, refine)
        report.append({"layer": i, "top_k_overlap_with_oracle": round(overlap, 4)})
    return report


@torch.no_grad()
def fit_layer_router(block, x_TD: torch.Tensor, r_TD: torch.Tensor | None, k: int, alpha: float = 1e-3,
                     refine_steps: int = 60, refine: str = "lbfgs") -> float:
    """`fit_router` for one MoE block: gains from its FFN inputs x_TD, the fit on its routing inputs r_TD (None: x_TD);
    returns the share of the oracle's top-k experts the fitted router also picks."""
    router = block.router
    if router.lowrank:  # reads the FFN input by construction (the config refuses side inputs)
        return fit_lowrank_router(block, x_TD, k)
    r_TD = x_TD if r_TD is None else r_TD
    gains_TE, gains_TG = expert_and_group_gains(block, x_TD, router.num_groups)
    fit_router(router, r_TD, gains_TE, gains_TG, alpha, refine_steps, refine)
    logp, _ = router.route(r_TD.to(next(router.parameters()).device))
    return _oracle_overlap(logp, gains_TE, k)
