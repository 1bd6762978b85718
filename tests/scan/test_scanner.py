"""The scanner's statistics against a direct autograd computation, scores, torchrun equivalence, and the real model."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.conftest import make_tiny_model
from tiny_onn.data import IGNORE_INDEX
from tiny_onn.scan import NeuronScanner, ScanResult, delta_sc, s_p, scan_batch, zscore
from tiny_onn.scan.scanner import activation_gradients_only, statistics_tensors
from tiny_onn.sources import swiglu_mlps


def random_batch(vocab: int, num_categories: int = 2, B: int = 3, T: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (B, T), generator=g)
    labels = input_ids.clone()
    labels[torch.rand(B, T, generator=g) < 0.4] = IGNORE_INDEX  # a loss mask with holes
    attention_mask = torch.ones(B, T, dtype=torch.long)
    category = torch.randint(0, num_categories, (B, T), generator=g)
    attention_mask[-1, -4:] = 0  # right padding on the last row
    labels[-1, -4:] = IGNORE_INDEX
    category[-1, -4:] = -1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "category": category}


def reference_stats(model, batch, positions: str):
    """|h|, |∂L/∂h| and frequency averaged over the counted tokens, computed plainly with retain_grad."""
    hs = []

    def keep(module, args):
        args[0].retain_grad()
        hs.append(args[0])

    handles = [m.down_proj.register_forward_pre_hook(keep) for m in swiglu_mlps(model)]
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    scored = labels[:, 1:] != IGNORE_INDEX
    F.cross_entropy(logits[:, :-1][scored], labels[:, 1:][scored], reduction="sum").backward()
    for h in handles:
        h.remove()
    if positions == "scored":
        counted = torch.zeros_like(labels, dtype=torch.bool)
        counted[:, :-1] = scored
    else:
        counted = batch["attention_mask"].bool()
    out = []
    for h in hs:
        a = h.detach().abs()[counted]  # [tokens, N]
        s = h.grad.abs()[counted]
        f = (a > a.mean(-1, keepdim=True)).float()
        cat = batch["category"][counted]
        per_cat = {c: (a[cat == c].mean(0), s[cat == c].mean(0)) for c in range(2)}
        out.append((a.mean(0), s.mean(0), f.mean(0), per_cat))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("positions", ["scored", "all"])
def test_scanner_matches_direct_autograd(arch, positions):
    model = make_tiny_model(arch, vocab_size=97)
    batch = random_batch(97)
    expected = reference_stats(model, batch, positions)

    scanner = NeuronScanner(model, num_categories=2)
    with activation_gradients_only(model):
        scan_batch(scanner, batch, positions)
    scanner.remove()
    got = statistics_tensors(scanner, [torch.zeros(1)] * 2, ["a", "b"], (1.0, 1.0, 1.0))
    for i, (a, s, f, per_cat) in enumerate(expected):
        torch.testing.assert_close(got[f"layers.{i}.act"], a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[f"layers.{i}.grad"], s, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[f"layers.{i}.freq"], f, atol=1e-5, rtol=1e-5)
        for c, name in enumerate(["a", "b"]):
            torch.testing.assert_close(got[f"layers.{i}.by_category.{name}.act"], per_cat[c][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[f"layers.{i}.by_category.{name}.grad"], per_cat[c][1], atol=1e-5, rtol=1e-5)
        assert s.abs().sum() > 0, "the reference gradient must not be trivially zero"
    # the model's trainable flags are restored after the scan
    assert all(p.requires_grad for p in model.parameters())


def test_statistics_accumulate_across_batches():
    """Two batches scanned one after another equal one batch holding both (memory does not grow with tokens)."""
    model = make_tiny_model("llama", vocab_size=97)
    b1, b2 = random_batch(97, seed=1), random_batch(97, seed=2)
    both = {k: torch.cat([b1[k], b2[k]]) for k in b1}
    sums = []
    for batches in ([b1, b2], [both]):
        scanner = NeuronScanner(model, 2)
        with activation_gradients_only(model):
            for b in batches:
                scan_batch(scanner, b)
        scanner.remove()
        sums.append(statistics_tensors(scanner, [torch.zeros(1)] * 2, ["a", "b"], (1.0, 1.0, 1.0)))
    for key in sums[0]:
        torch.testing.assert_close(sums[0][key], sums[1][key], atol=1e-5, rtol=1e-5)


def test_scores_follow_their_definitions():
    g = torch.Generator().manual_seed(0)
    act, grad, freq = torch.rand(50, generator=g) + 0.1, torch.rand(50, generator=g) + 0.1, torch.rand(50, generator=g)
    d = delta_sc(act, grad)
    assert abs(float(d.mean())) < 1e-6
    torch.testing.assert_close(d, (act - act.mean()) / act.std(unbiased=False) - (grad - grad.mean()) / grad.std(unbiased=False))
    sp = s_p(act, grad, freq, (2.0, 0.0, 0.0))
    torch.testing.assert_close(sp, 2 * zscore(act))
    sp_inv = s_p(act, grad, freq, (0.0, 1.0, 0.0))
    assert torch.argmax(sp_inv) == torch.argmin(grad), "z(1/s) ranks the lowest-gradient neuron first"
    assert torch.equal(zscore(torch.ones(5)), torch.zeros(5))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scan_args(model_dir, data, out):
    return ["scan", "--model", str(model_dir), "--data", str(data), "--tokens", "100000", "--seq-len", "32",
            "--batch-size", "2", "--device", "cpu", "--fingerprint-tokens", "16", "--out", str(out)]


def test_scan_cli_writes_complete_artifact(tiny_model_dir, small_jsonl, tmp_path):
    from tiny_onn.cli import main

    out = tmp_path / "scan"
    assert main(_scan_args(tiny_model_dir, small_jsonl, out)) == 0
    result = ScanResult.load(out)
    assert result.categories == ["chat", "code"]
    assert result.meta["tokens_counted"] == sum(result.meta["tokens_counted_per_category"].values())
    assert result.stat(0, "fingerprint").shape == (64, 16)
    for i in range(2):
        for cat in ("chat", "code"):
            for stat in ("act", "grad", "freq"):
                assert torch.isfinite(result.stat(i, stat, cat)).all()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder may be left behind"


def test_torchrun_two_processes_match_one(tiny_model_dir, small_jsonl, tmp_path):
    from tiny_onn.cli import main

    assert main(_scan_args(tiny_model_dir, small_jsonl, tmp_path / "one")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(free_port()),
           "-m", "tiny_onn.cli", *_scan_args(tiny_model_dir, small_jsonl, tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = load_file(tmp_path / "one" / "scan.safetensors"), load_file(tmp_path / "two" / "scan.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=1e-5, msg=key)
    assert ScanResult.load(tmp_path / "two").meta["world_size"] == 2


@pytest.mark.slow
def test_scan_real_smollm2(smollm2_scan):
    result = ScanResult.load(smollm2_scan)
    assert result.meta["tokens_fed"] >= 512
    assert set(result.categories) == {"chat", "code", "math"}
    assert all(n > 0 for n in result.meta["tokens_counted_per_category"].values())
    differs = 0
    for i in range(result.num_layers):
        for key, t in result.tensors.items():
            if key.startswith(f"layers.{i}."):
                assert torch.isfinite(t).all(), key
        assert abs(float(result.stat(i, "delta_sc").mean())) < 1e-4
        assert float(result.stat(i, "grad").min()) >= 0 and float(result.stat(i, "grad").max()) > 0
        code, chat = result.stat(i, "act", "code"), result.stat(i, "act", "chat")
        rel = (code - chat).abs() / (code + chat).clamp_min(1e-8)
        differs += int((rel > 0.5).sum())
    assert differs > 0, "code and chat tokens should drive some neurons very differently"


def test_data_with_a_category_per_record_gets_a_warning(tiny_moe, tmp_path, caplog):
    """A per-record id given as 'category' multiplies the scan's statistics by the number of records: warned, with
    the memory it takes."""
    from tests.conftest import scan_tiny, write_jsonl

    moe, _ = tiny_moe
    records = [{"prompt": f"Say {i}", "completion": f"{i}", "category": f"id-{i}"} for i in range(100)]
    data = write_jsonl(tmp_path / "ids.jsonl", records)
    with caplog.at_level("WARNING"):
        scan_tiny(moe.parent / "dense", data, tmp_path / "scan")
    assert re.search(r"has (6[5-9]|[7-9][0-9]|100) categories", caplog.text) and "GiB for this model" in caplog.text
