"""Speed of a carved MoE against its dense source on SmolLM2 (CPU, fp32, batch 8x256, interleaved repeats, median).

    python benchmarks/moe_speed.py [--repeats 5]

Writes benchmarks/results/moe_speed.json:
- prefill tokens/s of the whole model (forward over the prompt, logits for the last position only, as generate's prefill),
- the time of one MoE FFN block ÷ the dense FFN on the same [2048, 576] input (router, dispatch and combine included),
for several layouts at 25 % of FFN neurons active. Targets: prefill ratio >= 1.5, MLP ratio <= 0.35.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, median, smollm2_scan, write_result  # noqa: E402

from tiny_onn.carve import CarveConfig, carve_model  # noqa: E402
from tiny_onn.carve.carver import active_fraction  # noqa: E402
from tiny_onn.data import DataArgs, build_dataset  # noqa: E402
from tiny_onn.scan import ScanResult  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source  # noqa: E402

LAYOUTS = {
    "16 experts, top-4": dict(experts=16, top_k=4),
    "shared 12.5% + 14 experts, top-2": dict(experts=14, top_k=2, shared=0.125),
    "64 experts, top-16": dict(experts=64, top_k=16),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    source = load_source(SourceArgs(model="smollm2", device="cpu"))
    scan = ScanResult.load(smollm2_scan())
    data_args = DataArgs(seq_len=256)
    calib = build_dataset(source.tokenizer, data_args, "train", max_tokens=4096)
    batch = next(build_dataset(source.tokenizer, data_args, "heldout", max_tokens=8 * 256).batches(8))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    layer = 15
    x_BTD = {}
    hook = source.model.model.layers[layer].mlp.register_forward_pre_hook(lambda m, a: x_BTD.setdefault("x", a[0]))
    with torch.no_grad():
        source.model(input_ids=ids, attention_mask=mask, use_cache=False)
    hook.remove()
    x = x_BTD["x"]
    dense_mlp = source.model.model.layers[layer].mlp

    results = {}
    for name, layout in LAYOUTS.items():
        cfg = CarveConfig(calib_tokens=4096, calib_steps=100, **layout)
        moe, plan, _ = carve_model(scan, source, cfg, calib)
        moe_block = moe.model.layers[layer].mlp

        @torch.no_grad()
        def prefill(model):
            return model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

        with torch.no_grad():
            times = interleaved({
                "dense_prefill": lambda: prefill(source.model),
                "moe_prefill": lambda m=moe: prefill(m),
                "dense_mlp": lambda: dense_mlp(x),
                "moe_mlp": lambda b=moe_block: b(x),
            }, args.repeats)
        med = {k: median(v) for k, v in times.items()}
        tokens = ids.numel()
        results[name] = {
            "layout": layout,
            "active_fraction": active_fraction(plan, cfg.top_k, 1536),
            "median_seconds": med,
            "prefill_tokens_per_second": {"dense": tokens / med["dense_prefill"], "moe": tokens / med["moe_prefill"]},
            "prefill_speedup_moe_over_dense": med["dense_prefill"] / med["moe_prefill"],
            "mlp_time_ratio_moe_over_dense": med["moe_mlp"] / med["dense_mlp"],
            "all_seconds": times,
        }
        r = results[name]
        print(f"{name}: active {r['active_fraction']:.3f}, prefill speed-up {r['prefill_speedup_moe_over_dense']:.2f}x, "
              f"MLP time ratio {r['mlp_time_ratio_moe_over_dense']:.3f}", flush=True)
        del moe
    write_result("moe_speed", {
        "model": "smollm2 (SmolLM2-135M-Instruct, fp32)",
        "batch": list(ids.shape),
        "mlp_layer": layer,
        "repeats": args.repeats,
        "targets": {"prefill_speedup": 1.5, "mlp_time_ratio": 0.35},
        "layouts": results,
    })


if __name__ == "__main__":
    main()
