"""GGUF export: the file llama.cpp loads computes what the Hugging Face MoE computes; unexportable models are refused.

Tests that run the GGUF need llama-cpp-python (the `gguf` extra, `make gguf`). Without it they are skipped on a developer
machine and fail under CI (CI=true), so the check is never silently lost there.
"""

from __future__ import annotations

import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tests.conftest import scan_tiny, write_jsonl
from tiny_onn.carve import CarveConfig
from tiny_onn.carve import run as carve
from tiny_onn.cli import main
from tiny_onn.export.to_gguf import permute_for_rope_pairs, repeat_kv_heads

# Tolerances of the logit match, relative to the largest |logit| of the prompt.
# - f32 file, f32 KV cache: the same arithmetic as transformers in float32 up to summation order; measured on SmolLM2
#   carved (30 layers) the worst logit is off by 3e-5 of the range. 1e-3 leaves 30x room and still catches any
#   structural slip (a wrong weighting, an unpermuted q/k, a wrong expert move logits by 10-100 %).
# - f16 file: weights rounded to f16 (relative 2^-11 ≈ 5e-4) and activations converted to f16 for the f16 matmuls,
#   through 30 layers. Measured on SmolLM2 carved: about 1 % of the logit range. 5 % bounds that, and the negative
#   control (the same weights summed with weight 1) lands far outside it. The KV cache is kept in f32 for this check:
#   llama.cpp's default f16 cache adds noise that, in a carved model whose top-2 experts are often nearly tied, switches
#   some routing decisions, and a switched expert moves the logits by far more than rounding does. On the untrained
#   random-split SmolLM2 carve even f16 weight rounding does that (up to ~40 % of the range, f32 cache or not), so the
#   real-model test checks exactness with the f32 file; the tiny models stay within 1 % in f16.
EXACT_RTOL = 1e-3
LOGIT_RTOL = 0.05


def need_llama_cpp():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed: CI must run `make gguf` before the tests")
        pytest.skip("llama-cpp-python not installed (make gguf)")
    from tiny_onn.export import llamacpp

    return llamacpp


@pytest.fixture(scope="module")
def flat_probs_moe(tiny_model_dir, tmp_path_factory):
    """A tiny MoE (Llama or Qwen3 source) carved with a flat router and probability weighting: exportable."""
    root = tmp_path_factory.mktemp("export")
    records = [{"messages": [{"role": "user", "content": f"Hello number {i}, how are you?"},
                             {"role": "assistant", "content": f"I am fine, thanks {i}."}], "category": "chat"}
               for i in range(60)]
    data = write_jsonl(root / "d.jsonl", records)
    scan = scan_tiny(tiny_model_dir, data, root / "scan")
    out = root / "moe"
    carve(CarveConfig(scan=str(scan), model=str(tiny_model_dir), experts=4, top_k=2, shared=0.125, calib_tokens=512,
                      calib_steps=10, eval_tokens=0, plots=False, device="cpu", expert_weighting="probs", out=str(out)))
    return out


def _variant(folder, tmp_path, **changes):
    copy = tmp_path / "variant"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg.update(changes)
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


def _hf_logits(folder, ids, **config_changes):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    for k, v in config_changes.items():
        setattr(model.config, k, v)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_permuted_q_k_give_the_same_rope_scores():
    """HF rotates (i, i+h/2) pairs, llama.cpp's Llama rope (2i, 2i+1): after the permutation, q·k is unchanged."""
    g = torch.Generator().manual_seed(0)
    H, h, D, T = 3, 8, 24, 5
    wq, wk = torch.randn(H * h, D, generator=g), torch.randn(H * h, D, generator=g)
    x = torch.randn(T, D, generator=g)
    theta = 1.0 / 10000 ** (torch.arange(0, h, 2).float() / h)
    ang = torch.arange(T)[:, None].float() * theta[None]  # [T, h/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    q, k = (x @ wq.T).view(T, H, h).transpose(0, 1), (x @ wk.T).view(T, H, h).transpose(0, 1)
    q_hf, k_hf = apply_rotary_pos_emb(q[None], k[None], cos[None], sin[None])

    def rope_adjacent(v):  # llama.cpp's LLAMA_ROPE_TYPE_NORM on [H, T, h]
        a, b = v[..., 0::2], v[..., 1::2]
        out = torch.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()
        return out

    qp = (x @ permute_for_rope_pairs(wq, H).T).view(T, H, h).transpose(0, 1)
    kp = (x @ permute_for_rope_pairs(wk, H).T).view(T, H, h).transpose(0, 1)
    scores_hf = q_hf[0] @ k_hf[0].transpose(-1, -2)
    torch.testing.assert_close(rope_adjacent(qp) @ rope_adjacent(kp).transpose(-1, -2), scores_hf, atol=1e-4, rtol=1e-4)
    # without the permutation the scores differ: the test can fail
    assert not torch.allclose(rope_adjacent(q) @ rope_adjacent(k).transpose(-1, -2), scores_hf, atol=1e-2)


def test_repeated_kv_heads_match_grouped_attention():
    w = torch.arange(4 * 3 * 2, dtype=torch.float32).view(4, 3 * 2).T.contiguous()  # 2 kv heads of 3 dims -> [6, 4]
    rep = repeat_kv_heads(w, n_head=4, n_head_kv=2)  # query heads 0,1 read kv head 0; 2,3 read kv head 1
    assert torch.equal(rep.view(4, 3, 4)[1], w.view(2, 3, 4)[0]) and torch.equal(rep.view(4, 3, 4)[2], w.view(2, 3, 4)[1])


def test_expert_scales_fold_and_reduce_the_routed_error(tiny_model_dir, flat_probs_moe):
    """The carve's fitted scales are folded into down_proj: the saved probability-weighted MoE misses the dense FFN
    (minus the shared expert) by exactly the error the carve reported, which is below the error of 1/p-on-average."""
    from tiny_onn.carve.calibrate import collect_ffn_inputs
    from tiny_onn.data import DataArgs, build_dataset
    from tiny_onn.model import TinyOnnForCausalLM
    from tiny_onn.sources import SourceArgs, load_source

    source = load_source(SourceArgs(model=str(tiny_model_dir), device="cpu"))
    moe = TinyOnnForCausalLM.from_pretrained(flat_probs_moe).eval()
    from tiny_onn.model.export import read_carve_metadata

    reported = [r["expert_scales"] for r in read_carve_metadata(flat_probs_moe)["calibration"]]
    # the carve's own calibration tokens (same data, split, packing and count)
    data = build_dataset(source.tokenizer, DataArgs(data=str(flat_probs_moe.parent / "d.jsonl"), seq_len=256), "train",
                         max_tokens=512)
    inputs = collect_ffn_inputs(source.model, data)
    for layer, row in enumerate(reported):
        block, x = moe.model.layers[layer].mlp, inputs[layer]
        with torch.no_grad():  # the folded router temperature and scales are in the saved weights
            routed = block(x[None])[0][0] - block.shared_expert(x)  # [T, D]
            target = source.model.model.layers[layer].mlp(x) - block.shared_expert(x)
        direct = ((target - routed).pow(2).sum() / target.pow(2).sum()).item()
        assert direct == pytest.approx(row["rel_err_fitted"], rel=2e-3, abs=1e-4)
        assert row["rel_err_fitted"] <= row["rel_err_mean_restoring"] + 1e-9
        assert row["rel_err_fitted"] <= row["rel_err_straight_through"] * 1.05  # never much worse than weight 1
        assert row["scale_min"] > 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"expert_weighting": "straight_through"}, "--expert-weighting probs"),
        ({"router_type": "hierarchical", "num_expert_groups": 2}, "--router flat"),
        ({"router_top_p": 0.5}, "--top-p 0"),
    ],
)
def test_unexportable_models_are_refused(flat_probs_moe, tmp_path, capsys, changes, message):
    folder = _variant(flat_probs_moe, tmp_path, **changes)
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "cannot be exported" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_dense_missing_and_bad_options_are_refused(tiny_model_dir, flat_probs_moe, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(tiny_model_dir), "--out", str(out)]) == 2
    assert "not a carved TinyOnn MoE" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["export", "--model", str(flat_probs_moe), "--quant", "q2_k", "--out", str(out)]) == 2
    assert "quant must be one of" in capsys.readouterr().err
    assert main(["export", "--model", str(flat_probs_moe), "--format", "onnx", "--out", str(out)]) == 2
    assert "format must be one of" in capsys.readouterr().err
    assert not out.exists()


def test_export_writes_the_architecture_and_tensor_types(flat_probs_moe, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(flat_probs_moe), "--quant", "q8_0", "--out", str(out)]) == 0
    assert "GGUF written to" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    config = json.loads((flat_probs_moe / "config.json").read_text())
    arch = reader.fields["general.architecture"].contents()
    assert arch == ("dots1" if config["use_qk_norm"] else "deepseek")
    assert reader.fields[f"{arch}.expert_count"].contents() == 4
    assert reader.fields[f"{arch}.expert_used_count"].contents() == 2
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == "Q8_0"  # rows of 32 fit the blocks
    assert types["blk.0.ffn_down_exps.weight"] == "F16"  # rows of 7 neurons do not: f16 fallback
    n_shared = reader.fields[f"{arch}.expert_shared_count"].contents()
    shexp = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate_shexp.weight")
    assert int(shexp.shape[1]) == n_shared * config["moe_intermediate_size"]  # zero-padded to whole experts


def test_llama_cpp_matches_hf_logits_and_greedy(flat_probs_moe, tiny_tokenizer, tmp_path):
    llamacpp = need_llama_cpp()
    exact, f16 = tmp_path / "m-f32.gguf", tmp_path / "m-f16.gguf"
    assert main(["export", "--model", str(flat_probs_moe), "--quant", "f32", "--out", str(exact)]) == 0
    assert main(["export", "--model", str(flat_probs_moe), "--quant", "f16", "--out", str(f16)]) == 0
    llm_exact = llamacpp.load(exact, n_ctx=256, logits_all=True, f32_kv_cache=True)
    llm = llamacpp.load(f16, n_ctx=256, logits_all=True)
    try:
        for text in ["Hello number 7, how are you? I am fine", "def add3(a, b):\n    return a + b", "What is 12 + 7?"]:
            ids = tiny_tokenizer(text)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # the tokenizer travelled exactly
            ref = _hf_logits(flat_probs_moe, ids)
            scale = np.abs(ref).max()
            err_exact = np.abs(llamacpp.all_logits(llm_exact, ids) - ref).max()
            assert err_exact <= EXACT_RTOL * scale, (text, err_exact, scale)
            got = llamacpp.all_logits(llm, ids)
            assert np.abs(got - ref).max() <= LOGIT_RTOL * scale, (text, np.abs(got - ref).max(), scale)
            assert got[-1].argmax() == ref[-1].argmax()
            # negative control: the same weights summed with weight 1 (straight-through) are far outside the tolerance
            wrong = _hf_logits(flat_probs_moe, ids, expert_weighting="straight_through")
            assert np.abs(got - wrong).max() > 2 * LOGIT_RTOL * scale
        ids = tiny_tokenizer("Hello number 3")["input_ids"]
        model = AutoModelForCausalLM.from_pretrained(flat_probs_moe).eval()
        model.generation_config.eos_token_id = None  # always 16 tokens: llama.cpp's greedy loop does not stop either
        prompt = torch.tensor([ids])  # explicit mask: without eos, generate() would take pad-id tokens for padding
        hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                            do_sample=False)[0, len(ids):]
        assert len(hf) == 16
        assert llamacpp.greedy(llm_exact, ids, 16) == hf.tolist()
        assert llamacpp.greedy(llm, ids, 16) == hf.tolist()
    finally:
        llm.close()
        llm_exact.close()


@pytest.mark.parametrize("quant", ["q8_0", "q4_1"])
def test_quantised_exports_load_and_stay_close(flat_probs_moe, tiny_tokenizer, tmp_path, quant):
    llamacpp = need_llama_cpp()
    out = tmp_path / f"m-{quant}.gguf"
    assert main(["export", "--model", str(flat_probs_moe), "--quant", quant, "--out", str(out)]) == 0
    ids = tiny_tokenizer("Hello number 7, how are you? I am fine")["input_ids"]
    llm = llamacpp.load(out, n_ctx=64, logits_all=True)
    try:
        got = llamacpp.all_logits(llm, ids)
    finally:
        llm.close()
    ref = _hf_logits(flat_probs_moe, ids)
    # random tiny weights quantise badly (4 bits on rows of 32): ask for logits that still track the float model
    corr = np.corrcoef(got.ravel(), ref.ravel())[0, 1]
    assert corr > {"q8_0": 0.99, "q4_1": 0.85}[quant], corr


@pytest.mark.slow
def test_smollm2_moe_in_llama_cpp(smollm2, smollm2_scan, tmp_path):
    """The real model: SmolLM2 carved at 25 % active with the exportable weighting, exported at f16 with the bundled
    GGUF's tokenizer and chat template, matches the HF MoE in llama.cpp on chat prompts and in 16 greedy tokens."""
    llamacpp = need_llama_cpp()
    moe_dir, out = tmp_path / "moe", tmp_path / "moe-f16.gguf"
    assert main(["carve", "--scan", str(smollm2_scan), "--method", "random", "--experts", "14", "--top-k", "2",
                 "--shared", "0.125", "--expert-weighting", "probs", "--calib-tokens", "1024", "--calib-steps", "20",
                 "--eval-tokens", "0", "--no-plots", "--device", "cpu", "--out", str(moe_dir)]) == 0
    assert main(["export", "--model", str(moe_dir), "--quant", "f16", "--out", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "deepseek"
    assert reader.fields["deepseek.expert_shared_count"].contents() == 2  # 192 shared neurons = 2 x 96, no padding
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()
    exact = tmp_path / "moe-f32.gguf"
    assert main(["export", "--model", str(moe_dir), "--quant", "f32", "--out", str(exact)]) == 0
    model = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    model.generation_config.eos_token_id = None
    rounded = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    llm = llamacpp.load(out, n_ctx=256, logits_all=True, f32_kv_cache=True)
    llm_exact = llamacpp.load(exact, n_ctx=256, logits_all=True, f32_kv_cache=True)
    try:
        for question in ["What is the capital of France?", "Write a Python function that adds two numbers.",
                         "What is 12 + 7?"]:
            messages = [{"role": "user", "content": question}]
            text = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]
            # llama.cpp renders the copied chat template and tokenizes it exactly as transformers does
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].numpy()
            scale = np.abs(ref).max()
            err_exact = np.abs(llamacpp.all_logits(llm_exact, ids) - ref).max()
            assert err_exact <= EXACT_RTOL * scale, (question, err_exact, scale)
            with torch.no_grad():
                prompt = torch.tensor([ids])  # explicit mask: <|im_end|> is also the pad id, and eos is off here
                hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                    do_sample=False)[0, len(ids):].tolist()
            assert llamacpp.greedy(llm_exact, ids, 16) == hf, question
            # the f16 file: this untrained random-split carve is chaotic. Rounding its weights to f16 moves even
            # transformers' own logits by ~40 % of their range (near-tied top-2 routing decisions switch), so the
            # tolerance is that sensitivity, measured here: llama.cpp's f16 run may differ from HF fp32 by at most
            # twice what HF fp32 vs HF with the same f16-rounded weights differ.
            with torch.no_grad():
                for name, param in rounded.named_parameters():
                    if param.dim() >= 2 and ".router." not in name:  # the exporter keeps routers in f32
                        param.copy_(param.half().float())
                ref16 = rounded(torch.tensor([ids])).logits[0].numpy()
            got = llamacpp.all_logits(llm, ids)
            assert np.abs(got[-1] - ref[-1]).max() <= 2 * np.abs(ref16[-1] - ref[-1]).max() + LOGIT_RTOL * scale
            assert np.corrcoef(got[-1], ref[-1])[0, 1] > 0.9, question
    finally:
        llm.close()
        llm_exact.close()
