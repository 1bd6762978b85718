"""Shared fixtures: a tiny trained BPE tokenizer, tiny random Llama/Qwen3 model folders, and the real SmolLM2 (slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

# no hub from tests: everything they load is local (and CI machines have no network)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

_TEXT = [
    "Hello, how are you doing today? I am fine, thanks for asking.",
    "def add(a, b):\n    return a + b\n",
    "What is 12 + 7? 12 + 7 = 19. The answer is 19.",
    "The quick brown fox jumps over the lazy dog.",
] * 20


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def tiny_config(arch: str, vocab_size: int):
    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=2, tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=8, **common)
    raise ValueError(arch)


def make_tiny_model(arch: str, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    cls = LlamaForCausalLM if arch == "llama" else Qwen3ForCausalLM
    model = cls(tiny_config(arch, vocab_size))
    # bigger than default init so activations and gradients are far from zero and differences are visible
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="session", params=["llama", "qwen3"])
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    make_tiny_model(request.param, len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def small_jsonl(tmp_path) -> Path:
    records = []
    for i in range(40):
        records.append({"messages": [{"role": "user", "content": f"Hello number {i}, how are you?"},
                                     {"role": "assistant", "content": f"I am fine, thanks {i}."}], "category": "chat"})
        records.append({"instruction": f"Write add{i}", "input": "", "output": f"def add{i}(a, b):\n    return a + b\n",
                        "category": "code"})
    return write_jsonl(tmp_path / "small.jsonl", records)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (dequantized once into the cache, then loaded in about a second)."""
    from tiny_onn.sources import SourceArgs, load_source

    return load_source(SourceArgs(model="smollm2", device="cpu"))


@pytest.fixture(scope="session")
def smollm2_scan(tmp_path_factory) -> Path:
    """A small real scan of SmolLM2 on the default mix (shared by the scan and carve tests)."""
    from tiny_onn.scan import ScanConfig, run

    out = tmp_path_factory.mktemp("smollm2-scan") / "scan"
    run(ScanConfig(model="smollm2", device="cpu", tokens=768, seq_len=128, batch_size=4, fingerprint_tokens=64, out=str(out)))
    return out


def scan_tiny(model_dir: Path, data: Path, out: Path) -> Path:
    from tiny_onn.scan import ScanConfig, run

    run(ScanConfig(model=str(model_dir), data=str(data), device="cpu", tokens=100000, seq_len=32, batch_size=4,
                   fingerprint_tokens=32, out=str(out)))
    return out


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory, tiny_tokenizer) -> tuple[Path, Path]:
    """A carved MoE of a tiny random Llama (4 experts, top-2, hierarchical, shared expert) and its jsonl data."""
    from tiny_onn.carve import CarveConfig, run

    root = tmp_path_factory.mktemp("tiny-moe")
    dense = root / "dense"
    make_tiny_model("llama", len(tiny_tokenizer)).save_pretrained(dense)
    tiny_tokenizer.save_pretrained(dense)
    records = []
    for i in range(80):
        records.append({"messages": [{"role": "user", "content": f"Hello number {i}, how are you?"},
                                     {"role": "assistant", "content": f"I am fine, thanks {i}."}], "category": "chat"})
        records.append({"instruction": f"Write add{i}", "output": f"def add{i}(a, b):\n    return a + b\n",
                        "category": "code"})
    data = write_jsonl(root / "data.jsonl", records)
    scan = scan_tiny(dense, data, root / "scan")
    run(CarveConfig(scan=str(scan), model=str(dense), experts=4, top_k=2, shared=0.125, router="hierarchical", groups=2,
                    calib_tokens=512, calib_steps=10, eval_tokens=0, plots=False, device="cpu", out=str(root / "moe")))
    return root / "moe", data
