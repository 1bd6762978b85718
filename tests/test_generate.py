"""Decoding is the same for every model the tool compares: a folder's own generation settings are set aside when the
tool generates, and a carved MoE keeps its source's settings for its users."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny_onn.carve import CarveConfig, run
from tiny_onn.generate import generate_batched


def test_a_folders_generation_settings_do_not_change_the_tools_decoding(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[5, 6, 7, 8], [9, 10]]
    plain = generate_batched(model, tok, prompts, max_new_tokens=16)
    # a folder setting that certainly changes greedy decoding: the token greedy picks first is suppressed
    model.generation_config.suppress_tokens = [plain[0][0]]
    model.generation_config.repetition_penalty = 5.0  # and an instruct model's usual decoding default
    with torch.no_grad():
        raw = model.generate(torch.tensor([prompts[0]]), max_new_tokens=16, do_sample=False,
                             pad_token_id=tok.pad_token_id or 0)
    assert raw[0, len(prompts[0])].item() != plain[0][0]  # applied as transformers applies it, it changes the reply
    assert generate_batched(model, tok, prompts, max_new_tokens=16) == plain  # set aside by the tool
    assert model.generation_config.repetition_penalty == 5.0  # and restored afterwards


def test_a_carve_keeps_its_sources_generation_settings(tiny_moe, tmp_path):
    moe, _ = tiny_moe
    dense = moe.parent / "dense"
    source = tmp_path / "dense"
    model = AutoModelForCausalLM.from_pretrained(dense)
    model.generation_config.repetition_penalty = 1.3
    model.save_pretrained(source)
    AutoTokenizer.from_pretrained(dense).save_pretrained(source)
    run(CarveConfig(scan=str(moe.parent / "scan"), model=str(source), experts=4, top_k=2, calib_tokens=128,
                    calib_steps=2, eval_tokens=0, plots=False, device="cpu", out=str(tmp_path / "moe")))
    assert json.loads((tmp_path / "moe" / "generation_config.json").read_text())["repetition_penalty"] == 1.3


def test_generate_answers_in_the_conversation_format_eval_scores(tiny_model_dir):
    """`tiny-onn generate` shows the reply `eval --tasks facts` scores: the same chat rendering (the fallback template
    for a tokenizer without one, as here) and the same greedy decoding."""
    from tiny_onn.data.encoding import prompt_ids
    from tiny_onn.generate import GenerateConfig
    from tiny_onn.generate import run as generate

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert not tok.chat_template  # the case the fallback covers
    prompt = "Hello number 3, what is the capital of France?"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    (new,) = generate_batched(model, tok, [prompt_ids(tok, [{"role": "user", "content": prompt}])], max_new_tokens=8)
    shown = generate(GenerateConfig(model=str(tiny_model_dir), prompt=prompt, max_new_tokens=8, device="cpu"))
    assert shown == tok.decode(new, skip_special_tokens=True)


def test_top_k_alone_routes_a_top_p_moe_by_that_top_k(tiny_moe, tmp_path, monkeypatch, caplog):
    """A MoE carved with top-p: `generate --top-k 1` routes every token to one expert (top-p no longer decides), as
    the same model saved with top-p 0 and top-k 1 does; the switch is logged."""
    import shutil

    from tiny_onn.generate import GenerateConfig
    from tiny_onn.generate import run as generate

    moe, _ = tiny_moe
    top_p = tmp_path / "top_p"
    shutil.copytree(moe, top_p)
    config = json.loads((top_p / "config.json").read_text())
    (top_p / "config.json").write_text(json.dumps({**config, "router_top_p": 1.0}))
    fixed = tmp_path / "fixed"
    shutil.copytree(moe, fixed)
    (fixed / "config.json").write_text(json.dumps({**config, "router_top_p": 0.0, "num_experts_per_tok": 1}))
    ask = dict(prompt="Hello number 3", device="cpu", max_new_tokens=8)
    with caplog.at_level("INFO"):
        reply = generate(GenerateConfig(model=str(top_p), top_k=1, **ask))
    assert "routes by top-p 1" in caplog.text
    assert reply == generate(GenerateConfig(model=str(fixed), **ask))
    by_top_p = generate(GenerateConfig(model=str(top_p), **ask))
    assert reply != by_top_p  # top-p 1: every expert
    caplog.clear()
    with caplog.at_level("INFO"):  # both given: top-p decides, and generate says so
        assert generate(GenerateConfig(model=str(top_p), top_k=1, top_p=1.0, **ask)) == by_top_p
    assert "--top-k 1 changes nothing" in caplog.text


def test_generation_never_picks_output_rows_past_the_tokenizer(tiny_tokenizer):
    """Embeddings padded past the tokenizer (as Qwen's): those rows, made the most likely here, are never generated,
    greedy or sampled, so the corpus' ids and text agree."""
    from tests.conftest import make_tiny_model

    n = len(tiny_tokenizer)
    model = make_tiny_model("llama", n + 50)
    with torch.no_grad():
        model.lm_head.weight[n:] *= 50  # the padding rows would win every step
    prompts = [tiny_tokenizer("hello there", add_special_tokens=False)["input_ids"]] * 2
    for temperature in (0.0, 1.0):
        rows = generate_batched(model, tiny_tokenizer, prompts, max_new_tokens=6, temperature=temperature)
        assert all(0 <= t < n for row in rows for t in row) and all(rows)
