"""The README's numbers come from committed result files, and benchmark runs of different protocols keep their models."""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

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


def test_fused_breakdown_splits_the_ffn_into_experts_that_sum_to_it():
    breakdown = _benchmark("fused_breakdown")
    gen = torch.Generator().manual_seed(0)
    mlp = torch.nn.Module()
    mlp.gate_proj, mlp.up_proj = torch.nn.Linear(8, 12, bias=False), torch.nn.Linear(8, 12, bias=False)
    mlp.down_proj = torch.nn.Linear(12, 8, bias=False)
    x = torch.randn(5, 8, generator=gen)
    dense = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    gate_up, down = breakdown.split_ffn(mlp, 4, gen)  # 4 experts of 3 neurons
    assert gate_up.shape == (4, 6, 8) and down.shape == (4, 8, 3)
    h = torch.einsum("nd,eid->nei", x, gate_up)
    a = torch.nn.functional.silu(h[..., :3]) * h[..., 3:]
    per_expert = torch.einsum("nei,edi->ned", a, down)  # [N, E, D]
    torch.testing.assert_close(per_expert.sum(1), dense, atol=1e-5, rtol=1e-5)
    # the selection takes each token's experts of largest Σ|a|·‖d‖, here checked against the outputs' own scores
    idx = breakdown.oracle_selection(x, gate_up, down, 2)
    score = torch.tensor([[sum(abs(float(a[n, e, j])) * float(down[e, :, j].norm()) for j in range(3)) for e in range(4)]
                          for n in range(5)])
    assert torch.equal(idx.sort(-1).values, score.topk(2, -1).indices.sort(-1).values)
