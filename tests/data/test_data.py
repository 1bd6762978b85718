"""Data: default mix, jsonl formats and their errors, response-only labels, packing, deterministic split."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import write_jsonl
from tiny_onn.data import IGNORE_INDEX, DataArgs, Example, build_dataset, encode_example, load_examples, split_examples
from tiny_onn.data.sources import arithmetic_examples, default_mix
from tiny_onn.errors import TinyOnnError


def test_default_mix_has_three_real_categories():
    examples = default_mix()
    cats = {e.category for e in examples}
    assert cats == {"chat", "code", "math"}
    assert sum(e.category == "code" for e in examples) == 164  # every HumanEval problem
    assert sum(e.category == "chat" for e in examples) > 3000  # every conversation with a reply


def test_arithmetic_answers_are_exact():
    for ex in arithmetic_examples(200, seed=7):
        answer = ex.messages[1][1]
        work, final = answer.split(". The answer is ")
        lhs, rhs = work.split(" = ")
        a, op, b = lhs.split(" ")
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b), "÷": int(a) // int(b)}[op]
        assert int(rhs) == expected == int(final.rstrip("."))
        if op == "÷":
            assert int(a) % int(b) == 0


def test_labels_cover_exactly_the_assistant_turns(tiny_tokenizer):
    ex = Example((("user", "What is 2 + 2?"), ("assistant", "2 + 2 = 4."), ("user", "And 3 + 3?"), ("assistant", "6.")), "math")
    ids, labels = encode_example(tiny_tokenizer, ex)
    assert len(ids) == len(labels)
    kept = tiny_tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert kept == "2 + 2 = 4.<|im_end|>\n6.<|im_end|>\n"
    assert "What is" not in kept


def test_labels_with_the_real_chat_template(smollm2):
    ex = Example((("user", "Say hi"), ("assistant", "Hi there!")), "chat")
    ids, labels = encode_example(smollm2.tokenizer, ex)
    kept = smollm2.tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert kept.startswith("Hi there!") and "Say hi" not in kept and "system" not in kept


def test_split_is_deterministic_and_disjoint():
    examples = arithmetic_examples(500)
    train, held = split_examples(examples, 0.2)
    train2, held2 = split_examples(list(reversed(examples)), 0.2)
    assert set(held) == set(held2) and set(train) == set(train2)
    assert not set(train) & set(held)
    assert 0.1 < len(held) / len(examples) < 0.3


def test_build_dataset_packs_balanced_categories(tiny_tokenizer):
    data = build_dataset(tiny_tokenizer, DataArgs(seq_len=64), max_tokens=3000)
    assert data.input_ids.shape[1] == 64
    assert data.category_names == ["chat", "code", "math"]
    counts = [int((data.category == c).sum()) for c in range(3)]
    assert min(counts) > 0.5 * max(counts), counts
    pad = data.attention_mask == 0
    assert (data.labels[pad] == IGNORE_INDEX).all() and (data.category[pad] == -1).all()
    held = build_dataset(tiny_tokenizer, DataArgs(seq_len=64), split="heldout", max_tokens=500)
    assert len(held) > 0


def test_jsonl_formats(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"instruction": "Add", "input": "1 and 2", "output": "3", "category": "math"},
    ])
    a, b = load_examples(str(path))
    assert a.category == "mine" and a.messages[1] == ("assistant", "hello")
    assert b.category == "math" and b.messages[0] == ("user", "Add\n\n1 and 2")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no examples"),
        ('{"text": "hello"}\n', "has neither 'messages' nor 'instruction'+'output' (keys found: text)"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no non-empty assistant message"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}\n', "each message needs 'role'"),
        ('{"instruction": "x", "output": "y"}\n{not json\n', ":2: not valid JSON"),
        ("[1, 2]\n", "expected a JSON object"),
    ],
)
def test_bad_jsonl_names_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(TinyOnnError, match=None) as err:
        load_examples(str(path))
    assert message in str(err.value)


def test_missing_data_file(tmp_path):
    with pytest.raises(TinyOnnError, match="data file not found"):
        load_examples(str(tmp_path / "nope.jsonl"))


def test_data_args_are_validated():
    with pytest.raises(TinyOnnError, match="heldout_fraction"):
        DataArgs(heldout_fraction=1.5)
    with pytest.raises(TinyOnnError, match="seq_len"):
        DataArgs(seq_len=1)


def test_seed_orders_training_data_but_never_the_heldout_set(tiny_tokenizer):
    def build(split, seed):
        return build_dataset(tiny_tokenizer, DataArgs(seq_len=64, seed=seed), split=split, max_tokens=1500).input_ids

    assert not torch.equal(build("train", 0), build("train", 1))
    assert torch.equal(build("heldout", 0), build("heldout", 1))  # every run is scored on the same tokens


def test_categories_option_keeps_only_those(tiny_tokenizer, small_jsonl):
    from tiny_onn.data import DataArgs, build_dataset
    from tiny_onn.errors import TinyOnnError

    only_code = build_dataset(tiny_tokenizer, DataArgs(data=str(small_jsonl), seq_len=32, categories="code"), "train")
    assert only_code.category_names == ["code"]
    both = build_dataset(tiny_tokenizer, DataArgs(data=str(small_jsonl), seq_len=32), "train")
    code_id = both.category_names.index("code")
    assert only_code.num_tokens == int((both.category == code_id).sum())
    with pytest.raises(TinyOnnError, match="categories poetry are not in data"):
        build_dataset(tiny_tokenizer, DataArgs(data=str(small_jsonl), seq_len=32, categories="poetry"), "train")
