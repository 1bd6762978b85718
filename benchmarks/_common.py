"""Helpers shared by the benchmark scripts: timing, machine info, and writing results/*.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name and the vector extensions that change which kernels run (/proc/cpuinfo on Linux; the
    platform's processor string elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    vector = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_int8") if f in flags]
    return f"{name} ({', '.join(vector) or 'no AVX2'})"


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def timed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each variant `repeats` times, alternating between variants so machine noise hits them alike."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name].append(timed(variants[name]))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine_result_name(benchmark: str) -> Callable[[str], str]:
    """An argparse type for a benchmark's `--result`: `benchmark` itself, or `benchmark-<machine>` for a run on another
    machine, which gets a file of its own (benchmarks/report.py renders each into its own README markers)."""

    def name(value: str) -> str:
        if not re.fullmatch(rf"{re.escape(benchmark)}(-[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*)?", value):
            raise argparse.ArgumentTypeError(
                f"{value!r} is not {benchmark} or {benchmark}-<machine> (letters, digits, '.', '_', '-'); pick e.g. "
                f"{benchmark}-my-cpu")
        return value

    return name


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "command": "python " + shlex.join(sys.argv), "machine": machine(), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def smollm2_scan(tokens: int = 8192, folder: str = "runs/bench/scan", data: str = "default") -> Path:
    """A scan of SmolLM2 on `data` (the default mix), made once and reused by the benchmarks (runs/ is not committed)."""
    from tiny_onn.scan import ScanConfig, ScanResult, run

    path = Path(folder)
    try:
        meta = ScanResult.load(path).meta
        if meta["tokens_fed"] >= tokens and meta.get("config", {}).get("data", "default") == data:
            return path
    except Exception:  # missing or stale: scan again
        pass
    run(ScanConfig(model="smollm2", device="cpu", tokens=tokens, data=data, out=str(path)))
    return path
