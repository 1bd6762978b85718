"""The fact generator: exact answers (a hand-checked sample), splits, and one clear error per bad knowledge base."""

from __future__ import annotations

import pytest

from tiny_onn.data import facts as facts_module
from tiny_onn.data.facts import builtin_facts, facts_from_jsonl, load_facts, normalise
from tiny_onn.errors import TinyOnnError

# (question, expected first answer, another accepted answer or None) — checked by hand against an atlas and a
# periodic table, not derived from the code
HAND_CHECKED = [
    ("What is the capital of France?", "Paris", None),
    ("What is the capital of Japan?", "Tokyo", None),
    ("What is the capital of Canada?", "Ottawa", None),
    ("What is the capital of Australia?", "Canberra", None),
    ("What is the capital of Kenya?", "Nairobi", None),
    ("What is the capital of Peru?", "Lima", None),
    ("What is the capital of the United States?", "Washington D.C.", "Washington"),
    ("Madrid is the capital of which country?", "Spain", None),
    ("Bangkok is the capital of which country?", "Thailand", None),
    ("What is the currency of Japan?", "Yen", None),
    ("What is the currency of Switzerland?", "Swiss Franc", "Franc"),
    ("What is the currency of India?", "Indian Rupee", "Rupee"),
    ("What is the currency of the United Kingdom?", "Pound Sterling", "Pound"),
    ("What is the official language of Brazil?", "Portuguese", None),
    ("What is the official language of Austria?", "German", None),
    ("What is the chemical symbol for gold?", "Au", None),
    ("What is the chemical symbol for sodium?", "Na", None),
    ("Which chemical element has the symbol K?", "Potassium", None),
    ("Which chemical element has the symbol Fe?", "Iron", None),
    ("What is the atomic number of carbon?", "6", "six"),
    ("What is the atomic number of oxygen?", "8", "eight"),
]


@pytest.fixture(scope="module")
def by_question():
    return {f.question: f for f in builtin_facts()}


@pytest.mark.parametrize("question,answer,alias", HAND_CHECKED)
def test_generated_answers_are_exact(by_question, question, answer, alias):
    fact = by_question[question]
    assert fact.answers[0] == answer
    if alias is not None:
        assert alias in fact.answers


def test_several_hundred_facts_split_deterministically(by_question):
    facts = builtin_facts()
    assert len(facts) >= 600
    assert {f.kind for f in facts} >= {"capital", "currency", "language", "element_symbol", "atomic_number"}
    train, held = load_facts("builtin", "train"), load_facts("builtin", "eval")
    assert len(train) + len(held) == len(facts)
    assert not {f.uid for f in train} & {f.uid for f in held}
    assert 0.4 < len(held) / len(facts) < 0.6
    assert [f.uid for f in load_facts("builtin", "eval")] == [f.uid for f in held]


def test_no_question_contains_its_answer():
    for f in builtin_facts():
        q = f" {normalise(f.question)} "
        assert not any(f" {normalise(a)} " in q for a in f.answers), f.question


def test_symbols_that_are_english_words_are_left_out(by_question):
    assert "What is the chemical symbol for iodine?" not in by_question  # "I"
    assert by_question["What is the chemical symbol for gold?"].case_sensitive


def test_empty_or_broken_knowledge_base_is_one_clear_error(monkeypatch):
    import countryinfo

    monkeypatch.setattr(countryinfo, "all_countries", lambda: [])
    with pytest.raises(TinyOnnError, match="knowledge base is empty"):
        facts_module.country_facts()

    def broken():
        raise ValueError("Expecting value: line 1 column 1")

    monkeypatch.setattr(countryinfo, "all_countries", broken)
    with pytest.raises(TinyOnnError, match="could not read the countryinfo knowledge base"):
        facts_module.country_facts()


def test_fact_file_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TinyOnnError, match="holds no facts"):
        facts_from_jsonl(empty)
    no_answer = tmp_path / "noanswer.jsonl"
    no_answer.write_text('{"question": "What is the capital of Mali?"}\n')
    with pytest.raises(TinyOnnError, match="noanswer.jsonl:1: no answer"):
        facts_from_jsonl(no_answer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x", "answer": "y"}\n{not json\n')
    with pytest.raises(TinyOnnError, match="bad.jsonl:2: not valid JSON"):
        facts_from_jsonl(bad)
    with pytest.raises(TinyOnnError, match="fact file not found"):
        facts_from_jsonl(tmp_path / "missing.jsonl")
    for name, record, message in [
        ("string_answers", '{"question": "x?", "answers": "two"}', "'answers' a list of them"),
        ("list_answer", '{"question": "x?", "answer": ["a", "b"]}', "'answer' must be a string"),
        ("symbol_answer", '{"question": "x?", "answer": "?!"}', "answer '?!' has no letter or digit"),
        ("nan_answer", '{"question": "x?", "answer": NaN}', "not a finite number"),
        ("string_flag", '{"question": "x?", "answer": "Paris", "case_sensitive": "false"}',
         "'case_sensitive' must be true or false"),
    ]:
        path = tmp_path / f"{name}.jsonl"
        path.write_text(record + "\n")
        with pytest.raises(TinyOnnError) as err:
            facts_from_jsonl(path)
        assert message in str(err.value)
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "Who wrote Hamlet?", "answers": ["Shakespeare", "William Shakespeare"]}\n')
    (fact,) = facts_from_jsonl(good)
    assert fact.answers == ("Shakespeare", "William Shakespeare") and fact.kind == "good"
    # numbers written as floats by tools (pandas writes an int column holding a NaN so) read as a person writes them
    good.write_text('{"question": "Boiling point of water in C?", "answers": [100.0, 1e3, 2.5, 7]}\n')
    (fact,) = facts_from_jsonl(good)
    assert fact.answers == ("100", "1000", "2.5", "7")
    good.write_text('{"question": "Capital of France?", "answer": "Paris", "answers": ["Lyon", "Paris"]}\n'
                    '{"question": "Capital of France?", "answer": "Paris", "answers": ["Lyon"]}\n')  # both: all, once
    (fact,) = facts_from_jsonl(good)
    assert fact.answers == ("Paris", "Lyon")


def test_a_user_fact_that_holds_its_answer_is_kept_with_a_warning(tmp_path, caplog):
    path = tmp_path / "echo.jsonl"
    path.write_text('{"question": "Is Paris the capital of France?", "answer": "Paris"}\n'
                    '{"question": "北京是哪个国家的首都？", "answer": "北京"}\n'  # matched as the scorer matches them
                    '{"question": "서울특별시는 어느 나라의 수도입니까?", "answer": "서울"}\n'  # not a word start: fine
                    '{"question": "What is the capital of Mali?", "answer": "Bamako"}\n')
    with caplog.at_level("WARNING"):
        assert len(facts_from_jsonl(path)) == 4
    assert "2 question(s) hold their own answer" in caplog.text


def test_fact_file_split_field(tmp_path):
    """A record's own "split" decides its split; without one the content hash does; another value is refused."""
    questions = [f"What is the capital of Land{i}?" for i in range(40)]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(f'{{"question": "{q}", "answer": "City"}}\n' for q in questions))
    by_hash = {f.question: f.split for f in facts_from_jsonl(plain)}
    assert set(by_hash.values()) == {"train", "eval"}  # 40 hashes split both ways
    marked = tmp_path / "marked.jsonl"
    marked.write_text("".join(f'{{"question": "{q}", "answer": "City", "split": "{"eval" if i % 2 else "train"}"}}\n'
                              for i, q in enumerate(questions)))
    assert [f.question for f in load_facts(str(marked), "eval")] == questions[1::2]
    assert [f.question for f in load_facts(str(marked), "train")] == questions[::2]
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "Who wrote Hamlet?", "answer": "Shakespeare", "split": "test"}\n')
    with pytest.raises(TinyOnnError, match="wrong.jsonl:1: 'split' must be one of train, eval"):
        facts_from_jsonl(wrong)


def test_eval_refuses_facts_without_an_evaluation_split(tmp_path):
    from tiny_onn.eval.harness import EvalConfig, evaluation_facts

    train_only = tmp_path / "train_only.jsonl"
    train_only.write_text('{"question": "Who wrote Hamlet?", "answer": "Shakespeare", "split": "train"}\n')
    with pytest.raises(TinyOnnError, match="none in their evaluation split"):
        evaluation_facts(EvalConfig(facts=str(train_only)))
