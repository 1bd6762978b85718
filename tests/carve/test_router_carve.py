"""Carving with Gaussian routers and side inputs: calibrated before training, exported folders load without tiny_onn and
generate; `reroute` swaps the routers of an existing carve and keeps its experts."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tiny_onn.carve.calibrate import fit_lowrank_router
from tiny_onn.carve.reroute import reroute
from tiny_onn.cli import main
from tiny_onn.model import TinyOnnConfig
from tiny_onn.model.modeling_tiny_onn import TinyOnnSparseMoeBlock
from tiny_onn.sources import SourceArgs, load_source


def _carve(tiny_moe, out, score, side) -> dict:
    moe, _ = tiny_moe
    argv = ["carve", "--scan", str(moe.parent / "scan"), "--model", str(moe.parent / "dense"), "--experts", "4",
            "--top-k", "2", "--router", "hierarchical", "--groups", "2", "--router-score", score, "--router-input", side,
            "--calib-tokens", "512", "--calib-steps", "20", "--eval-tokens", "256", "--no-plots", "--device", "cpu",
            "--out", str(out)]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["router_score"], config["router_input"]) == (score, side)
    return json.loads((out / "carve.json").read_text())


def test_gaussian_carve_is_calibrated(tiny_moe, tmp_path):
    meta = _carve(tiny_moe, tmp_path / "gauss", "gaussian", "ffn")
    # the share of chosen experts that are among the oracle's top-2 of 4 (chance: 0.5)
    overlap = [layer["top_k_overlap_with_oracle"] for layer in meta["calibration"]]
    assert len(overlap) == 2 and sum(overlap) / 2 > 0.65, overlap
    assert meta["perplexity"]["ratio"] < 1.5


def test_gaussian_context_carve_exports_loads_and_generates(tiny_moe, tmp_path):
    out = tmp_path / "gauss-ctx"
    _carve(tiny_moe, out, "gaussian", "context")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert "tiny_onn" not in sys.modules
        assert type(model.model.layers[0].mlp.router).__name__ == "TinyOnnRouter" and model.model.layers[0].mlp.router.gaussian
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        cached = model.generate(ids, max_new_tokens=5, do_sample=False)
        plain = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
        assert cached.shape[1] == 11 and cached.tolist() == plain.tolist()
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_reroute_keeps_the_experts_and_fits_new_routers(tiny_moe, tmp_path):
    moe, data = tiny_moe
    out = reroute(moe, tmp_path / "rerouted", router_score="gaussian", router_input="embedding", calib_tokens=512,
                  calib_steps=10, data=str(data))
    before = load_source(SourceArgs(model=str(moe), device="cpu"), dense_only=False).model.state_dict()
    after = load_source(SourceArgs(model=str(out), device="cpu"), dense_only=False).model
    assert after.config.router_score == "gaussian" and after.config.router_input == "embedding"
    for name, tensor in after.state_dict().items():
        if ".mlp.router." not in name:
            assert torch.equal(tensor, before[name]), name
    meta = json.loads((out / "carve.json").read_text())
    assert meta["config"]["router_score"] == "gaussian" and meta["rerouted_from"]["folder"] == str(moe)
    assert len(meta["calibration"]) == 2
    with torch.no_grad():
        logits = after(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("score", ["lowrank", "gate", "gate, two stages"])
def test_single_neuron_carve_selects_like_the_neuron_oracle(tiny_moe, tmp_path, score):
    """Experts of one neuron each and a full-rank lowrank (or gate) router — or a gate router without up factors whose
    second stage ranks every expert exactly (4 × top-k candidates = all): the router's top-k is each token's top
    neurons by |h_j|·‖d_j‖ of the routed neurons, computed here from the dense source's weights."""
    moe, _ = tiny_moe
    out = tmp_path / "neurons"
    dense = load_source(SourceArgs(model=str(moe.parent / "dense"), device="cpu")).model
    D, F = dense.config.hidden_size, dense.config.intermediate_size
    two_stage = score == "gate, two stages"
    router = ["--router-score", "gate", "--router-rank", "0", "--router-candidates", "4"] if two_stage else [
        "--router-score", score, "--router-rank", str(D)]
    argv = ["carve", "--scan", str(moe.parent / "scan"), "--model", str(moe.parent / "dense"), "--experts", str(F),
            "--top-k", str(F // 4), *router, "--calib-tokens", "512",
            "--eval-tokens", "256", "--no-plots", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    model = load_source(SourceArgs(model=str(out), device="cpu"), dense_only=False).model
    plan = json.loads((out / "carve.json").read_text())
    assert model.config.moe_intermediate_size == 1 and model.config.router_rank == (0 if two_stage else D)
    assert model.config.router_candidates == (F if two_stage else 0)
    block = model.model.layers[1].mlp
    mlp = dense.model.layers[1].mlp
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        neuron_of_expert = block.experts.gate_up_proj[:, 0]  # [E, D]: each expert's gate row is one dense gate row
        idx = [int((mlp.gate_proj.weight - row).abs().sum(-1).argmin()) for row in neuron_of_expert]
        h = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)  # [6, F]
        score = (h.abs() * mlp.down_proj.weight.norm(dim=0))[:, idx]  # [6, E], in expert order
        want = score.topk(F // 4, dim=-1).indices.sort(-1).values
        logp, _ = block.router(x)
        got = logp.topk(F // 4, dim=-1).indices.sort(-1).values
    assert torch.equal(got, want)
    overlap = [layer["top_k_overlap_with_oracle"] for layer in plan["calibration"]]
    assert len(overlap) == 2 and min(overlap) > 0.5, overlap
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == 10


def test_reroute_to_lowrank_routers(tiny_moe, tmp_path):
    moe, data = tiny_moe
    out = reroute(moe, tmp_path / "lowrank", router_score="lowrank", calib_tokens=512, data=str(data))
    after = load_source(SourceArgs(model=str(out), device="cpu"), dense_only=False).model
    assert after.config.router_score == "lowrank" and after.model.layers[0].mlp.router.lowrank
    meta = json.loads((out / "carve.json").read_text())
    assert [row["top_k_overlap_with_oracle"] > 0.5 for row in meta["calibration"]] == [True, True]


def test_two_stage_gate_carve_is_validated_and_weighs_by_the_down_norms(tiny_moe, tmp_path):
    moe, _ = tiny_moe
    base = ["carve", "--scan", str(moe.parent / "scan"), "--model", str(moe.parent / "dense"), "--experts", "8",
            "--top-k", "2", "--no-plots", "--device", "cpu", "--out", str(tmp_path / "bad")]
    assert main([*base, "--router-candidates", "2"]) != 0  # not a gate router
    assert main([*base, "--router-score", "gate", "--router-candidates", "0.5"]) != 0  # fewer candidates than top-k
    assert main([*base, "--router-score", "gate", "--router-candidates", "5"]) != 0  # more than the 8 experts
    assert not (tmp_path / "bad").exists()
    config = TinyOnnConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=2,
                           router_score="gate", router_rank=0, router_candidates=3)
    block = TinyOnnSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    fit_lowrank_router(block, torch.randn(300, 8, generator=torch.Generator().manual_seed(1)), k=2)
    torch.testing.assert_close(block.router.down_norm, block.experts.down_proj.norm(dim=1).reshape(-1))


def test_gate_router_without_up_factors_scales_by_the_up_rms():
    """Rank 0: c_j = ‖d_j‖ · sqrt(mean over the calibration tokens of (x·w_u_j)²), checked neuron by neuron."""
    config = TinyOnnConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=2,
                           router_score="gate", router_rank=0)
    block = TinyOnnSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    overlap = fit_lowrank_router(block, x, k=2)
    w, d = block.experts.gate_up_proj, block.experts.down_proj  # [E, 2I, D], [E, D, I]
    for e in range(6):
        for i in range(2):
            rms = (x @ w[e, 2 + i]).pow(2).mean().sqrt()
            want = d[e, :, i].norm() * rms
            torch.testing.assert_close(block.router.neuron_scale[e * 2 + i], want, rtol=1e-4, atol=1e-6)
    assert 0.0 <= overlap <= 1.0
