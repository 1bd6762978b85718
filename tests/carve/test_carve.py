"""Carving: lossless surgery (logits and gradients), balanced plans, save/load in a fresh process, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import scan_tiny
from tiny_onn.carve import CarveConfig, assemble, make_plan
from tiny_onn.carve.cluster import balanced_kmeans
from tiny_onn.carve.select import shared_scores
from tiny_onn.cli import main
from tiny_onn.errors import TinyOnnError
from tiny_onn.scan import ScanResult, s_p, zscore
from tiny_onn.sources import SourceArgs, load_source


@pytest.fixture(scope="module")
def tiny_scan(tiny_model_dir, tmp_path_factory, tiny_tokenizer):
    from tests.conftest import write_jsonl

    folder = tmp_path_factory.mktemp("tiny-scan")
    records = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i} friend"}],
                "category": "chat" if i % 2 else "code"} for i in range(60)]
    data = write_jsonl(folder / "d.jsonl", records)
    return scan_tiny(tiny_model_dir, data, folder / "scan"), data


def _dense_and_moe(model_dir, scan_dir, **kw):
    source = load_source(SourceArgs(model=str(model_dir), device="cpu"))
    cfg = CarveConfig(scan=str(scan_dir), **kw)
    plan = make_plan(ScanResult.load(scan_dir), source.model, cfg)
    moe = assemble(source.model, plan, num_experts_per_tok=cfg.top_k, router_type=cfg.router)
    return source, plan, moe


@pytest.mark.parametrize("layout", [dict(experts=4, top_k=4), dict(experts=8, top_k=8, shared=0.25, router="hierarchical", groups=2)])
def test_every_expert_active_equals_dense(tiny_model_dir, tiny_scan, layout):
    source, plan, moe = _dense_and_moe(tiny_model_dir, tiny_scan[0], **layout)
    ids = torch.randint(3, source.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for m in (source.model, moe):
        m.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, source.model(ids).logits, atol=1e-4, rtol=1e-4)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        g_dense = dict(source.model.named_parameters())[name].grad
        g_moe = dict(moe.named_parameters())[name].grad
        torch.testing.assert_close(g_moe, g_dense, atol=1e-4, rtol=1e-3)
    # every neuron of every layer is used exactly once
    for lp in plan.layers:
        used = torch.cat([lp.shared, lp.experts.reshape(-1)]).sort().values
        assert torch.equal(used, torch.arange(64))


def _tiny_source(tmp_path, tiny_tokenizer, config) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # biases too: Qwen2's q/k/v biases must reach the MoE
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer.save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


@pytest.mark.parametrize("family", ["qwen2", "mistral-window", "qwen2-window-every-layer"])
def test_other_supported_families_carve_losslessly_with_the_cache(tmp_path, tiny_tokenizer, tiny_scan, family):
    """Qwen2 (biased q/k/v) and Mistral with a sliding window shorter than the text: every expert active = dense, in
    full forwards and in cached greedy decoding past the window."""
    from transformers import MistralConfig, Qwen2Config

    from tests.conftest import tiny_config

    common = {k: v for k, v in tiny_config("llama", len(tiny_tokenizer)).to_dict().items()
              if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "max_position_embeddings", "pad_token_id", "eos_token_id")}
    config = {"qwen2": lambda: Qwen2Config(**common),
              "mistral-window": lambda: MistralConfig(sliding_window=6, **common),
              "qwen2-window-every-layer": lambda: Qwen2Config(use_sliding_window=True, sliding_window=6,
                                                              max_window_layers=0, **common)}[family]()
    dense_dir = _tiny_source(tmp_path, tiny_tokenizer, config)
    scan = scan_tiny(dense_dir, tiny_scan[1], tmp_path / "scan")
    source, _, moe = _dense_and_moe(dense_dir, scan, experts=4, top_k=4)
    assert moe.config.sliding_window == (None if family == "qwen2" else 6)
    assert moe.config.attention_bias == family.startswith("qwen2")
    ids = torch.randint(3, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, source.model(ids).logits, atol=1e-4, rtol=1e-4)
        prompt = ids[:1, :4]  # 4 + 12 tokens: past a 6-token window
        out = [m.generate(prompt, max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
               for m in (moe, source.model)]
    assert torch.equal(out[0].sequences, out[1].sequences)
    torch.testing.assert_close(torch.stack(out[0].scores), torch.stack(out[1].scores), atol=1e-4, rtol=1e-4)


def test_sources_with_windows_in_some_layers_only_are_refused():
    from transformers import Qwen2Config

    from tiny_onn.carve.assemble import sliding_window

    assert sliding_window(Qwen2Config(sliding_window=4096, use_sliding_window=False)) is None
    with pytest.raises(TinyOnnError, match="some layers only"):
        sliding_window(Qwen2Config(sliding_window=16, use_sliding_window=True, max_window_layers=1,
                                   num_hidden_layers=2))


def test_a_swiglu_family_that_scales_attention_otherwise_is_refused_before_carving(tmp_path, tiny_tokenizer, tiny_scan,
                                                                                   capsys):
    """Granite passes as a SwiGLU decoder, but multiplies embeddings, residuals and logits: scanning it works, carving
    it gets one clear error and writes nothing."""
    from transformers import GraniteConfig

    config = GraniteConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)
    scan = scan_tiny(_tiny_source(tmp_path, tiny_tokenizer, config), tiny_scan[1], tmp_path / "scan")
    out = tmp_path / "moe"
    capsys.readouterr()  # the source's saving and scanning progress
    assert main(["carve", "--scan", str(scan), "--experts", "4", "--top-k", "2", "--calib-tokens", "64",
                 "--eval-tokens", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot carve a 'granite' source" in err[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fewer_experts_change_the_output(tiny_model_dir, tiny_scan):
    source, _, moe = _dense_and_moe(tiny_model_dir, tiny_scan[0], experts=4, top_k=1)
    ids = torch.randint(3, 100, (1, 8))
    with torch.no_grad():
        assert not torch.allclose(moe(ids).logits, source.model(ids).logits, atol=1e-3)


def test_balanced_kmeans_gives_equal_clusters():
    x = np.random.default_rng(0).normal(size=(120, 5))
    labels = balanced_kmeans(x, 6, seed=0)
    assert np.bincount(labels).tolist() == [20] * 6


@pytest.mark.parametrize("method", ["dsc", "random", "actgrad", "coact"])
def test_methods_plan_valid_experts(tiny_model_dir, tiny_scan, method):
    _, plan, _ = _dense_and_moe(tiny_model_dir, tiny_scan[0], experts=4, top_k=2, keep=0.5, shared=0.125, method=method)
    for lp in plan.layers:
        assert lp.experts.shape == (4, 6) and lp.shared.numel() == 8
        assert len(set(lp.experts.reshape(-1).tolist()) | set(lp.shared.tolist())) == 32


@pytest.mark.parametrize("shared_score", ["importance", "s_p"])
def test_dsc_shared_expert_is_strong_in_every_category(tiny_scan, shared_score):
    scan = ScanResult.load(tiny_scan[0])
    score = shared_scores(scan, 0, "dsc", torch.Generator(), shared_score)
    cats = scan.categories
    assert len(cats) == 2
    if shared_score == "importance":
        per_cat = [zscore(scan.stat(0, "act", c) * scan.stat(0, "grad", c)) for c in cats]
    else:
        w = tuple(scan.meta["score_weights"][k] for k in ("act", "inv_grad", "freq"))
        per_cat = [s_p(scan.stat(0, "act", c), scan.stat(0, "grad", c), scan.stat(0, "freq", c), w) for c in cats]
    torch.testing.assert_close(score, torch.minimum(*per_cat))  # a generalist: its worst category decides


def test_dsc_clusters_on_the_per_category_delta_sc(tiny_model_dir, tiny_scan):
    """dsc reads ΔSC: change only the per-category gradients (ΔSC_c = z(a_c) − z(s_c) changes, nothing else dsc uses
    without a shared expert does) and the experts change; with --delta-sc-features 0 they do not."""
    from tiny_onn.carve.select import category_delta_sc

    scan = ScanResult.load(tiny_scan[0])
    for c, name in enumerate(scan.categories):
        expected = zscore(scan.stat(0, "act", name)) - zscore(scan.stat(0, "grad", name))
        torch.testing.assert_close(category_delta_sc(scan, 0)[:, c], expected)
    shuffled = ScanResult(scan.meta, {
        k: v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))] if ".by_category." in k
        and k.endswith(".grad") else v for k, v in scan.tensors.items()})
    source = load_source(SourceArgs(model=str(tiny_model_dir), device="cpu"))

    def experts(result: ScanResult, share: float) -> list:
        cfg = CarveConfig(scan=str(tiny_scan[0]), experts=4, top_k=2, delta_sc_features=share)
        return [lp.experts.tolist() for lp in make_plan(result, source.model, cfg).layers]

    assert experts(shuffled, 0.0) == experts(scan, 0.0)
    assert experts(shuffled, 2.0) != experts(scan, 2.0)


def test_unknown_shared_score_is_one_clear_error(tiny_scan):
    from tiny_onn.errors import TinyOnnError

    with pytest.raises(TinyOnnError, match="shared_score must be one of importance, s_p"):
        CarveConfig(scan=str(tiny_scan[0]), shared_score="wanda")


def test_lowrank_router_settings_are_checked(tiny_scan):
    from tiny_onn.errors import TinyOnnError

    with pytest.raises(TinyOnnError, match="--router flat"):
        CarveConfig(scan=str(tiny_scan[0]), router="hierarchical", router_score="lowrank")
    with pytest.raises(TinyOnnError, match="--router-input ffn"):
        CarveConfig(scan=str(tiny_scan[0]), router_score="lowrank", router_input="context")
    with pytest.raises(TinyOnnError, match="router_rank must be at least 1"):
        CarveConfig(scan=str(tiny_scan[0]), router_score="lowrank", router_rank=0)


def test_carve_cli_save_load_in_fresh_process(tiny_model_dir, tiny_scan, tmp_path):
    scan_dir, data = tiny_scan
    out = tmp_path / "moe"
    argv = ["carve", "--scan", str(scan_dir), "--model", str(tiny_model_dir), "--experts", "4", "--top-k", "2",
            "--router", "hierarchical", "--groups", "2", "--shared", "0.125", "--calib-tokens", "512",
            "--calib-steps", "20", "--eval-tokens", "256", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    for name in ("config.json", "model.safetensors", "modeling_tiny_onn.py", "configuration_tiny_onn.py",
                 "provenance.json", "README.md", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    prov = json.loads((out / "provenance.json").read_text())
    assert len(prov["layers"]) == 2 and len(prov["layers"][0]["experts"]) == 4
    assert (tmp_path / "carve" / "neurons_umap.png").is_file()
    meta = json.loads((out / "carve.json").read_text())
    assert meta["perplexity"]["carved"]["ppl"] > 0

    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        here = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert "tiny_onn" not in sys.modules, "the exported folder must not need tiny_onn"
        ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.save(model(ids).logits, {str(tmp_path / 'logits.pt')!r})
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        gen = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert gen.shape[1] == ids.shape[1] + 5
        pipe = pipeline("text-generation", model=model, tokenizer=tok)
        text = pipe("hello", max_new_tokens=4, do_sample=False)[0]["generated_text"]
        assert text.startswith("hello")
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    there = torch.load(tmp_path / "logits.pt", weights_only=True)
    torch.testing.assert_close(there, here, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--top-k", "5", "--experts", "4"], "top_k must be between 1 and experts"),
        (["--experts", "100"], "100 experts need at least 100 routed neurons"),
        (["--keep", "0"], "keep must be in (0, 1]"),
        (["--keep", "1.5"], "keep must be in (0, 1]"),
        (["--router", "hierarchical", "--experts", "6", "--groups", "4"], "must be a multiple of groups"),
        (["--method", "magic"], "method must be one of"),
        (["--delta-sc-features", "-1"], "must be non-negative"),
        (["--router-score", "cosine"], "router_score must be one of"),
        (["--router-input", "image"], "router_input must be one of"),
        (["--expert-weighting", "probs", "--router", "gaussian"], "expert_weighting probs is the llama.cpp-exportable"),
    ],
)
def test_carve_bad_input(tiny_model_dir, tiny_scan, tmp_path, capsys, extra, message):
    out = tmp_path / "moe"
    argv = ["carve", "--scan", str(tiny_scan[0]), "--model", str(tiny_model_dir), "--no-plots", "--out", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_scan_from_another_model_is_refused(tiny_scan, tmp_path, capsys, tiny_tokenizer):
    from tests.conftest import make_tiny_model

    other = tmp_path / "other"
    model = make_tiny_model("llama", len(tiny_tokenizer))
    model.config.intermediate_size = 48
    type(model)(model.config).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    out = tmp_path / "moe"
    assert main(["carve", "--scan", str(tiny_scan[0]), "--model", str(other), "--no-plots", "--out", str(out)]) == 2
    assert "scan was made on another model" in capsys.readouterr().err
    assert not out.exists()


def test_missing_or_corrupt_scan(tmp_path, capsys, tiny_scan):
    assert main(["carve", "--scan", str(tmp_path / "nope"), "--out", str(tmp_path / "m")]) == 2
    assert "scan folder not found" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "scan.json").write_text((tiny_scan[0] / "scan.json").read_text())
    (broken / "scan.safetensors").write_bytes(b"garbage")
    assert main(["carve", "--scan", str(broken), "--out", str(tmp_path / "m")]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_lossless_and_seed_preset(smollm2, smollm2_scan, tmp_path):
    cfg = CarveConfig(scan=str(smollm2_scan), experts=16, top_k=16)
    plan = make_plan(ScanResult.load(smollm2_scan), smollm2.model, cfg)
    moe = assemble(smollm2.model, plan, num_experts_per_tok=16)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365]])
    with torch.no_grad():
        dense, carved = smollm2.model(ids).logits, moe(ids).logits
        # fp32 noise floor: the dense model itself, same tokens inside a larger batch (other BLAS blocking)
        floor = (smollm2.model(torch.cat([ids, ids.flip(1)])).logits[:1] - dense).abs().max()
    err = (carved - dense).abs().max()
    # summing 16 expert slices reorders the FFN's float sums; through 30 layers that is noise of the same size
    assert err <= 1e-4 * dense.abs().max(), (err, floor)
    assert err <= 4 * floor.clamp_min(1e-6), (err, floor)

    out = tmp_path / "seed"
    argv = ["carve", "--scan", str(smollm2_scan), "--preset", "seed", "--calib-tokens", "1024", "--calib-steps", "20",
            "--eval-tokens", "0", "--no-plots", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_experts == 100 and model.config.num_expert_groups == 10
    assert model.config.router_type == "hierarchical" and model.config.num_experts_per_tok == 10
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                                   return_tensors="pt")["input_ids"]
    gen = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > prompt.shape[1]
    assert smollm2.tokenizer.decode(gen[0, prompt.shape[1]:]).strip()


def test_generate_cli_with_routing_override(tiny_model_dir, tiny_scan, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["carve", "--scan", str(tiny_scan[0]), "--model", str(tiny_model_dir), "--experts", "4", "--top-k", "2",
                 "--calib-tokens", "256", "--calib-steps", "5", "--eval-tokens", "0", "--no-plots", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "hello", "--max-new-tokens", "4", "--top-k", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["generate", "--model", str(out), "--top-k", "9"]) == 2
    assert "top_k must be between 1 and the model's 4 experts" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model_dir), "--top-k", "2"]) == 2
    assert "this model is dense" in capsys.readouterr().err
    assert main(["scan", "--model", str(out), "--out", str(tmp_path / "s")]) == 2
    assert "needs the dense source model" in capsys.readouterr().err


def test_width_pruned_dense_keeps_the_most_important_neurons(tiny_model_dir, small_jsonl, tmp_path):
    """The control computes exactly the source FFN restricted to the top-n neurons by a·s."""
    from tests.conftest import scan_tiny
    from tiny_onn.carve.baselines import width_pruned_dense
    from tiny_onn.scan import ScanResult
    from tiny_onn.sources import SourceArgs, load_source, swiglu_mlps

    scan = ScanResult.load(scan_tiny(tiny_model_dir, small_jsonl, tmp_path / "scan"))
    src = load_source(SourceArgs(model=str(tiny_model_dir), device="cpu"))
    pruned, kept = width_pruned_dense(src.model, scan, 16)
    assert pruned.config.intermediate_size == 16 and src.model.config.intermediate_size == 64
    x = torch.randn(5, src.model.config.hidden_size)
    for mlp, mlp_p, idx in zip(swiglu_mlps(src.model), swiglu_mlps(pruned), kept, strict=True):
        score = scan.stat(mlp.layer, "act") * scan.stat(mlp.layer, "grad")
        assert sorted(idx) == sorted(score.topk(16).indices.tolist())
        h = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)  # [5, 64]
        expected = h[:, idx] @ mlp.down_proj.weight[:, idx].T
        torch.testing.assert_close(mlp_p.module(x), expected, atol=1e-5, rtol=1e-5)


def _calibration_data(source, data_path, tokens: int = 512):
    from tiny_onn.data import DataArgs, build_dataset

    return build_dataset(source.tokenizer, DataArgs(data=str(data_path), seq_len=32), "train", max_tokens=tokens)


def test_carved_block_inputs_equal_the_dense_ones_for_a_lossless_carve(tiny_model_dir, tiny_scan):
    """Every expert selected: the carved model's own FFN inputs are the dense source's, at every layer."""
    from tiny_onn.carve.calibrate import collect_block_inputs, collect_ffn_inputs

    source, _, moe = _dense_and_moe(tiny_model_dir, tiny_scan[0], experts=4, top_k=4)
    data = _calibration_data(source, tiny_scan[1])
    dense_inputs = collect_ffn_inputs(source.model, data)
    for layer, want in enumerate(dense_inputs):
        torch.testing.assert_close(collect_block_inputs(moe.eval(), data, layer), want, atol=1e-5, rtol=1e-4)


def test_sequential_calibration_fits_each_router_on_the_carved_models_inputs(tiny_model_dir, tiny_scan):
    """Each layer's inputs are what the carved model produces with every earlier router calibrated (recomputed after
    the whole calibration they are unchanged: later layers do not feed earlier ones), and past the first layer they
    differ from the dense source's; the fit is the one-layer calibration on those inputs."""
    from tiny_onn.carve.calibrate import (
        calibrate_layer,
        calibrate_sequentially,
        collect_block_inputs,
        collect_ffn_inputs,
    )

    source, _, moe = _dense_and_moe(tiny_model_dir, tiny_scan[0], experts=4, top_k=1)
    data = _calibration_data(source, tiny_scan[1])
    report, inputs = calibrate_sequentially(moe, data, refine_steps=5)
    assert [r["layer"] for r in report] == list(range(len(moe.model.layers)))
    dense_inputs = collect_ffn_inputs(source.model, data)
    torch.testing.assert_close(inputs[0], dense_inputs[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(inputs[-1], dense_inputs[-1], atol=1e-3)
    for layer, x in enumerate(inputs):
        torch.testing.assert_close(collect_block_inputs(moe, data, layer), x, atol=0, rtol=0)
    # the last router equals a fresh one-layer calibration on the same inputs
    last = moe.model.layers[-1].mlp
    fitted = last.router.weight.detach().clone()
    torch.nn.init.normal_(last.router.weight)
    calibrate_layer(last, inputs[-1], moe.config.num_experts_per_tok, refine_steps=5)
    torch.testing.assert_close(last.router.weight, fitted)


def test_carve_with_carved_calibration_inputs(tiny_model_dir, tiny_scan):
    from tiny_onn.carve import carve_model

    source = load_source(SourceArgs(model=str(tiny_model_dir), device="cpu"))
    cfg = CarveConfig(scan=str(tiny_scan[0]), experts=4, top_k=2, calib_inputs="carved", calib_steps=3)
    moe, _, report = carve_model(ScanResult.load(tiny_scan[0]), source, cfg, _calibration_data(source, tiny_scan[1]))
    assert len(report) == len(moe.model.layers) and all(0.0 <= r["top_k_overlap_with_oracle"] <= 1.0 for r in report)
    with pytest.raises(Exception, match="calib_inputs must be one of dense, carved"):
        CarveConfig(scan=str(tiny_scan[0]), calib_inputs="teacher")


def test_output_bias_is_the_mean_of_what_the_block_leaves_out(tiny_model_dir, tiny_scan, tmp_path):
    """--output-bias: each block's bias equals the mean, over the calibration tokens' FFN inputs, of the dense FFN's
    output minus the block's without it (computed here from the source's SwiGLU weights by hand); with it the block's
    error on those tokens falls by exactly ‖bias‖² per token; it survives save → load; GGUF export refuses it."""
    from tiny_onn.carve import carve_model
    from tiny_onn.carve.calibrate import collect_ffn_inputs
    from tiny_onn.export.to_gguf import target_architecture
    from tiny_onn.model import TinyOnnForCausalLM

    source = load_source(SourceArgs(model=str(tiny_model_dir), device="cpu"))
    data = _calibration_data(source, tiny_scan[1])
    cfg = CarveConfig(scan=str(tiny_scan[0]), experts=4, top_k=1, output_bias=True, calib_steps=3)
    moe, _, report = carve_model(ScanResult.load(tiny_scan[0]), source, cfg, data)
    inputs = collect_ffn_inputs(source.model, data)
    for layer, x in enumerate(inputs):
        mlp = source.model.model.layers[layer].mlp
        with torch.no_grad():
            dense = (torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
            block = moe.model.layers[layer].mlp
            bias = block.output_bias.detach().clone()
            with_bias = block(x[None], routing_outputs=False)[0][0]
        assert bias.abs().max() > 0
        torch.testing.assert_close(bias, (dense - (with_bias - bias)).mean(0), atol=1e-5, rtol=1e-4)
        row = report[layer]
        assert row["relative_mse_after"] < row["relative_mse_before"]
        mse_before = (dense - (with_bias - bias)).pow(2).sum(-1).mean()
        mse_after = (dense - with_bias).pow(2).sum(-1).mean()
        torch.testing.assert_close(mse_before - mse_after, bias.pow(2).sum(), atol=1e-5, rtol=1e-3)
    moe.save_pretrained(tmp_path / "m")
    again = TinyOnnForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(3, moe.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, moe(ids).logits)
    with pytest.raises(TinyOnnError, match="output bias"):
        target_architecture(moe.config.to_dict())


def test_calibration_on_fewer_tokens_than_router_inputs_is_warned_about(caplog):
    from tiny_onn.carve.carver import warn_if_calibration_is_small

    with caplog.at_level("WARNING", logger="tiny_onn.carve.carver"):
        warn_if_calibration_is_small(64, 576)
    assert "64 tokens" in caplog.text and "--calib-tokens" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tiny_onn.carve.carver"):
        warn_if_calibration_is_small(576, 576)
    assert caplog.text == ""


def test_carve_plots_layers_with_a_handful_of_routed_neurons(tiny_model_dir, tiny_scan, tmp_path):
    """One expert of 3 routed neurons per layer (keep 5 % of 64): the neuron map falls back from UMAP (whose spectral
    start needs more points) instead of failing after the model is written."""
    scan_dir, _ = tiny_scan
    argv = ["carve", "--scan", str(scan_dir), "--model", str(tiny_model_dir), "--keep", "0.05", "--experts", "1",
            "--top-k", "1", "--calib-tokens", "128", "--calib-steps", "2", "--eval-tokens", "0", "--seq-len", "32",
            "--device", "cpu", "--out", str(tmp_path / "moe")]
    assert main(argv) == 0
    assert (tmp_path / "carve" / "neurons_umap.png").is_file()


def test_the_2d_neuron_map_has_a_layout_for_any_count():
    from tiny_onn.carve.plots import _embed_2d

    rng = np.random.default_rng(0)
    for n, how in [(0, "index"), (1, "index"), (3, "index"), (5, "t-SNE"), (20, "UMAP")]:
        xy, used = _embed_2d(rng.normal(size=(n, 6)), seed=0)
        assert xy.shape == (n, 2) and used == how


def test_too_few_routed_neurons_get_the_error_alone(tiny_model_dir, tiny_scan, tmp_path, capsys, caplog):
    """keep 5 % of 64 neurons leaves 3 for 4 experts: one error, no warning before it about neurons being dropped."""
    argv = ["carve", "--scan", str(tiny_scan[0]), "--model", str(tiny_model_dir), "--no-plots", "--keep", "0.05",
            "--experts", "4", "--top-k", "1", "--out", str(tmp_path / "moe")]
    with caplog.at_level("WARNING"):
        assert main(argv) == 2
    assert "4 experts need at least 4 routed neurons" in capsys.readouterr().err
    assert "weakest are dropped" not in caplog.text
