"""Is a carved MoE with every expert selected the dense model? Largest logit difference on real held-out SmolLM2 tokens,
beside the dense model's own fp32 rounding error (its fp32 logits against the same model computed in float64).

    python benchmarks/lossless.py

Every neuron goes to exactly one expert whatever the split, so the split is random here (the clustering methods differ
only in which neurons share an expert); routers are not calibrated (with every expert selected they choose nothing).
Writes benchmarks/results/lossless.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import smollm2_scan, write_result  # noqa: E402

from tiny_onn.carve import CarveConfig, assemble, make_plan  # noqa: E402
from tiny_onn.data import DataArgs, build_dataset  # noqa: E402
from tiny_onn.scan import ScanResult  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source  # noqa: E402

LAYOUTS = {"16 experts": {"experts": 16, "shared": 0.0}, "shared 12.5% + 14 experts": {"experts": 14, "shared": 0.125}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=4, help="held-out sequences of --seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    source = load_source(SourceArgs(model="smollm2", device="cpu"))
    scan = ScanResult.load(smollm2_scan())
    held = build_dataset(source.tokenizer, DataArgs(seq_len=args.seq_len), "heldout",
                         max_tokens=args.sequences * args.seq_len)
    ids = held.input_ids[: args.sequences]  # [B, T], full rows of real tokens
    with torch.no_grad():
        dense = source.model(ids).logits  # [B, T, V]
        exact = copy.deepcopy(source.model).double()(ids).logits  # the same model in float64: "exact" for fp32
    floor = float((dense.double() - exact).abs().max())  # the dense model's own fp32 rounding error
    scale = float(dense.abs().max())
    rows = {}
    for name, layout in LAYOUTS.items():
        cfg = CarveConfig(scan="", method="random", experts=layout["experts"], shared=layout["shared"],
                          top_k=layout["experts"])
        moe = assemble(source.model, make_plan(scan, source.model, cfg), num_experts_per_tok=layout["experts"])
        with torch.no_grad():
            carved = moe(ids).logits
        diff = float((carved - dense).abs().max())
        rows[name] = {"max_abs_logit_difference": diff, "relative_to_max_logit": diff / scale,
                      "moe_vs_float64_dense": float((carved.double() - exact).abs().max())}
        print(f"{name}: max |MoE - dense| = {diff:.3g} (max |logit| {scale:.1f}; dense fp32 vs fp64 {floor:.3g})",
              flush=True)
        del moe
    write_result("lossless", {
        "model": "smollm2 (SmolLM2-135M-Instruct, fp32), every expert selected, random split, routers untrained",
        "tokens": list(ids.shape), "max_abs_logit": scale, "dense_fp32_vs_float64": floor, "layouts": rows,
    })


if __name__ == "__main__":
    main()
