"""Training-step time as experts get finer, the MoEs timed side by side: E = 16, 64, 128 at the same active neurons.

    python benchmarks/train_step_scaling.py [--repeats 9] [--threads 2] [--result train_step_scaling-<machine>]

Issue 12's target: a training step at E = 128 within 1.3x of the step at E = 16 with the same active neurons. moe_speed.py
derives that ratio from two layouts each timed against the dense model at different times of the run, so a change of
load between them moves it (1.26 in one run, 1.55 in another of the same code). Here the three MoEs (16x96 top-4,
64x24 top-16, 128x12 top-32: 25 % of SmolLM2's 1,536 FFN neurons per token, carved as moe_speed.py carves them) and
the dense source run their training steps in turn, round after round (the order rotated each round), so every round
gives one E = 128 / E = 16 ratio measured seconds apart. The rounds of one process agree closely, but processes of the
same code on the same data do not (on this VM the ratio has read 1.25 in one process and 1.5 in the next), so the
measure runs in `--processes` fresh processes per setting, one after another, each carving its models anew. Three
settings alternate, differing in what trains between two steps: the E = 16 and E = 128 MoEs alone, the three MoEs, and
the three MoEs with the dense source (on this VM the E = 128 step slows more than the E = 16 one as models are added).
Reported per process:
the median step of each model, the ratio of the medians, every round's ratio, minor page faults per step and the CPU
time the hypervisor stole (/proc/stat); over the processes: the ratio's median, min and max.
Training step as in moe_speed.py: batch 4 x 256, loss (+ the router's load balance) forward and backward, AdamW over the
FFN parameters, expert statistics tracked. Writes benchmarks/results/train_step_scaling.json (`--result
train_step_scaling-<machine>`: a file of its own for another machine).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_result_name, smollm2_scan, write_result  # noqa: E402
from moe_speed import LAYOUTS, carve_layout, train_params, training_step  # noqa: E402

from tiny_onn.data import DataArgs, build_dataset  # noqa: E402
from tiny_onn.scan import ScanResult  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source  # noqa: E402

MOES = ("16x96, top-4", "64x24, top-16", "128x12, top-32")
TARGET = 1.3  # step at E = 128 / step at E = 16
E128 = "128x12, top-32 / 16x96, top-4"
# which models train in the same process, in turn (what else runs between two steps changes the ratio: README)
SETTINGS = {
    "E = 16 and E = 128 only": ("16x96, top-4", "128x12, top-32"),
    "the three MoEs": MOES,
    "the three MoEs and the dense source": ("dense", *MOES),
}


def carved_for_training(name: str, scan, source, calib):
    """One layout of moe_speed.py carved (random experts, routers calibrated on 4,096 tokens), in training mode with
    expert statistics tracked, as `tiny-onn train` runs it."""
    moe, _, _ = carve_layout(LAYOUTS[name], scan, source, calib)
    moe.train()
    for layer in moe.model.layers:
        layer.mlp.experts.track_stats = True
        layer.mlp.experts.reset_stats()
    return moe


def timed_step(step) -> tuple[float, int]:
    """Wall seconds and minor page faults of one training step."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    step()
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def rounds(steps: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Every step once per round, the order rotated each round; one warm-up round first."""
    for step in steps.values():
        step()
    names = list(steps)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[int]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            s, f = timed_step(steps[name])
            seconds[name].append(s)
            faults[name].append(f)
        print(f"round {r + 1}/{repeats}: " + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in names), flush=True)
    return seconds, faults


def summary(seconds: dict[str, list[float]], faults: dict[str, list[int]]) -> dict:
    base = "16x96, top-4"
    ratios = {}
    for name in (n for n in MOES[1:] if n in seconds):
        per_round = [a / b for a, b in zip(seconds[name], seconds[base], strict=True)]
        ratios[f"{name} / {base}"] = {
            "ratio_of_medians": statistics.median(seconds[name]) / statistics.median(seconds[base]),
            "per_round": per_round,
            "per_round_median": statistics.median(per_round),
            "per_round_min": min(per_round),
            "per_round_max": max(per_round),
        }
    e128 = ratios[E128]
    e128["rounds_within_target"] = sum(r <= TARGET for r in e128["per_round"])
    return {
        "step_seconds_median": {n: statistics.median(v) for n, v in seconds.items()},
        "step_seconds": seconds,
        "minor_page_faults_per_step_median": {n: statistics.median(v) for n, v in faults.items()},
        "ratios": ratios,
    }


def steal_seconds() -> float | None:
    """CPU time the hypervisor gave to others since boot, all CPUs (the 'steal' column of /proc/stat); None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def measure_in_this_process(repeats: int, setting: str) -> dict:
    """Carve the setting's layouts, run the rounds (with the dense source's training step where the setting has it),
    summarise (one process's share of the benchmark)."""
    torch.manual_seed(0)
    source = load_source(SourceArgs(model="smollm2", device="cpu"))
    scan = ScanResult.load(smollm2_scan())
    data_args = DataArgs(seq_len=256)
    calib = build_dataset(source.tokenizer, data_args, "train", max_tokens=4096)
    # moe_speed.py's training batch: the first 4 sequences of its 8 x 256 held-out prefill batch
    ids = next(build_dataset(source.tokenizer, data_args, "heldout", max_tokens=8 * 256).batches(8))["input_ids"][:4]
    names = SETTINGS[setting]
    models = {"dense": source.model.train()} if "dense" in names else {}
    for name in (n for n in names if n != "dense"):
        models[name] = carved_for_training(name, scan, source, calib)
        gc.collect()
    steps = {name: training_step(m, ids, torch.optim.AdamW(train_params(m), lr=1e-6, foreach=False))
             for name, m in models.items()}
    load_before, steal_before = os.getloadavg()[0], steal_seconds()
    seconds, faults = rounds(steps, repeats)
    steal_after = steal_seconds()
    return {
        "setting": setting,
        "batch": list(ids.shape),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "stolen_cpu_seconds": None if steal_before is None else steal_after - steal_before,
        **summary(seconds, faults),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds per process")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes, one after another")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--result", default="train_step_scaling", type=machine_result_name("train_step_scaling"),
                        help="result file name: train_step_scaling, or train_step_scaling-<machine> for a run on "
                             "another machine (a file of its own)")
    parser.add_argument("--worker-output", type=Path, help=argparse.SUPPRESS)  # one process's share, as JSON
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)  # the worker's models
    args = parser.parse_args()
    if args.repeats < 1 or args.processes < 1:
        parser.error(f"--repeats and --processes must be at least 1, got {args.repeats} and {args.processes}")
    torch.set_num_threads(args.threads)
    if args.worker_output:
        args.worker_output.write_text(json.dumps(measure_in_this_process(args.repeats, args.setting)))
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in range(args.processes):
            for i, setting in enumerate(SETTINGS):  # the settings alternate, so the hours' load hits them alike
                out = Path(tmp) / f"process{p}-{i}.json"
                subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--threads",
                                str(args.threads), "--worker-output", str(out), "--setting", setting], check=True)
                runs.append(json.loads(out.read_text()))
                r = runs[-1]["ratios"][E128]
                print(f"process {p + 1}/{args.processes}, {setting}: E=128 / E=16 {r['ratio_of_medians']:.2f} "
                      f"(rounds {r['per_round_min']:.2f}-{r['per_round_max']:.2f})", flush=True)
    by_setting = {}
    for setting in SETTINGS:
        ratios = [r["ratios"][E128]["ratio_of_medians"] for r in runs if r["setting"] == setting]
        by_setting[setting] = {"per_process": ratios, "median": statistics.median(ratios), "min": min(ratios),
                               "max": max(ratios), "processes_within_target": sum(x <= TARGET for x in ratios)}
        print(f"{setting}: E=128 / E=16 median {statistics.median(ratios):.2f}, {min(ratios):.2f}-{max(ratios):.2f}; "
              f"{by_setting[setting]['processes_within_target']} of {len(ratios)} within {TARGET}")
    write_result(args.result, {
        "model": "smollm2 (SmolLM2-135M-Instruct, fp32)",
        "layouts": {name: LAYOUTS[name] for name in MOES},
        "repeats": args.repeats,
        "processes": args.processes,
        "threads": args.threads,
        "target_e128_over_e16": TARGET,
        "e128_over_e16": by_setting,
        "runs": runs,
    })


if __name__ == "__main__":
    main()
