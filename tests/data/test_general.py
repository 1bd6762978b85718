"""The general-text held-out set: bundled English news, every token scored, no overlap with the training mix."""

from __future__ import annotations

import copy

import pytest

from tiny_onn.data import IGNORE_INDEX
from tiny_onn.data.general import build_general_dataset, general_documents
from tiny_onn.data.sources import default_mix
from tiny_onn.errors import TinyOnnError


def test_bundled_news_is_real_english_and_not_in_the_training_mix():
    docs = general_documents("news")
    assert len(docs) == 350  # lee.cor (50) + lee_background.cor (300)
    assert sum(len(d.split()) for d in docs) > 50_000
    mix_text = " ".join(c for ex in default_mix() for _, c in ex.messages)
    assert not any(d[:80] in mix_text for d in docs)


def test_every_token_is_scored_and_budget_respected(tiny_tokenizer):
    data = build_general_dataset(tiny_tokenizer, "news", seq_len=64, max_tokens=1000)
    assert data.num_tokens == 1000
    assert data.category_names == ["general"]
    real = data.attention_mask.bool()
    assert bool((data.labels[real] == data.input_ids[real]).all())
    assert bool((data.labels[~real] == IGNORE_INDEX).all())


def test_own_text_file_and_bad_files(tmp_path, tiny_tokenizer):
    own = tmp_path / "prose.txt"
    own.write_text("The first story is short.\n\nThe second story is shorter.\n")
    assert general_documents(str(own)) == ["The first story is short.", "The second story is shorter."]
    spaced = tmp_path / "spaced.txt"  # the separating line holds spaces: still one blank line between two documents
    spaced.write_text("One story\ngoes on here.\n   \nAnother story\nends.\n")
    assert general_documents(str(spaced)) == ["One story goes on here.", "Another story ends."]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(TinyOnnError, match="holds no text"):
        general_documents(str(empty))
    with pytest.raises(TinyOnnError, match="not found"):
        general_documents(str(tmp_path / "missing.txt"))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80")
    with pytest.raises(TinyOnnError, match="not UTF-8"):
        general_documents(str(binary))


def test_a_byte_order_mark_is_not_text(tmp_path):
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text("First document.\r\n\r\nSecond one.\r\n", encoding="utf-8")
    marked.write_text("First document.\r\n\r\nSecond one.\r\n", encoding="utf-8-sig")
    assert general_documents(str(marked)) == general_documents(str(plain)) == ["First document.", "Second one."]


def test_a_tokenizer_that_adds_a_bos_token_gets_it_on_plain_text_unscored(tiny_tokenizer):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from tiny_onn.data.encoding import encode_plain_text

    backend = copy.deepcopy(tiny_tokenizer.backend_tokenizer)
    bos = backend.token_to_id("<|im_start|>")
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    ids, labels = encode_plain_text(tok, "The quick brown fox.")
    body = tiny_tokenizer("The quick brown fox.", add_special_tokens=False)["input_ids"]
    assert ids == [bos, *body, tok.eos_token_id]
    assert labels == [IGNORE_INDEX, *body, tok.eos_token_id]
    plain_ids, plain_labels = encode_plain_text(tiny_tokenizer, "The quick brown fox.")  # adds no BOS: unchanged
    assert plain_ids == plain_labels == [*body, tiny_tokenizer.eos_token_id]
