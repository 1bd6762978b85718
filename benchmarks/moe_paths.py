"""Which dispatch path wins per shape: one carved MoE block of SmolLM2 (layer 15) on N tokens, every inference path.

    python benchmarks/moe_paths.py [--repeats 7] [--tokens 1 2 4 8 16 32 64 128 256 512 2048]

Batched generation (a batch of B prompts decodes B tokens per step), short prompts and prefill sit at different N; the
auto path (`TinyOnnExperts.pick_path`) should be the fastest (or close) at every N. Layouts as in moe_speed (25 %
active, random carve, routers calibrated on 4096 tokens). The N tokens are FFN inputs of held-out tokens spread over
different sequences. Times are medians of interleaved repeats, each ÷ the dense FFN block on the same tokens.
Writes benchmarks/results/moe_paths.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, median, smollm2_scan, write_result  # noqa: E402
from moe_speed import LAYOUTS  # noqa: E402  (the same four layouts)

from tiny_onn.carve import CarveConfig, carve_model  # noqa: E402
from tiny_onn.data import DataArgs, build_dataset  # noqa: E402
from tiny_onn.scan import ScanResult  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source  # noqa: E402

PATHS = ("dense", "loop", "sorted", "gather", "bag", "padded")
GATHER_MAX = 64  # the gather path copies N·K experts' weights: beyond this it only measures memory traffic
LAYER = 15


def ffn_inputs(source, n_seqs: int = 16, seq_len: int = 256) -> torch.Tensor:
    """Layer LAYER's FFN inputs of held-out tokens, [tokens, D], ordered position-major so that the first N rows come
    from different sequences (as a decode batch does)."""
    batch = next(build_dataset(source.tokenizer, DataArgs(seq_len=seq_len), "heldout",
                               max_tokens=n_seqs * seq_len).batches(n_seqs))
    seen = {}
    hook = source.model.model.layers[LAYER].mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        source.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    hook.remove()
    x_BTD = seen["x"]
    keep_BT = batch["attention_mask"].bool()
    rows = [x_BTD[b, t] for t in range(x_BTD.shape[1]) for b in range(x_BTD.shape[0]) if keep_BT[b, t]]
    return torch.stack(rows)  # [tokens, D]


def set_path(block, path: str) -> None:
    block.experts.path = path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048])
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    args = parser.parse_args()
    torch.manual_seed(0)
    source = load_source(SourceArgs(model="smollm2", device="cpu"))
    source.model.eval()
    scan = ScanResult.load(smollm2_scan())
    calib = build_dataset(source.tokenizer, DataArgs(seq_len=256), "train", max_tokens=4096)
    x_all = ffn_inputs(source)
    dense_block = source.model.model.layers[LAYER].mlp
    results = {}
    for name in args.layouts:
        cfg = CarveConfig(method="random", calib_tokens=4096, calib_steps=100, calib_refine="adam", **LAYOUTS[name])
        moe, _, _ = carve_model(scan, source, cfg, calib)
        block = moe.model.layers[LAYER].mlp.eval()
        rows = {}
        for n in args.tokens:
            x = x_all[:n]
            with torch.no_grad():
                block.experts.path = "auto"
                auto = block.experts.pick_path(n, cfg.top_k, x)

                def run_on(path: str, x=x, block=block):
                    return lambda: (set_path(block, path), block(x))

                paths = [p for p in PATHS if p != "gather" or n <= GATHER_MAX]
                variants = {"dense FFN": lambda x=x: dense_block(x), **{p: run_on(p) for p in paths},
                            "auto": run_on("auto")}
                times = interleaved(variants, args.repeats)
            base = median(times["dense FFN"])
            ratios = {p: median(times[p]) / base for p in (*paths, "auto")}
            best = min(paths, key=ratios.get)
            rows[str(n)] = {"dense_ffn_seconds": base, "time_ratio_vs_dense_ffn": ratios, "fastest": best,
                            "auto_picks": auto}
            print(f"{name} N={n}: " + ", ".join(f"{p} {r:.2f}" for p, r in ratios.items())
                  + f" (fastest {best}, auto picks {auto})", flush=True)
        block.experts.path = "auto"
        results[name] = rows
    write_result("moe_paths", {"model": "smollm2 (SmolLM2-135M-Instruct, fp32)", "layer": LAYER,
                               "repeats": args.repeats, "threads": torch.get_num_threads(), "layouts": results})


if __name__ == "__main__":
    main()
