"""The README's numbers come from committed result files, and benchmark runs of different protocols keep their models."""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _benchmark(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_result_sections_are_rendered_from_the_result_files():
    report = _benchmark("report")
    readme = (ROOT / "README.md").read_text()
    rendered = 0
    names = report.renderers()
    assert "moe_speed-intel-xeon-amx" in names  # another machine's run is rendered into its own section
    for name, render in names.items():
        data = report._load(name)
        if data is None:
            continue
        section = re.search(rf"<!-- results:{name} -->\n(.*?)<!-- /results:{name} -->", readme, re.S)
        assert section, f"README has no section for benchmarks/results/{name}.json"
        assert section.group(1) == render(data) + "\n", f"README section {name} differs: run benchmarks/report.py"
        rendered += 1
    assert rendered >= 8


def test_moe_speed_runs_of_other_machines_get_files_of_their_own():
    name = _benchmark("moe_speed").result_name
    assert name("moe_speed") == "moe_speed"
    assert name("moe_speed-intel-xeon-amx") == "moe_speed-intel-xeon-amx"
    for bad in ("moe_paths", "moe_speed-", "moe_speed-../x", "moe_speed x", "other-moe_speed"):
        with pytest.raises(argparse.ArgumentTypeError, match="moe_speed-<machine>"):
            name(bad)


def test_training_protocols_keep_their_models_in_their_own_folders():
    folder = _benchmark("train_policies").protocol_folder
    short = Namespace(steps=30, batch_size=2, seq_len=256, lr=1e-4, k=4)
    long = Namespace(steps=200, batch_size=4, seq_len=256, lr=1e-4, k=4)
    faster = Namespace(steps=200, batch_size=4, seq_len=256, lr=3e-4, k=4)
    work = Path("runs/bench/train_policies")
    assert len({folder(work, p) for p in (short, long, faster)}) == 3
    assert folder(work, long) == folder(work, Namespace(**vars(long)))  # the same protocol reuses its folder
