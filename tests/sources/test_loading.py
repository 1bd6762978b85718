"""Source loading: the bundled GGUF and its cache, folders, and one clear error for each kind of bad model."""

from __future__ import annotations

import copy
import re
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tests.conftest import make_tiny_model
from tiny_onn.errors import TinyOnnError
from tiny_onn.sources import SourceArgs, load_source, swiglu_mlps


def test_local_folder_loads(tiny_model_dir):
    source = load_source(SourceArgs(model=str(tiny_model_dir), device="cpu"))
    assert len(swiglu_mlps(source.model)) == 2
    assert source.tokenizer.pad_token_id is not None
    assert source.origin.startswith("folder")


def test_missing_model(tmp_path):
    with pytest.raises(TinyOnnError, match="model file not found"):
        load_source(SourceArgs(model=str(tmp_path / "missing.gguf")))
    with pytest.raises(TinyOnnError, match="model not found"):
        load_source(SourceArgs(model=str(tmp_path / "missing_folder")))


def test_folder_without_config(tmp_path):
    with pytest.raises(TinyOnnError, match="no config.json"):
        load_source(SourceArgs(model=str(tmp_path)))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"NOTGGUF" + bytes(100))
    with pytest.raises(TinyOnnError, match="not a GGUF file"):
        load_source(SourceArgs(model=str(bad)))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(TinyOnnError, match="could not read GGUF"):
        load_source(SourceArgs(model=str(truncated)))


def test_non_swiglu_model_is_rejected(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(TinyOnnError, match="activation .gelu_new.\\); Tiny-ONN needs a SwiGLU decoder: decoder models whose MLP is gate_proj"):
        load_source(SourceArgs(model=str(tmp_path)))


def test_4bit_needs_cuda(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(TinyOnnError, match="needs CUDA"):
        load_source(SourceArgs(model=str(tiny_model_dir), load_in_4bit=True))


def test_bad_dtype():
    with pytest.raises(TinyOnnError, match="dtype"):
        SourceArgs(dtype="int3")


def test_swiglu_mlps_finds_qwen3_layers():
    mlps = swiglu_mlps(make_tiny_model("qwen3", 50))
    assert [m.layer for m in mlps] == [0, 1] and mlps[0].num_neurons == 64


@pytest.mark.slow
def test_smollm2_is_cached_and_fast(smollm2):
    # the session fixture built the cache; a second load reads safetensors
    start = time.perf_counter()
    again = load_source(SourceArgs(model="smollm2", device="cpu"))
    assert time.perf_counter() - start < 15
    assert again.architecture["num_layers"] == 30 and again.architecture["intermediate_size"] == 1536
    ids = torch.tensor([[1, 9690, 198, 2683]])
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, smollm2.model(ids).logits)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, tiny_tokenizer):
    folder = tmp_path / "m"
    make_tiny_model("llama", len(tiny_tokenizer)).save_pretrained(folder)
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_tokens([f"extra{i}" for i in range(5)])
    tok.save_pretrained(folder)
    with pytest.raises(TinyOnnError, match=f"has {len(tiny_tokenizer) + 5} tokens but the model's embedding only "
                                           f"{len(tiny_tokenizer)} rows"):
        load_source(SourceArgs(model=str(folder), device="cpu"))


def test_a_tokenizer_without_pad_or_eos_token_gets_a_pad_id(tmp_path, tiny_tokenizer):
    folder = tmp_path / "m"
    make_tiny_model("llama", len(tiny_tokenizer)).save_pretrained(folder)
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token, tok.eos_token = None, None
    tok.save_pretrained(folder)
    source = load_source(SourceArgs(model=str(folder), device="cpu"))
    assert source.tokenizer.pad_token_id == 0 and source.tokenizer.eos_token_id is None


def test_lengths_past_the_trained_positions_are_warned_about(caplog):
    from types import SimpleNamespace

    from tiny_onn.sources.loading import warn_if_beyond_positions

    config = SimpleNamespace(max_position_embeddings=64)
    with caplog.at_level("WARNING", logger="tiny_onn.sources.loading"):
        warn_if_beyond_positions(config, 64, "--seq-len")
        assert caplog.text == ""
        warn_if_beyond_positions(config, 256, "--seq-len")
    assert "--seq-len of 256 tokens is past this model's 64 trained positions" in caplog.text


def test_weights_that_do_not_fit_the_config_are_named(tiny_moe, tmp_path):
    """transformers reports a shape mismatch only in a log; the error names the tensors and both shapes."""
    import json
    import shutil

    import pytest

    from tiny_onn.errors import TinyOnnError
    from tiny_onn.sources import SourceArgs, load_source

    folder = tmp_path / "moe"
    shutil.copytree(tiny_moe[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["moe_intermediate_size"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TinyOnnError, match=r"do not have the shapes its config.json gives \(model\.layers\.0\.") as err:
        load_source(SourceArgs(model=str(folder), device="cpu"), dense_only=False)
    assert "config [" in str(err.value) and "above report" not in str(err.value)


def test_sources_that_are_not_swiglu_or_already_moe_are_named_for_what_they_are():
    """The refusal states the model's real activation, wherever its family keeps it, and names a MoE source a MoE."""
    import pytest
    from transformers import FalconConfig, Gemma2Config, LlamaConfig, MixtralConfig

    from tiny_onn.errors import TinyOnnError
    from tiny_onn.sources.architecture import check_config_is_swiglu

    check_config_is_swiglu(LlamaConfig(), "llama")  # SiLU-gated: accepted
    for config, shown in ((Gemma2Config(), "activation 'gelu_pytorch_tanh'"), (FalconConfig(), "activation 'gelu'"),
                          (MixtralConfig(), "already a mixture of experts (8 experts)")):
        with pytest.raises(TinyOnnError, match=re.escape(shown)):
            check_config_is_swiglu(config, "m")


def test_a_model_whose_own_forward_fails_gets_one_clear_error(tiny_model_dir, monkeypatch):
    """A checkpoint that loads but that its modeling code cannot run (as Helium with some head sizes) is named at load
    time, with the model's own error, before any stage starts."""
    from tiny_onn.sources import loading

    real = loading.AutoModelForCausalLM.from_pretrained

    def loads_but_cannot_run(*args, **kwargs):
        model, info = real(*args, **kwargs)

        def broken(*a, **k):
            raise RuntimeError("shape '[1, 2, 4, 9]' is invalid for input of size 64")

        model.forward = broken
        return model, info

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", loads_but_cannot_run)
    with pytest.raises(TinyOnnError, match=r"its own forward pass fails on two tokens \(RuntimeError: shape"):
        load_source(SourceArgs(model=str(tiny_model_dir), device="cpu"))


@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_weights_missing_tensors_or_holding_more_layers_are_refused(tiny_model_dir, tiny_moe, tmp_path):
    """transformers leaves tensors absent from the file randomly initialised (and drops layers past the config's
    count) with a log line only: a model folder like that is refused by name, dense source or carved MoE."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    def damaged(source, name: str, edit) -> str:
        folder = tmp_path / name
        shutil.copytree(source, folder)
        edit(folder)
        return str(folder)

    def drop(key_part: str):
        def edit(folder):
            weights = load_file(folder / "model.safetensors")
            gone = [k for k in weights if key_part in k]
            assert gone
            save_file({k: v for k, v in weights.items() if k not in gone}, folder / "model.safetensors",
                      metadata={"format": "pt"})
        return edit

    def layers(delta: int):
        def edit(folder):
            config = json.loads((folder / "config.json").read_text())
            config["num_hidden_layers"] += delta
            (folder / "config.json").write_text(json.dumps(config))
        return edit

    cases = [
        (damaged(tiny_model_dir, "dense-no-up", drop("layers.1.mlp.up_proj")), True, "lack 1 tensor.*layers.1.mlp.up_proj.*was config.json edited"),
        (damaged(tiny_model_dir, "dense-more-layers", layers(1)), True, r"lack \d+ tensor.*model.layers.2"),
        (damaged(tiny_model_dir, "dense-fewer-layers", layers(-1)), True, "layers past the 1 its config.json gives"),
        (damaged(tiny_moe[0], "moe-no-router", drop("layers.0.mlp.router")), False, "lack .*layers.0.mlp.router"),
    ]
    for folder, dense_only, message in cases:
        with pytest.raises(TinyOnnError, match=message):
            load_source(SourceArgs(model=folder, device="cpu"), dense_only=dense_only)
    load_source(SourceArgs(model=str(tiny_model_dir), device="cpu"))  # the intact folders load
    load_source(SourceArgs(model=str(tiny_moe[0]), device="cpu"), dense_only=False)


@pytest.mark.slow
def test_a_gguf_lacking_a_tensor_is_refused_before_it_is_cached(tmp_path, monkeypatch):
    """transformers' GGUF reader fills a tensor absent from the file with random values and only logs it; the cache
    would then keep them as the model's. The bundled SmolLM2 GGUF copied without one FFN tensor is refused."""
    import gguf

    from tiny_onn.sources.loading import smollm2_gguf_path

    monkeypatch.setenv("TINY_ONN_CACHE", str(tmp_path / "cache"))
    reader = gguf.GGUFReader(smollm2_gguf_path())
    out = tmp_path / "no-ffn-up.gguf"
    writer = gguf.GGUFWriter(str(out), arch=reader.fields["general.architecture"].contents(),
                             endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    kept = [t for t in reader.tensors if t.name != "blk.1.ffn_up.weight"]
    assert len(kept) == len(reader.tensors) - 1
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    with pytest.raises(TinyOnnError, match=r"lack 1 tensor.*layers\.1\.mlp\.up_proj.*GGUF file is damaged"):
        load_source(SourceArgs(model=str(out), device="cpu"))
    assert not list((tmp_path / "cache").glob("sources/*/model.safetensors"))
