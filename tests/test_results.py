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


@pytest.mark.parametrize("benchmark", ["moe_speed", "fused_breakdown"])
def test_speed_runs_of_other_machines_get_files_of_their_own(benchmark):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import machine_result_name

    name = machine_result_name(benchmark)
    assert name(benchmark) == benchmark
    assert name(f"{benchmark}-intel-xeon-amx") == f"{benchmark}-intel-xeon-amx"
    for bad in ("moe_paths", f"{benchmark}-", f"{benchmark}-../x", f"{benchmark} x", f"other-{benchmark}"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"{benchmark}-<machine>"):
            name(bad)
    assert _benchmark("moe_speed").result_name("moe_speed-x") == "moe_speed-x"  # the script's own --result type


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


def test_eval_suite_table_divides_by_the_dense_row_and_names_the_knowledge_runs():
    report = _benchmark("report")

    def row(model: str, kind: str, retained: int, general: float, mix: float, prefill: float, decode: float) -> dict:
        return {"model": model, "kind": kind, "params": {"active_per_token": 75.0e6}, "flops_per_token": 0.16e9,
                "facts": {"retention": retained / 10, "retained": retained, "known": 10, "accuracy": 0.2,
                          "retention_ci95": [0.1, 0.9]},
                "general": {"ppl": general}, "perplexity": {"ppl": mix},
                "prefill_tokens_per_second": prefill, "decode_tokens_per_second": decode,
                "humaneval": {"pass@1": 0.0, "n": 5}}

    d = {"command": "python benchmarks/eval_suite.py", "mc_task": "arithmetic", "humaneval_problems": 5,
         "facts_limit": 240, "general_tokens": 4096, "eval_tokens": 4096,
         "models": [row("smollm2", "dense", 10, 40.0, 8.0, 1000.0, 20.0),
                    row("runs/bench/knowledge/start/moe25", "moe", 0, 160.0, 16.0, 1500.0, 25.0),
                    row("runs/bench/knowledge/390x4x256-lr0.0003/moe25gc2s0-kd-both-attn-full-1/model", "moe",
                        6, 52.0, 8.4, 900.0, 23.0)]}
    table = report.eval_suite(d)
    assert "| `moe25` carved, untrained | 75.0M | 0.160 | **0.000** (0/10; 0.10–0.90) | 0.200 | **160.00** (4.00×) | " \
           "16.00 (2.00×) | 1500 (1.50×) | 25.0 (1.25×) |" in table
    # 52 / 40 = 1.30, 8.4 / 8 = 1.05, 900 / 1000 = 0.90, 23 / 20 = 1.15
    assert "| `moe25gc2s0` trained (kd-both-attn, full, seed 1; protocol 390x4x256-lr0.0003) | 75.0M | 0.160 | " \
           "**0.600** (6/10; 0.10–0.90) | 0.200 | **52.00** (1.30×) | 8.40 (1.05×) | 900 (0.90×) | 23.0 (1.15×) |" in table
    assert "| SmolLM2-135M-Instruct (dense source) | HumanEval | pass@1 0.000 | 5 |" in table
