"""The distillation corpus: deterministic for a seed, resumes after an interruption without duplicates, usable as
data only with the tokenizer that wrote it."""

from __future__ import annotations

import json

import pytest

from tiny_onn.data import DataArgs, build_dataset
from tiny_onn.data import distil as distil_module
from tiny_onn.data.distil import DistilDataConfig, build_prompts, open_prompts
from tiny_onn.data.facts import load_facts, normalise
from tiny_onn.errors import TinyOnnError


def _cfg(model_dir, out, **kw) -> DistilDataConfig:
    base = dict(model=str(model_dir), device="cpu", prompts="facts,open", max_prompts=10, max_new_tokens=6,
                batch_size=4, temperature=1.0, seed=3, out=str(out))
    return DistilDataConfig(**{**base, **kw})


def _records(folder):
    return [json.loads(line) for line in (folder / "corpus.jsonl").read_text().splitlines()]


def test_prompts_use_training_facts_only_and_never_name_an_eval_subject():
    eval_questions = {f.question for f in load_facts("builtin", "eval")}
    prompts = build_prompts(DistilDataConfig(prompts="facts,open", max_prompts=0))
    facts_part = [p for s, p in prompts if s == "facts"]
    assert facts_part and not set(facts_part) & eval_questions
    eval_text = [f" {normalise(x)} " for f in load_facts("builtin", "eval") for x in (f.question, *f.answers)]
    opens = open_prompts("builtin")  # built once: it filters every topic against the evaluation facts
    used = {t for t in distil_module.TOPICS if any(t in p for p in opens)}
    assert len(used) > 100
    for topic in used:  # e.g. "gold" or "Paris" would be dropped: they name an evaluation fact
        assert not any(f" {normalise(topic)} " in text for text in eval_text), topic
    # interleaved: the first prompts alternate between the sets
    assert [s for s, _ in prompts[:4]] == ["facts", "open", "facts", "open"]


def test_corpus_is_deterministic_and_resumes_without_duplicates(tiny_model_dir, tmp_path, monkeypatch):
    first = distil_module.run(_cfg(tiny_model_dir, tmp_path / "a"))
    second = distil_module.run(_cfg(tiny_model_dir, tmp_path / "b"))
    assert _records(first) == _records(second)
    assert json.loads((first / "corpus.json").read_text())["complete"]

    # interrupt during the second batch, then resume
    real = distil_module.run.__globals__["load_source"]
    calls = {"n": 0}
    import tiny_onn.generate as gen_module

    original = gen_module.generate_batched

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(gen_module, "generate_batched", flaky)
    with pytest.raises(KeyboardInterrupt):
        distil_module.run(_cfg(tiny_model_dir, tmp_path / "c"))
    partial = _records(tmp_path / "c")
    assert len(partial) == 4  # the first batch only
    with (tmp_path / "c" / "corpus.jsonl").open("a") as f:
        f.write('{"index": 4, "set": "fa')  # a line cut by the interruption
    monkeypatch.setattr(gen_module, "generate_batched", original)
    assert real is distil_module.run.__globals__["load_source"]
    distil_module.run(_cfg(tiny_model_dir, tmp_path / "c"))
    resumed = _records(tmp_path / "c")
    assert resumed == _records(first)
    assert [r["index"] for r in resumed] == list(range(10))


def test_resume_drops_a_last_line_cut_inside_a_character(tiny_model_dir, tmp_path):
    """An interruption can cut the last record inside a multi-byte UTF-8 character (records keep non-ASCII text as
    it is): that line is dropped and its batch written again, as for a cut at an ASCII byte."""
    whole = distil_module.run(_cfg(tiny_model_dir, tmp_path / "whole"))
    folder = distil_module.run(_cfg(tiny_model_dir, tmp_path / "cut"))
    lines = (folder / "corpus.jsonl").read_bytes().splitlines(keepends=True)
    (folder / "corpus.jsonl").write_bytes(b"".join(lines[:4]) + '{"index": 4, "set": "open", "x": "ن'.encode()[:-1])
    meta = json.loads((folder / "corpus.json").read_text())
    (folder / "corpus.json").write_text(json.dumps({**meta, "complete": False, "records": 4}))
    distil_module.run(_cfg(tiny_model_dir, tmp_path / "cut"))
    assert _records(folder) == _records(whole)


def test_a_damaged_corpus_is_refused_as_data_and_never_rewritten(tiny_model_dir, tmp_path):
    """Reading a finished corpus as data (scan, train, eval) never writes to it: a damaged line is an error naming
    it, not the end of the data."""
    from tiny_onn.data.distil import corpus_examples

    folder = distil_module.run(_cfg(tiny_model_dir, tmp_path / "corpus"))
    lines = (folder / "corpus.jsonl").read_bytes().splitlines(keepends=True)
    for name, damaged, message in [
        ("middle", b"".join(lines[:2]) + lines[2][:30] + b"\n" + b"".join(lines[3:]), "line 3 of 10 is not a corpus record"),
        ("cut last", b"".join(lines[:-1]) + lines[-1][:30], "holds 9 whole ones and a cut last line"),
        ("lost lines", b"".join(lines[:6]), "gives 10 records, corpus.jsonl holds 6"),
    ]:
        (folder / "corpus.jsonl").write_bytes(damaged)
        with pytest.raises(TinyOnnError, match=message):
            corpus_examples(folder)
        assert (folder / "corpus.jsonl").read_bytes() == damaged, name


def test_the_same_data_by_another_path_resumes(tiny_model_dir, tmp_path, small_jsonl, monkeypatch):
    folder = distil_module.run(_cfg(tiny_model_dir, tmp_path / "corpus", prompts="mix", data=str(small_jsonl),
                                    max_prompts=4))
    monkeypatch.chdir(small_jsonl.parent)
    distil_module.run(_cfg(tiny_model_dir, tmp_path / "corpus", prompts="mix", data=f"./{small_jsonl.name}",
                           max_prompts=8))
    assert json.loads((folder / "corpus.json").read_text())["records"] == 8


def test_other_settings_tokenizer_mismatch_and_unfinished_corpus(tiny_model_dir, tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    folder = distil_module.run(_cfg(tiny_model_dir, tmp_path / "corpus"))
    with pytest.raises(TinyOnnError, match=r"other settings \(seed: 3 -> 4\)"):
        distil_module.run(_cfg(tiny_model_dir, tmp_path / "corpus", seed=4))
    # the corpus is data for the same tokenizer ...
    data = build_dataset(tiny_tokenizer, DataArgs(data=str(folder), seq_len=32, heldout_fraction=0.3), "train")
    assert data.num_tokens > 0 and set(data.category_names) <= {"distil-facts", "distil-open"}
    # ... and refused for another
    other = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    other.add_tokens(["<extra>"])
    with pytest.raises(TinyOnnError, match="tokenizer"):
        build_dataset(other, DataArgs(data=str(folder), seq_len=32), "train")
    meta = json.loads((folder / "corpus.json").read_text())
    (folder / "corpus.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(TinyOnnError, match="unfinished"):
        build_dataset(tiny_tokenizer, DataArgs(data=str(folder), seq_len=32), "train")


def test_resume_refuses_a_corpus_whose_prompts_changed(tiny_model_dir, tmp_path):
    folder = distil_module.run(_cfg(tiny_model_dir, tmp_path / "corpus", max_prompts=4))
    lines = (folder / "corpus.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["messages"][0]["content"] = "a prompt the current settings do not give"
    (folder / "corpus.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    with pytest.raises(TinyOnnError, match="answers other prompts"):
        distil_module.run(_cfg(tiny_model_dir, tmp_path / "corpus", max_prompts=8))


def test_a_smaller_max_prompts_never_cuts_a_corpus(tiny_model_dir, tmp_path):
    folder = distil_module.run(_cfg(tiny_model_dir, tmp_path / "corpus", max_prompts=8))
    before = (folder / "corpus.jsonl").read_bytes()
    with pytest.raises(TinyOnnError, match="holds a corpus of 8 records, more than the 4"):
        distil_module.run(_cfg(tiny_model_dir, tmp_path / "corpus", max_prompts=4))
    assert (folder / "corpus.jsonl").read_bytes() == before


def test_the_same_teacher_by_another_path_resumes(tiny_model_dir, tmp_path, monkeypatch):
    folder = distil_module.run(_cfg(tiny_model_dir, tmp_path / "corpus", max_prompts=4))
    monkeypatch.chdir(tiny_model_dir.parent)
    relative = _cfg(tiny_model_dir, tmp_path / "corpus", max_prompts=8)
    relative.model = tiny_model_dir.name
    distil_module.run(relative)
    meta = json.loads((folder / "corpus.json").read_text())
    assert meta["records"] == 8 and meta["complete"]
    assert meta["settings"]["model"] == str(tiny_model_dir)  # as first given


def test_prompt_sets_are_read_as_a_set_of_names():
    """Spacing and repeats do not make another corpus: the settings a corpus is resumed by are the same."""
    from tiny_onn.data.distil import DistilDataConfig

    assert DistilDataConfig(prompts=" facts , open,,facts").prompts == DistilDataConfig(prompts="facts,open").prompts


def test_a_corpus_trains_on_the_token_ids_the_teacher_wrote(tiny_model_dir, tmp_path, tiny_tokenizer):
    """Training examples from a corpus are its stored ids (the response's the labels), not its decoded text tokenized
    again: a reply cut at --max-new-tokens keeps no end-of-turn label the teacher never wrote."""
    from tiny_onn.data.distil import corpus_examples
    from tiny_onn.data.encoding import IGNORE_INDEX, encode_example

    folder = distil_module.run(_cfg(tiny_model_dir, tmp_path / "c", max_new_tokens=4))
    records = [r for r in _records(folder) if r["response_ids"]]
    examples = corpus_examples(folder)
    assert len(examples) == len(records)
    cut = 0
    for record, example in zip(records, examples, strict=True):
        ids, labels = encode_example(tiny_tokenizer, example)
        prompt, response = record["prompt_ids"], record["response_ids"]
        if record["finished"]:  # the template's end of turn after the end-of-turn token generation stopped at
            response = response + tiny_tokenizer("\n", add_special_tokens=False)["input_ids"]
        else:
            cut += 1
        assert ids == prompt + response
        assert labels == [IGNORE_INDEX] * len(prompt) + response
    assert cut  # four new tokens cut some replies


def test_a_finished_reply_ends_its_turn_as_the_template_does(tiny_tokenizer):
    from tiny_onn.data.encoding import IGNORE_INDEX, encode_example, end_of_turn_ids
    from tiny_onn.data.sources import Example

    end, newline = (tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("<|im_end|>", "\n"))
    assert end_of_turn_ids(tiny_tokenizer) == end + newline  # the fallback template's "<|im_end|>\n"
    chat = (("user", "hi"), ("assistant", "yo"))
    finished = Example(chat, "c", ((5, 6), (7, *end)))
    assert encode_example(tiny_tokenizer, finished) == ([5, 6, 7, *end, *newline],
                                                        [IGNORE_INDEX, IGNORE_INDEX, 7, *end, *newline])
    cut = Example(chat, "c", ((5, 6), (7, 8)))  # stopped by --max-new-tokens: no end of turn to learn
    assert encode_example(tiny_tokenizer, cut) == ([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8])


def test_replies_longer_than_the_teachers_positions_are_warned_of(tiny_model_dir, tmp_path, caplog):
    limit = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    with caplog.at_level("WARNING"):
        distil_module.run(_cfg(tiny_model_dir, tmp_path / "long", max_prompts=4, max_new_tokens=limit))
    assert "the longest prompt plus --max-new-tokens" in caplog.text and f"{limit} trained positions" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        distil_module.run(_cfg(tiny_model_dir, tmp_path / "short", max_prompts=4))
    assert "trained positions" not in caplog.text


def test_resume_regenerates_damage_after_the_last_synced_batch_and_keeps_the_data_as_first_given(
        tiny_model_dir, tmp_path, small_jsonl, monkeypatch):
    """Lines written after corpus.json last counted its records may all be damaged by a crash (not only the last):
    they are generated again. The data file keeps the spelling it was first given, and is recognised from any
    working folder by its recorded absolute path."""
    whole = distil_module.run(_cfg(tiny_model_dir, tmp_path / "whole", prompts="mix", data=str(small_jsonl)))
    folder = distil_module.run(_cfg(tiny_model_dir, tmp_path / "c", prompts="mix", data=str(small_jsonl)))
    lines = (folder / "corpus.jsonl").read_bytes().splitlines(keepends=True)
    (folder / "corpus.jsonl").write_bytes(b"".join(lines[:4]) + b"garbage\n" + b"".join(lines[5:6]))
    meta = json.loads((folder / "corpus.json").read_text())
    (folder / "corpus.json").write_text(json.dumps({**meta, "complete": False, "records": 4}))
    monkeypatch.chdir(small_jsonl.parent)
    distil_module.run(_cfg(tiny_model_dir, tmp_path / "c", prompts="mix", data=f"./{small_jsonl.name}"))
    assert _records(folder) == _records(whole)
    meta = json.loads((folder / "corpus.json").read_text())
    assert meta["settings"]["data"] == str(small_jsonl) and meta["data_path"] == str(small_jsonl.resolve())
    monkeypatch.chdir(tmp_path)  # the first spelling from elsewhere, and the file by another relative path
    distil_module.run(_cfg(tiny_model_dir, tmp_path / "c", prompts="mix", data=str(small_jsonl)))
    relative = small_jsonl.relative_to(tmp_path)  # the fixture writes into this test's folder
    distil_module.run(_cfg(tiny_model_dir, tmp_path / "c", prompts="mix", data=str(relative)))
