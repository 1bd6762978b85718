"""Router calibration time and quality, the previous implementation against the current one, on the same carve plan.

    python benchmarks/calibration_speed.py [--calib-tokens 16384] [--adam-steps 500] [--calib-steps 60] [--eval-tokens 4096]

SmolLM2 carved as the demo carves it (dsc, shared 12.5 % + 14 experts of 96, top-2, flat router). The FFN inputs are
collected once; every layer is then calibrated by three variants, the order rotating per layer (interleaved, so that the
load of this shared machine hits all alike): "baseline" = `tiny_onn/carve/calibrate.py` as of commit BASELINE_COMMIT
(read from git) with --adam-steps Adam steps (its default then); "current, adam" = today's code, the same Adam steps
(what the faster gains and chunked steps alone give); "current" = today's defaults (CarveConfig.calib_refine,
--calib-steps). Quality: held-out perplexity of each calibrated model ÷ the dense source's. Writes
benchmarks/results/calibration_speed.json, including the memory of the collected inputs and what they would take for a
4B source (arithmetic, not measured).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import smollm2_scan, write_result  # noqa: E402

from tiny_onn.carve import CarveConfig, assemble, make_plan  # noqa: E402
from tiny_onn.carve import calibrate as current  # noqa: E402
from tiny_onn.data import DataArgs, build_dataset  # noqa: E402
from tiny_onn.eval.perplexity import perplexity  # noqa: E402
from tiny_onn.scan import ScanResult  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source  # noqa: E402

BASELINE_COMMIT = "79efbce"
ROOT = Path(__file__).resolve().parent.parent


def baseline_module() -> types.ModuleType:
    """The calibration module as it was before the speed-up (gains from every expert's outputs, autograd Adam)."""
    src = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:tiny_onn/carve/calibrate.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    module = types.ModuleType("calibrate_baseline")
    exec(compile(src, f"calibrate.py@{BASELINE_COMMIT}", "exec"), module.__dict__)
    return module


def one_layer(model, i: int):
    """A view of `model` whose only layer is layer i (both implementations calibrate `model.model.layers[j]`)."""
    return types.SimpleNamespace(model=types.SimpleNamespace(layers=[model.model.layers[i]]), config=model.config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-tokens", type=int, default=CarveConfig.calib_tokens)
    parser.add_argument("--adam-steps", type=int, default=500, help="Adam steps of the baseline and 'current, adam'")
    parser.add_argument("--calib-steps", type=int, default=CarveConfig.calib_steps,
                        help="refinement steps of 'current' (CarveConfig.calib_refine)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    args = parser.parse_args()
    torch.manual_seed(0)
    source = load_source(SourceArgs(model="smollm2", device="cpu"))
    scan = ScanResult.load(smollm2_scan())
    cfg = CarveConfig(experts=14, top_k=2, shared=0.125, method="dsc", router="flat")
    t0 = time.perf_counter()
    plan = make_plan(scan, source.model, cfg)
    plan_seconds = time.perf_counter() - t0
    names = ("baseline", "current, adam", "current")
    models = {name: assemble(source.model, plan, num_experts_per_tok=cfg.top_k) for name in names}
    data_args = DataArgs(seq_len=cfg.seq_len)
    calib = build_dataset(source.tokenizer, data_args, "train", max_tokens=args.calib_tokens)
    t0 = time.perf_counter()
    inputs = current.collect_ffn_inputs(source.model, calib)
    collect_seconds = time.perf_counter() - t0
    baseline = baseline_module().calibrate_routers
    impl = {"baseline": lambda m, xs: baseline(m, xs, refine_steps=args.adam_steps),
            "current, adam": lambda m, xs: current.calibrate_routers(m, xs, refine_steps=args.adam_steps, refine="adam"),
            "current": lambda m, xs: current.calibrate_routers(m, xs, refine_steps=args.calib_steps,
                                                                refine=cfg.calib_refine)}
    seconds = {name: [] for name in impl}
    cpu_seconds = {name: [] for name in impl}
    overlap = {name: [] for name in impl}
    for i, x in enumerate(inputs):
        order = names[i % 3:] + names[:i % 3]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            rep = impl[name](one_layer(models[name], i), [x])
            seconds[name].append(time.perf_counter() - t0)
            cpu_seconds[name].append(time.process_time() - c0)
            overlap[name].append(rep[0]["top_k_overlap_with_oracle"])
        print(f"layer {i}: " + ", ".join(f"{n} {seconds[n][-1]:.1f}s (CPU {cpu_seconds[n][-1]:.1f}s)" for n in impl),
              flush=True)
    held = build_dataset(source.tokenizer, data_args, "heldout", max_tokens=args.eval_tokens)
    dense = perplexity(source.model, held)
    ppl = {name: perplexity(m, held) for name, m in models.items()}
    per_layer = {n: statistics.median(s) for n, s in seconds.items()}
    tokens, D = inputs[0].shape
    input_bytes = sum(x.numel() * x.element_size() for x in inputs)
    result = {
        "model": "smollm2 (SmolLM2-135M-Instruct, fp32)",
        "layout": "dsc, shared 12.5% + 14 experts x 96, top-2, flat router (the demo's)",
        "baseline": f"tiny_onn/carve/calibrate.py at commit {BASELINE_COMMIT}",
        "calibration_tokens": tokens,
        "adam_steps": args.adam_steps,
        "current_refinement": {"calib_refine": cfg.calib_refine, "calib_steps": args.calib_steps},
        "shared_machine": "2 CPU cores shared with other jobs; per-layer times interleaved, medians; wall-clock and the "
                          "process's CPU time (less sensitive to the other jobs)",
        "seconds_per_layer_median": per_layer,
        "seconds_total": {n: sum(s) for n, s in seconds.items()},
        "speedup": per_layer["baseline"] / per_layer["current"],
        "cpu_seconds_per_layer_median": {n: statistics.median(s) for n, s in cpu_seconds.items()},
        "cpu_speedup": statistics.median(cpu_seconds["baseline"]) / statistics.median(cpu_seconds["current"]),
        "speedup_current_adam": per_layer["baseline"] / per_layer["current, adam"],
        "seconds_per_layer": seconds,
        "cpu_seconds_per_layer": cpu_seconds,
        "top_k_overlap_with_oracle_mean": {n: statistics.mean(o) for n, o in overlap.items()},
        "heldout_tokens_scored": dense["tokens"],
        "dense_ppl": dense["ppl"],
        "ppl": {n: p["ppl"] for n, p in ppl.items()},
        "ppl_ratio": {n: p["ppl"] / dense["ppl"] for n, p in ppl.items()},
        "other_carve_seconds": {"plan (select + balanced k-means, all layers)": plan_seconds,
                                "collect FFN inputs (one dense forward over the calibration tokens)": collect_seconds},
        "ffn_inputs_bytes": input_bytes,
        "ffn_inputs_bytes_qwen3_4b_bf16": 36 * tokens * 2560 * 2,
        "ffn_inputs_note": f"{len(inputs)} layers x {tokens} tokens x {D} x {inputs[0].element_size()} bytes here; a 4B "
                           "source (Qwen3-4B: 36 layers, hidden 2560) in bf16 at the same token count: 36 x T x 2560 x 2 "
                           "bytes (arithmetic, not measured)",
    }
    print("per layer: " + ", ".join(f"{n} {per_layer[n]:.1f}s (ppl ratio {result['ppl_ratio'][n]:.3f})" for n in names)
          + f"; speed-up {result['speedup']:.2f}x")
    write_result("calibration_speed", result)


if __name__ == "__main__":
    main()
