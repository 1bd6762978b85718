"""Controls that a carved MoE must beat.

`width_pruned_dense`: the dense source with every FFN shrunk to its most important neurons — the same number of FFN
neurons per token as a MoE, but the same ones for every token (no router). If a MoE does not beat it at equal active
neurons, its routing earns nothing.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tiny_onn.artifacts import atomic_dir, versions, write_json
from tiny_onn.errors import TinyOnnError
from tiny_onn.scan import ScanResult
from tiny_onn.sources import Source, swiglu_mlps
from tiny_onn.sources.loading import absolute_model_path
from tiny_onn.sources.quantized import dense_state_dict, dense_weight


def importance_keep(scan: ScanResult, layer: int, n_keep: int) -> torch.Tensor:
    """Indices (sorted) of a layer's `n_keep` neurons with the highest importance a·s (LLaMA-MoE's score)."""
    score = scan.stat(layer, "act") * scan.stat(layer, "grad")
    return score.topk(n_keep).indices.sort().values


@torch.no_grad()
def width_pruned_dense(source: PreTrainedModel, scan: ScanResult, n_keep: int) -> tuple[PreTrainedModel, list]:
    """A copy of the dense source whose FFNs keep `n_keep` neurons each (top by importance); returns (model, kept
    neuron indices per layer)."""
    mlps = swiglu_mlps(source)
    if not 1 <= n_keep <= mlps[0].num_neurons:
        raise TinyOnnError(f"n_keep must be in [1, {mlps[0].num_neurons}], got {n_keep}")
    config = copy.deepcopy(source.config)
    config.intermediate_size = n_keep
    state = dense_state_dict(source)  # a 4-bit source dequantized: its packed bytes are not weights
    names = {id(m): n for n, m in source.named_modules()}
    kept = []
    for mlp in mlps:
        idx = importance_keep(scan, mlp.layer, n_keep)
        kept.append(idx.tolist())
        prefix = names[id(mlp.module)] + "."
        state[prefix + "gate_proj.weight"] = dense_weight(mlp.gate_proj)[idx].clone()  # [n_keep, D]
        state[prefix + "up_proj.weight"] = dense_weight(mlp.up_proj)[idx].clone()  # [n_keep, D]
        state[prefix + "down_proj.weight"] = dense_weight(mlp.down_proj)[:, idx].clone()  # [D, n_keep]
    pruned = AutoModelForCausalLM.from_config(config, dtype=next(source.parameters()).dtype)
    pruned.load_state_dict(state)
    return pruned.to(next(source.parameters()).device).eval(), kept


def save_width_pruned(source: Source, scan: ScanResult, n_keep: int, folder: str | Path) -> Path:
    """Write the width-pruned dense control as a Hugging Face folder with provenance (its source, kept neurons)."""
    model, kept = width_pruned_dense(source.model, scan, n_keep)
    with atomic_dir(folder, "provenance.json") as tmp:
        model.save_pretrained(tmp)
        source.tokenizer.save_pretrained(tmp)
        write_json(tmp / "provenance.json", {
            "source_model": source.spec, "source_model_path": absolute_model_path(source.spec),
            "source_origin": source.origin, "method": "width-pruned dense (importance a·s)",
            "neurons_per_layer": n_keep, "layers": [{"layer": i, "kept": k} for i, k in enumerate(kept)],
            "versions": versions()})
    return Path(folder)
