"""Fact matching is strict, retention is computed against the stored dense-known set, batched answers are exact."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_onn.data.facts import Fact
from tiny_onn.eval.facts import KnownFacts, answer_facts, answer_matches, fact_key, facts_scores, first_sentence

GOLD = Fact("element_symbol", "What is the chemical symbol for gold?", ("Au",), case_sensitive=True)
SEVEN = Fact("count", "How many days are in a week?", ("7", "seven"))
ROME = Fact("capital", "What is the capital of Italy?", ("Rome",))
PARIS = Fact("capital", "What is the capital of France?", ("Paris",))
DC = Fact("capital", "What is the capital of the United States?", ("Washington D.C.", "Washington"))
SAO = Fact("capital", "What is the capital of São Tomé and Príncipe?", ("São Tomé",))
GEORGE = Fact("capital", "What is the capital of Grenada?", ("St. George's",))
MOSCOW = Fact("capital", "Какая столица России?", ("Москва",))
BEIJING = Fact("capital", "中国的首都是哪里？", ("北京",))
C_LANG = Fact("language", "Which language is the letter before D?", ("C",))
CPP = Fact("language", "Which language did Stroustrup create?", ("C++",))
ZLOTY = Fact("currency", "What is the currency of Poland?", ("Złoty",))
MINUS = Fact("number", "What is 2 - 7?", ("-5",))
HYDROGEN = Fact("element_number", "What is the atomic number of hydrogen?", ("1",))
HALF = Fact("number", "What is 1 divided by 2?", ("1/2", "0.5"))
SEOUL = Fact("capital", "한국의 수도는 어디입니까?", ("서울",))
INDIA = Fact("country", "타지마할은 어느 나라에 있습니까?", ("인도",))


@pytest.mark.parametrize("fact,reply", [
    (GOLD, "I don't know, because it is rare."),  # "au" inside "because"
    (GOLD, "The symbol is AU."),  # symbols are case-sensitive
    (SEVEN, "There are 17 days."),
    (ROME, "Romeo and Juliet is set in Verona."),
    (PARIS, "I am not sure. The capital of France is Paris."),  # only the first sentence counts
    (PARIS, "Parisian cafés are famous."),
    (MOSCOW, "Столица — Москвабург."),  # a longer word of another script
    (BEIJING, "我不知道。首都是北京。"),  # only the first sentence counts, ended by 。
    (C_LANG, "It is C++."),  # "C" is not "C++"
    (CPP, "It is C."),
    (MINUS, "The answer is 5."),  # the sign is part of the number
    (HYDROGEN, "Its atomic mass is 1.008."),  # "1" is not "1.008"
    (HALF, "It is 1 2."),  # "1 2" is not "1/2"
    (SEOUL, "수도서울입니다."),  # a Hangul answer must start a word
    (SEOUL, "부산입니다."),
    (INDIA, "인도네시아입니다."),  # Indonesia is not India: only particles may follow the answer
])
def test_matcher_rejects_substrings_and_later_sentences(fact, reply):
    assert not answer_matches(reply, fact)


@pytest.mark.parametrize("fact,reply", [
    (PARIS, "Paris."),
    (PARIS, "It's PARIS!"),
    (PARIS, "The capital of France is Paris, a city of museums. It has the Louvre."),
    (PARIS, "\n\nParis is the capital of France."),
    (GOLD, "The chemical symbol for gold is Au."),
    (SEVEN, "A week has seven days."),
    (SEVEN, "There are 7 days in a week."),
    (DC, "The capital of the United States is Washington, D.C. It is on the Potomac."),
    (SAO, "The capital is Sao Tome."),
    (GEORGE, "St. George's is the capital of Grenada."),
    (MOSCOW, "Столица России — Москва."),
    (MOSCOW, "МОСКВА"),
    (BEIJING, "首都是北京。"),  # no spaces between words: matched within the text
    (CPP, "Stroustrup created C++ in 1985."),
    (C_LANG, "C, of course."),
    (ZLOTY, "The currency is the zloty."),
    (MINUS, "2 - 7 = -5."),
    (MINUS, "It is −5, a negative number."),  # the minus sign U+2212
    (HYDROGEN, "Hydrogen has atomic number 1."),
    (HALF, "It is 0.5."),
    (HALF, "That makes 1/2."),
    (SEOUL, "대한민국의 수도는 서울입니다."),  # Korean attaches particles to the word
    (INDIA, "인도에 있습니다."),
    (INDIA, "인도"),
])
def test_matcher_accepts_varied_phrasing(fact, reply):
    assert answer_matches(reply, fact)


def test_first_sentence_keeps_initials_and_decimals():
    assert first_sentence("It is Washington, D.C. and more. Second.") == "It is Washington, D.C. and more."
    assert first_sentence("Pi is 3.14 roughly. Yes.") == "Pi is 3.14 roughly."


def test_retention_uses_the_stored_dense_known_set(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("TINY_ONN_CACHE", str(tmp_path / "cache"))
    facts = [Fact("k", f"Question {i}?", (f"answer{i}",)) for i in range(5)]
    store = KnownFacts(str(tiny_model_dir))
    # the dense source answered facts 0, 1, 2 correctly, 3 and 4 wrongly
    store.add([{"key": fact_key(f), "correct": i < 3} for i, f in enumerate(facts)])
    reloaded = KnownFacts(str(tiny_model_dir))  # read back from disk
    assert reloaded.path == store.path and reloaded.path.is_file()
    assert reloaded.known(facts) == {fact_key(f) for f in facts[:3]}
    # a MoE keeps fact 0, loses 1 and 2, and gets fact 4 (not dense-known) right
    answers = [{"key": fact_key(f), "kind": "k", "correct": i in (0, 4)} for i, f in enumerate(facts)]
    scores = facts_scores(answers, reloaded.known(facts))
    assert scores["accuracy"] == pytest.approx(2 / 5)
    assert scores["known"] == 3 and scores["retained"] == 1 and scores["retention"] == pytest.approx(1 / 3)
    stored = json.loads(store.path.read_text())
    assert stored["source"] == str(tiny_model_dir) and len(stored["results"]) == 5


def test_source_identity_follows_the_weights_not_the_path(tmp_path, tiny_model_dir):
    import shutil

    from tiny_onn.eval.facts import source_identity

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert source_identity(str(copy)) == source_identity(str(tiny_model_dir))
    from safetensors.torch import load_file, save_file

    state = load_file(copy / "model.safetensors")
    first = next(iter(state))
    state[first] = state[first] + 1
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    assert source_identity(str(copy)) != source_identity(str(tiny_model_dir))


def test_source_identity_reads_weights_of_any_format_and_the_chat_template(tmp_path, tiny_model_dir):
    """Two .bin-only models with one config are two sources (each gets its own dense-known set), and so is the same
    model with another chat template (its answers differ)."""
    import json as _json
    import shutil

    import torch
    from safetensors.torch import load_file

    from tiny_onn.eval.facts import source_identity

    ids = []
    for i in range(2):
        folder = tmp_path / f"bin{i}"
        shutil.copytree(tiny_model_dir, folder)
        state = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        first = next(iter(state))
        state[first] = state[first] + i
        torch.save(state, folder / "pytorch_model.bin")
        ids.append(source_identity(str(folder)))
    assert ids[0] != ids[1]
    config = tmp_path / "bin1" / "tokenizer_config.json"
    settings = _json.loads(config.read_text())
    settings["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config.write_text(_json.dumps(settings))
    assert source_identity(str(tmp_path / "bin1")) != ids[1]


def test_batched_answers_equal_one_by_one(tiny_moe, tiny_tokenizer):
    """Left padding must not change greedy replies, for a dense model and for a MoE (routing is per token)."""
    from tiny_onn.sources import SourceArgs, load_source

    moe_dir, _ = tiny_moe
    questions = [Fact("k", q, ("x",)) for q in ("Hello?", "What is 12 + 7? Tell me now.", "def add", "Hi number 3")]
    for spec in (str(moe_dir.parent / "dense"), str(moe_dir)):
        src = load_source(SourceArgs(model=spec, device="cpu"), dense_only=False)
        torch.manual_seed(0)
        together = answer_facts(src.model, src.tokenizer, questions, max_new_tokens=8, batch_size=4, desc=None)
        alone = [answer_facts(src.model, src.tokenizer, [q], max_new_tokens=8, batch_size=1, desc=None)[0]
                 for q in questions]
        assert [a["reply"] for a in together] == [a["reply"] for a in alone]


def test_wilson_interval_matches_published_values():
    from tiny_onn.eval.facts import wilson_interval

    # 5 of 10: the textbook 95 % Wilson interval (0.2366, 0.7634); 0 of 10: upper bound z²/(n + z²)
    lo, hi = wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1.96**2 / (10 + 1.96**2))
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + 1.96**2))


def test_retention_is_undefined_when_the_source_knows_none_of_the_facts():
    answers = [{"key": "a", "kind": "capital", "correct": True}, {"key": "b", "kind": "capital", "correct": False}]
    scores = facts_scores(answers, known=set())
    assert scores["known"] == 0 and scores["retention"] is None and scores["retention_ci95"] is None
    assert scores["accuracy"] == 0.5
    scores = facts_scores(answers, known={"a", "b"})
    assert scores["retention"] == 0.5 and scores["retained"] == 1
