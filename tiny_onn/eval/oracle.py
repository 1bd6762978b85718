"""Oracle routing: upper bounds on what any router could keep of a carve, and on what any split into experts could.

- `oracle_expert_routing(moe)`: every MoE block routes each token to the k experts with the largest true gain
  2⟨R, y_e⟩ − ‖y_e‖² (R = the sum of all routed experts' outputs), computed from every expert's output. The router is
  bypassed; the experts and the shared expert are the carve's. What a perfect router would keep of this carve.
- `neuron_oracle(dense, fraction)`: every SwiGLU FFN of a dense model keeps, per token, only its `fraction` of neurons
  with the largest |h_j|·‖d_j‖ (activation times the norm of the neuron's down-projection column). No grouping into
  experts at all: the per-token neuron ceiling of design.md's table, which any carve at that active fraction is bounded
  by in practice.

Both are context managers that patch module instances (not classes) and restore them on exit; both compute every
neuron, so they measure quality, not speed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from tiny_onn.errors import TinyOnnError
from tiny_onn.sources import swiglu_mlps
from tiny_onn.sources.architecture import patched_forwards


def run_with_hooks(model: torch.nn.Module, batches: Iterable[dict], handles: list) -> None:
    """Run `model` over `batches` (no KV cache) for what its hooks record, then remove the hooks, also on error."""
    try:
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def _oracle_block_forward(self, hidden_states: torch.Tensor, routing_outputs: bool = True):
    """A TinyOnnSparseMoeBlock forward that selects each token's top-k experts by their true gain (its routing outputs
    are always returned)."""
    shape = hidden_states.shape
    x_ND = hidden_states.reshape(-1, shape[-1])
    E = self.experts.num_experts
    y_END = torch.stack([self.experts.expert_forward(e, x_ND) for e in range(E)])  # [E, N, D]
    R_ND = y_END.sum(0)
    gain_NE = (2 * (y_END * R_ND).sum(-1) - y_END.pow(2).sum(-1)).T  # [N, E]
    idx_NK = gain_NE.topk(self.routing.top_k, dim=-1).indices
    selected_NE = torch.zeros_like(gain_NE, dtype=torch.bool).scatter_(1, idx_NK, True)
    out_ND = (y_END * selected_NE.T[:, :, None].to(y_END.dtype)).sum(0)
    if self.shared_expert is not None:
        out_ND = out_ND + self.shared_expert(x_ND)
    return self._with_bias(out_ND).reshape(shape), gain_NE.float().log_softmax(-1), selected_NE, None


@contextmanager
def oracle_expert_routing(moe: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """Within the block, every MoE block of `moe` (a TinyOnn model) routes by the experts' true gains (top-k of the
    model's routing settings)."""
    if moe.config.model_type != "tiny_onn":
        raise TinyOnnError(f"oracle expert routing needs a carved TinyOnn model, got a '{moe.config.model_type}' model")
    blocks = [layer.mlp for layer in moe.model.layers]
    with patched_forwards(blocks, [_oracle_block_forward] * len(blocks)):
        yield moe


def _neuron_oracle_forward(keep: int, weight_F: torch.Tensor | None = None):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)  # [..., F]
        w_F = self.down_proj.weight.norm(dim=0) if weight_F is None else weight_F.to(h.device, h.dtype)
        score = h.abs() * w_F  # |h_j|·‖d_j‖, or |h_j|·w_j with the given weights
        idx = score.topk(keep, dim=-1).indices
        mask = torch.zeros_like(h).scatter_(-1, idx, 1.0)
        return self.down_proj(h * mask)

    return forward


@contextmanager
def neuron_oracle(dense: PreTrainedModel, fraction: float | list[float],
                  neuron_weights: list[torch.Tensor] | None = None) -> Iterator[PreTrainedModel]:
    """Within the block, every SwiGLU FFN of `dense` keeps per token only its round(fraction·F) neurons with the
    largest |h_j|·‖d_j‖ (`fraction`: one for every FFN, or one per FFN, e.g. from `allocate_neuron_fractions`).
    `neuron_weights` (one non-negative [F] vector per FFN) replaces ‖d_j‖ in that score, e.g. a scan's mean |∂L/∂h_j|
    for first-order Taylor importance |h_j|·|∂L/∂h_j|."""
    mlps = [m.module for m in swiglu_mlps(dense)]
    fractions = [fraction] * len(mlps) if isinstance(fraction, float | int) else list(fraction)
    if len(fractions) != len(mlps):
        raise TinyOnnError(f"{len(fractions)} neuron-oracle fractions for a model with {len(mlps)} FFNs")
    weights = [None] * len(mlps) if neuron_weights is None else list(neuron_weights)
    if len(weights) != len(mlps):
        raise TinyOnnError(f"{len(weights)} neuron-weight vectors for a model with {len(mlps)} FFNs")
    for i, (mlp, w) in enumerate(zip(mlps, weights, strict=True)):
        if w is not None and (w.shape != (mlp.gate_proj.weight.shape[0],) or not bool(torch.isfinite(w).all())
                              or bool((w < 0).any())):
            raise TinyOnnError(f"the neuron weights of FFN {i} must be {mlp.gate_proj.weight.shape[0]} finite, "
                               f"non-negative numbers, got shape {tuple(w.shape)}")
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise TinyOnnError(f"the neuron oracle's fraction must be in (0, 1], got {f}")
    keeps = [max(1, math.floor(f * mlp.gate_proj.weight.shape[0] + 0.5)) for mlp, f in zip(mlps, fractions, strict=True)]
    with patched_forwards(mlps, [_neuron_oracle_forward(k, w) for k, w in zip(keeps, weights, strict=True)]):
        yield dense


def _neuron_scores(mlp, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(SwiGLU activations h [..., F], scores |h_j|·‖d_j‖ [..., F]) of one FFN on its inputs x."""
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    return h, h.abs() * mlp.down_proj.weight.norm(dim=0)


@torch.no_grad()
def calibrate_neuron_thresholds(dense: PreTrainedModel, batches, fraction: float, scope: str = "layer",
                                sample_per_layer: int = 1 << 20, seed: int = 0) -> list[float]:
    """Score thresholds τ_l, one per FFN, such that on the calibration `batches` (dicts with input_ids and optionally
    attention_mask) a `fraction` of the (token, neuron) scores |h_j|·‖d_j‖ reach them: per FFN (`scope="layer"`: each
    FFN keeps that fraction on average) or over all FFNs at once (`"global"`: one τ for every layer, so layers whose
    neurons contribute more to the residual stream keep more). Scores are sampled (at most `sample_per_layer` per FFN)
    to bound memory."""
    if not 0.0 < fraction <= 1.0:
        raise TinyOnnError(f"the threshold oracle's fraction must be in (0, 1], got {fraction}")
    if scope not in ("layer", "global"):
        raise TinyOnnError(f"the threshold oracle's scope must be 'layer' or 'global', got {scope!r}")
    mlps = [m.module for m in swiglu_mlps(dense)]
    samples: list[list[torch.Tensor]] = [[] for _ in mlps]
    generator = torch.Generator().manual_seed(seed)

    def hook(i: int):
        def record(module, args) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            score = _neuron_scores(module, x)[1]
            samples[i].append(score.to(torch.promote_types(score.dtype, torch.float32)).reshape(-1))
        return record

    run_with_hooks(dense, batches, [mlp.register_forward_pre_hook(hook(i)) for i, mlp in enumerate(mlps)])
    if not samples[0]:
        raise TinyOnnError("no calibration batches to fit the neuron thresholds on")
    per_layer = []
    for chunks in samples:
        s = torch.cat(chunks)
        if s.numel() > sample_per_layer:
            s = s[torch.randperm(s.numel(), generator=generator)[:sample_per_layer]]
        per_layer.append(s)

    def threshold(s: torch.Tensor) -> float:
        keep = max(1, math.floor(fraction * s.numel() + 0.5))
        return float(s.kthvalue(s.numel() - keep + 1).values)  # the keep-th largest score

    if scope == "layer":
        return [threshold(s) for s in per_layer]
    return [threshold(torch.cat(per_layer))] * len(mlps)


class KeptNeurons:
    """Counts of neurons kept and neurons offered by a threshold oracle (its measured active fraction)."""

    def __init__(self, layers: int) -> None:
        self.kept = [0] * layers
        self.offered = [0] * layers

    def fraction(self) -> float:
        return sum(self.kept) / max(1, sum(self.offered))

    def per_layer(self) -> list[float]:
        return [k / max(1, o) for k, o in zip(self.kept, self.offered, strict=True)]


def _threshold_oracle_forward(tau: float, layer: int, counts: KeptNeurons):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, score = _neuron_scores(self, x)
        mask = score >= tau
        counts.kept[layer] += int(mask.sum())
        counts.offered[layer] += mask.numel()
        return self.down_proj(h * mask.to(h.dtype))

    return forward


@contextmanager
def neuron_threshold_oracle(dense: PreTrainedModel, thresholds: list[float],
                            counts: KeptNeurons | None = None) -> Iterator[PreTrainedModel]:
    """Within the block, every SwiGLU FFN l of `dense` keeps per token the neurons whose |h_j|·‖d_j‖ reaches
    thresholds[l] (`calibrate_neuron_thresholds`): the neuron oracle with a budget that varies per token (and, for
    global thresholds, per layer) instead of a fixed top-k. `counts` (optional) accumulates how many were kept."""
    mlps = [m.module for m in swiglu_mlps(dense)]
    if len(thresholds) != len(mlps):
        raise TinyOnnError(f"{len(thresholds)} neuron thresholds for a model with {len(mlps)} FFNs")
    counts = counts if counts is not None else KeptNeurons(len(mlps))
    with patched_forwards(mlps, [_threshold_oracle_forward(tau, i, counts) for i, tau in enumerate(thresholds)]):
        yield dense


@torch.no_grad()
def allocate_neuron_fractions(dense: PreTrainedModel, batches, fraction: float, min_fraction: float = 0.05) -> list[float]:
    """Per-FFN active fractions averaging `fraction` (over neurons, all FFNs of width F alike), chosen so that the next
    neuron any FFN would add removes about the same share of that FFN's output: on the calibration `batches`, the r-th
    largest |h_j|·‖d_j‖ of each token, squared and averaged over tokens, divided by the FFN's mean ‖y‖², is FFN l's
    gain from its r-th neuron; the budget goes to the largest gains of all FFNs (each FFN keeps at least
    `min_fraction`). Cross terms between neurons are ignored: a proxy for the relative error of the per-token top-k."""
    if not 0.0 < fraction <= 1.0 or not 0.0 < min_fraction <= fraction:
        raise TinyOnnError(f"allocation needs 0 < min_fraction <= fraction <= 1, got {min_fraction}, {fraction}")
    mlps = [m.module for m in swiglu_mlps(dense)]
    widths = {mlp.gate_proj.weight.shape[0] for mlp in mlps}
    if len(widths) != 1:
        raise TinyOnnError(f"allocating one neuron budget needs FFNs of one width, got {sorted(widths)}")
    F = widths.pop()
    ranked_sq = [torch.zeros(F, dtype=torch.float64) for _ in mlps]  # [F] summed r-th largest score², per FFN
    out_sq = [0.0] * len(mlps)
    tokens = [0] * len(mlps)

    def hook(i: int):
        def record(module, args, output) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            score = _neuron_scores(module, x)[1].double()  # [T, F]
            ranked_sq[i] += score.sort(dim=-1, descending=True).values.pow(2).sum(0)
            out_sq[i] += float(output.double().pow(2).sum())
            tokens[i] += x.shape[0]
        return record

    run_with_hooks(dense, batches, [mlp.register_forward_hook(hook(i)) for i, mlp in enumerate(mlps)])
    if not tokens[0]:
        raise TinyOnnError("no calibration batches to allocate the neuron budget on")
    floor = max(1, math.floor(min_fraction * F + 0.5))
    keep = [floor] * len(mlps)
    gains = torch.cat([(r / max(o, 1e-30))[floor:] for r, o in zip(ranked_sq, out_sq, strict=True)])  # [L·(F - floor)]
    layer_of = torch.arange(len(mlps)).repeat_interleave(F - floor)
    extra = max(0, math.floor(fraction * F * len(mlps) + 0.5) - floor * len(mlps))
    chosen = layer_of[gains.topk(extra).indices]  # each FFN's gains decrease with rank: its top ones are chosen first
    for i, n in enumerate(torch.bincount(chosen, minlength=len(mlps)).tolist()):
        keep[i] += n
    return [k / F for k in keep]
