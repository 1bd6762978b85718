"""Bad inputs across the CLI: each gives one clear line on stderr, a non-zero exit, and leaves no artifact behind."""

from __future__ import annotations

import gzip
import shutil

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from tests.conftest import make_tiny_model
from tiny_onn.cli import main


@pytest.fixture(scope="module")
def world(tiny_moe, tmp_path_factory):
    """Paths to good and bad inputs, built once."""
    moe, data = tiny_moe
    root = tmp_path_factory.mktemp("bad")
    gpt2 = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    (root / "corrupt.gguf").write_bytes(b"GGUF" + bytes(64))
    (root / "empty.jsonl").write_text("")
    (root / "fields.jsonl").write_text('{"body": "hello"}\n')
    (root / "bad.yaml").write_text("scan: [unclosed\n")
    (root / "unknown.yaml").write_text("scan:\n  tokenz: 3\n")
    (root / "badtype.yaml").write_text("scan:\n  tokens: many\n")
    (root / "section.yaml").write_text("Scan:\n  tokens: 3\n")  # a misspelt section
    (root / "questions.yaml").write_text("alchemy:\n  questions: What is 12 + 7?\n")  # one string, not a list
    (root / "export_section.yaml").write_text("export:\n  quant: q4_0\n")  # a section alchemy does not run
    (root / "few_experts.yaml").write_text("carve:\n  experts: 2\n  top_k: 1\ntrain:\n  policy: smk2\n  max_k: 4\n")
    (root / "list_model.yaml").write_text("scan:\n  model: [a, b]\n")  # a list for a plain string option
    (root / "number_key.yaml").write_text("scan:\n  tokens: 3\n  1: 2\n")  # YAML reads 1 (and on, yes) as no name
    (root / "alchemy_resume.yaml").write_text("train:\n  resume: true\n")
    (root / "alchemy_top_k_start.yaml").write_text("carve:\n  experts: 4\n  top_k: 2\ntrain:\n  top_k_start: 10\n")
    (root / "tiny.txt").write_text("Hello world, this is some text.\n")
    (root / "arc_key.jsonl").write_text('{"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, '
                                        '"answerKey": "C"}\n')
    other = root / "other_dense"  # the same shape as the MoE's source, other weights
    make_tiny_model("llama", _vocab(moe), seed=7).save_pretrained(other)
    shutil.copy(moe / "tokenizer.json", other / "tokenizer.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (moe / name).is_file():
            shutil.copy(moe / name, other / name)
    (root / "latin1.jsonl").write_bytes('{"question": "Caf\xe9?", "answer": "oui"}\n'.encode("latin-1"))
    (root / "noconfig").mkdir()
    (root / "data.jsonl.gz").write_bytes(gzip.compress(data.read_bytes()))
    (root / "array.json").write_text('[\n  {"question": "x?", "answer": "y"}\n]\n')  # pretty-printed JSON, not jsonl
    (root / "mc_list.jsonl").write_text('["Q?", "a", "b"]\n')
    broken_scan = root / "broken_scan"
    shutil.copytree(moe.parent / "scan", broken_scan)
    (broken_scan / "scan.safetensors").write_bytes(b"\x00" * 10)
    broken_moe = root / "broken_moe"
    shutil.copytree(moe, broken_moe)
    (broken_moe / "model.safetensors").write_bytes(b"not safetensors")
    return {"moe": moe, "data": data, "dense": moe.parent / "dense", "scan": moe.parent / "scan", "root": root,
            "gpt2": gpt2, "broken_scan": broken_scan, "broken_moe": broken_moe, "other": other}


def _vocab(moe) -> int:
    import json

    return json.loads((moe / "config.json").read_text())["vocab_size"]


CASES = {
    "scan: missing .gguf": (["scan", "--model", "{root}/missing.gguf"], "model file not found"),
    "scan: folder without config": (["scan", "--model", "{root}/noconfig"], "no config.json"),
    "scan: not a SwiGLU model": (["scan", "--model", "{gpt2}"], "needs a SwiGLU decoder"),
    "scan: corrupt GGUF": (["scan", "--model", "{root}/corrupt.gguf"], "could not read GGUF"),
    "scan: missing data": (["scan", "--model", "{dense}", "--data", "{root}/none.jsonl"], "data file not found"),
    "scan: empty data": (["scan", "--model", "{dense}", "--data", "{root}/empty.jsonl"], "holds no examples"),
    "scan: unknown data fields": (["scan", "--model", "{dense}", "--data", "{root}/fields.jsonl"], "keys found: body"),
    "scan: tokens out of range": (["scan", "--tokens", "-5"], "tokens must be positive"),
    "scan: bad positions": (["scan", "--positions", "sideways"], "positions must be one of"),
    "scan: invalid YAML": (["scan", "--config", "{root}/bad.yaml"], "is not valid YAML"),
    "scan: unknown option in YAML": (["scan", "--config", "{root}/unknown.yaml"], "unknown option(s)"),
    "scan: a number as an option name in YAML": (["scan", "--config", "{root}/number_key.yaml"],
                                                 "1 (int) is not an option name"),
    "alchemy: train's own resume": (["alchemy", "--config", "{root}/alchemy_resume.yaml"],
                                    "alchemy resumes its stages itself"),
    "alchemy: top_k_start beyond the carve's experts": (["alchemy", "--config", "{root}/alchemy_top_k_start.yaml"],
                                                        "top_k_start 10 must lie between carve's top_k (2)"),
    "alchemy: questions as one string": (["alchemy", "--config", "{root}/questions.yaml"],
                                         "questions must be a list of non-empty strings"),
    "alchemy: smk2 updating more experts than the carve makes": (["alchemy", "--config", "{root}/few_experts.yaml"],
                                                                "updates max_k = 4 experts per layer, but carve makes 2"),
    "carve: exportable weighting with an output bias": (["carve", "--scan", "{scan}", "--expert-weighting", "probs",
                                                         "--output-bias"], "drop one of them"),
    "alchemy: a section it does not run": (["alchemy", "--config", "{root}/export_section.yaml"],
                                           "section 'export' is not read here"),
    "scan: misspelt YAML section": (["scan", "--config", "{root}/section.yaml"], "section 'Scan' is not read here"),
    "scan: a MoE as source": (["scan", "--model", "{moe}"], "needs the dense source model"),
    "carve: missing scan": (["carve", "--scan", "{root}/noscan"], "scan folder not found"),
    "carve: corrupted scan": (["carve", "--scan", "{broken_scan}"], "corrupt or truncated"),
    "carve: a model folder as scan": (["carve", "--scan", "{moe}"], "scan meta data not found"),
    "carve: scan of another model": (["carve", "--scan", "{scan}", "--model", "{moe}"], "needs the dense source model"),
    "carve: scan of another model of the same shape": (["carve", "--scan", "{scan}", "--model", "{other}"],
                                                         "their weights differ"),
    "carve: top-k above experts": (["carve", "--scan", "{scan}", "--experts", "4", "--top-k", "6"], "top_k must be"),
    "carve: more experts than neurons": (["carve", "--scan", "{scan}", "--model", "{dense}", "--experts", "500"],
                                         "500 experts need at least 500"),
    "carve: preset and a layout option": (["carve", "--scan", "{scan}", "--preset", "seed", "--experts", "4"],
                                          "--preset seed sets experts = 100, but experts = 4 was also given"),
    "carve: no PCA components": (["carve", "--scan", "{scan}", "--pca-dims", "0"], "pca_dims positive"),
    "carve: keep out of range": (["carve", "--scan", "{scan}", "--keep", "1.2"], "keep must be in (0, 1]"),
    "train: a dense model": (["train", "--model", "{dense}", "--data", "{data}"], "only --policy full applies"),
    "train: max-k above experts": (["train", "--model", "{moe}", "--data", "{data}", "--max-k", "99"],
                                   "larger than the model's 4 experts per layer: give --max-k 4"),
    "train: top-p above 1": (["train", "--model", "{moe}", "--data", "{data}", "--top-p", "1.5"], "top_p must be in"),
    "train: negative warm-up": (["train", "--model", "{moe}", "--data", "{data}", "--warmup-steps", "-2"],
                                "warmup_steps must be non-negative"),
    "train: zero learning rate": (["train", "--model", "{moe}", "--data", "{data}", "--lr", "0"],
                                  "--lr must be positive, got 0.0"),
    "train: negative EWC weight": (["train", "--model", "{moe}", "--data", "{data}", "--ewc", "-1"],
                                   "--ewc must be non-negative, got -1.0"),
    "train: kd without teacher": (["train", "--model", "{moe}", "--kd", "0.5"], "--kd needs a --teacher"),
    "train: resume without checkpoint": (["train", "--model", "{moe}", "--data", "{data}", "--resume"],
                                         "no checkpoint"),
    "train: corrupted weights": (["train", "--model", "{broken_moe}", "--data", "{data}"], "could not load model"),
    "eval: missing facts source": (["eval", "--model", "{moe}", "--tasks", "facts", "--facts-source", "{root}/nope"],
                                   "no such file or folder"),
    "eval: a MoE as facts source": (["eval", "--model", "{moe}", "--tasks", "facts", "--facts-source", "{moe}"],
                                    "is a carved MoE"),
    "eval: a later model missing": (["eval", "--model", "{moe}", "{root}/nope"], "model not found"),
    "eval: a scan as a later model": (["eval", "--model", "{moe}", "{scan}"], "no config.json"),
    "eval: a later model's weights corrupt": (["eval", "--model", "{moe}", "{broken_moe}"],
                                              "is not a readable safetensors file"),
    "eval: a scan as facts source": (["eval", "--model", "{moe}", "--tasks", "facts", "--facts-source", "{scan}"],
                                     "no config.json"),
    "scan: gzip-compressed data": (["scan", "--model", "{dense}", "--data", "{root}/data.jsonl.gz"],
                                   "is gzip-compressed; decompress it first"),
    "eval: a JSON array as fact file": (["eval", "--model", "{moe}", "--tasks", "facts", "--facts", "{root}/array.json"],
                                        "looks like one JSON array spread over lines"),
    "eval: general text gzip-compressed": (["eval", "--model", "{moe}", "--tasks", "general", "--general",
                                            "{root}/data.jsonl.gz"], "is gzip-compressed"),
    "eval: general text is a folder": (["eval", "--model", "{moe}", "--tasks", "general", "--general", "{root}"],
                                       "is a folder; give a plain-text file"),
    "eval: MC line that is a list": (["eval", "--model", "{moe}", "--tasks", "mc:{root}/mc_list.jsonl"],
                                     "must be one JSON object"),
    "export: a GGUF as model": (["export", "--model", "{root}/corrupt.gguf"], "a GGUF needs no export"),
    "export: --out names a folder": (["export", "--model", "{moe}", "--out", "{root}/moe.gguf/"],
                                     "ends with a path separator"),
    "eval: an empty model name": (["eval", "--model", ""], "the model is an empty name"),
    "eval: a comma in a task file's name": (["eval", "--model", "{moe}", "--tasks", "mc:{root}/a,b.jsonl"],
                                            "a task file's name cannot hold one"),
    "eval: unknown task": (["eval", "--model", "{moe}", "--tasks", "ppl,vibes"], "unknown task 'vibes'"),
    "eval: HumanEval without permission": (["eval", "--model", "{moe}", "--tasks", "humaneval"],
                                           "--allow-code-execution"),
    "eval: missing MC file": (["eval", "--model", "{moe}", "--data", "{data}", "--tasks", "mc:{root}/no.jsonl"],
                              "task file not found"),
    "interpret: a dense model": (["interpret", "--model", "{dense}", "--data", "{data}"], "is not a TinyOnn MoE"),
    "eval: negative token count": (["eval", "--model", "{moe}", "--eval-tokens", "-5"], "eval_tokens must be positive"),
    "eval: facts not UTF-8": (["eval", "--model", "{moe}", "--tasks", "facts", "--facts", "{root}/latin1.jsonl"],
                              "latin1.jsonl:1: not UTF-8 text"),
    "eval: MC file not UTF-8": (["eval", "--model", "{moe}", "--tasks", "mc:{root}/latin1.jsonl"],
                               "latin1.jsonl:1: not UTF-8 text"),
    "scan: data not UTF-8": (["scan", "--model", "{dense}", "--data", "{root}/latin1.jsonl"], "save the data file as UTF-8"),
    "eval: no task": (["eval", "--model", "{moe}", "--tasks", " , "], "no task given"),
    "generate: top-p above 1": (["generate", "--model", "{moe}", "--top-p", "2"], "top_p must be in [0, 1]"),
    "scan: wrong type in YAML": (["scan", "--config", "{root}/badtype.yaml"], "option 'tokens' in"),
    "generate: empty prompt": (["generate", "--model", "{moe}", "--prompt", "  "], "the prompt is empty"),
    "generate: routing on a dense model": (["generate", "--model", "{dense}", "--top-k", "2"], "this model is dense"),
    "alchemy: missing pipeline file": (["alchemy", "--config", "{root}/none.yaml"], "config file not found"),
    "generate: unknown device": (["generate", "--model", "{moe}", "--device", "gpu"],
                                 "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    "eval: device in capitals": (["eval", "--model", "{moe}", "--device", "CPU"], "device must be auto, cpu, cuda"),
    "carve: negative seed": (["carve", "--scan", "{scan}", "--seed", "-1"], "seed must be in [0, 4294967295]"),
    "distil-data: seed too large": (["distil-data", "--model", "{dense}", "--seed", "100000000000000000000"],
                                    "seed must be in [0, 4294967295]"),
    "scan: a list for a string option in YAML": (["scan", "--config", "{root}/list_model.yaml"],
                                                 "option 'model' in"),
    "eval: general text too short": (["eval", "--model", "{moe}", "--tasks", "general", "--general", "{root}/tiny.txt",
                                      "--general-tokens", "1"], "gave no token to score"),
    "eval: MC task file is a folder": (["eval", "--model", "{moe}", "--tasks", "ppl,mc:{root}"], "is a folder"),
    "eval: MC task without a file": (["eval", "--model", "{moe}", "--tasks", "mc:"], "no task file given"),
    "eval: ARC answer key outside its labels": (["eval", "--model", "{moe}", "--tasks", "mc:{root}/arc_key.jsonl"],
                                                "answerKey 'C' is not one of the labels A, B"),
    "export: corrupt weights": (["export", "--model", "{broken_moe}"], "is corrupt or truncated"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, world, tmp_path, capsys):
    argv, message = CASES[case]
    own_out = argv[0] == "generate" or "--out" in argv  # generate writes nothing; a case may be about --out itself
    argv = [a.format(**world) for a in argv] + ([] if own_out else ["--out", str(tmp_path / "out")])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists(), "a failed stage must not leave its artifact"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder may be left"


def test_out_that_would_replace_other_things_is_refused(world, tmp_path, monkeypatch, capsys):
    """An --out that is a user's folder, an input model, a file or the working folder: one clear error before any
    work, and what it points to is left as it was."""
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("precious")
    a_file = tmp_path / "a_file"
    a_file.write_text("precious")
    model_files = sorted(p.name for p in world["moe"].iterdir())
    scan = ["scan", "--model", str(world["dense"]), "--data", str(world["data"]), "--seq-len", "32"]
    cases = [
        (scan + ["--out", str(user_dir)], "already holds other things (notes.txt)"),
        (scan + ["--out", str(a_file)], "exists and is not a folder"),
        (["eval", "--model", str(world["moe"]), "--data", str(world["data"]), "--tasks", "ppl",
          "--out", str(world["moe"])], "no eval.json"),
        (["carve", "--scan", str(world["scan"]), "--out", str(world["dense"])], "no carve.json"),
        (["export", "--model", str(world["moe"]), "--out", str(tmp_path)], "is a folder"),
        (["export", "--model", str(world["moe"]), "--out", str(a_file)], "is not a GGUF file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert (user_dir / "notes.txt").read_text() == "precious" and a_file.read_text() == "precious"
    assert sorted(p.name for p in world["moe"].iterdir()) == model_files
    assert (world["dense"] / "config.json").is_file()
    monkeypatch.chdir(user_dir)
    assert main(scan + ["--out", "."]) == 2
    assert "is the working folder" in capsys.readouterr().err
    assert sorted(p.name for p in user_dir.iterdir()) == ["notes.txt"]


def test_earlier_output_of_the_same_stage_is_replaced(world, tmp_path):
    out = tmp_path / "scan"
    argv = ["scan", "--model", str(world["dense"]), "--data", str(world["data"]), "--seq-len", "32", "--tokens", "64",
            "--fingerprint-tokens", "8", "--out", str(out)]
    assert main(argv) == 0
    first = (out / "scan.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "scan.json").stat().st_mtime_ns != first


def test_a_scan_made_with_a_relative_model_path_carves_from_another_folder(world, tmp_path, monkeypatch):
    monkeypatch.chdir(world["dense"].parent)
    scan = tmp_path / "scan"
    assert main(["scan", "--model", "dense", "--data", str(world["data"]), "--seq-len", "32", "--tokens", "64",
                 "--fingerprint-tokens", "8", "--out", str(scan)]) == 0
    monkeypatch.chdir(tmp_path)  # "dense" means nothing here: the scan's recorded absolute path does
    assert main(["carve", "--scan", str(scan), "--experts", "2", "--top-k", "1", "--calib-tokens", "64",
                 "--calib-steps", "2", "--eval-tokens", "0", "--no-plots", "--out", str(tmp_path / "moe")]) == 0
    assert (tmp_path / "moe" / "config.json").is_file()


def test_ctrl_c_mid_scan_leaves_nothing(world, tmp_path, monkeypatch, capsys):
    import tiny_onn.scan.scanner as scanner

    calls = {"n": 0}
    real = scanner.scan_batch

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scanner, "scan_batch", interrupted)
    out = tmp_path / "scan"
    assert main(["scan", "--model", str(world["dense"]), "--data", str(world["data"]), "--seq-len", "32",
                 "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sigterm_mid_scan_stops_as_ctrl_c_does(world, tmp_path, monkeypatch, capsys):
    """kill, timeout and job schedulers send SIGTERM: it stops the stage as Ctrl-C does (no partial output), exit 143,
    and the process's own SIGTERM handler is back afterwards."""
    import os
    import signal

    import tiny_onn.scan.scanner as scanner

    calls = {"n": 0}
    real = scanner.scan_batch

    def terminated(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(scanner, "scan_batch", terminated)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "scan"
    assert main(["scan", "--model", str(world["dense"]), "--data", str(world["data"]), "--seq-len", "32",
                 "--out", str(out)]) == 143
    assert "terminated (SIGTERM)" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert signal.getsignal(signal.SIGTERM) is before


def test_running_out_of_memory_is_one_clear_error_and_leaves_nothing(world, tmp_path, monkeypatch, capsys):
    """A --seq-len far past what fits allocated 25 GB and ended in a traceback: now one line saying which sizes to
    lower; other errors still surface as bugs."""
    import tiny_onn.scan.scanner as scanner

    def allocation_fails(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 25600000000 bytes.")

    monkeypatch.setattr(scanner, "scan_batch", allocation_fails)
    out = tmp_path / "scan"
    argv = ["scan", "--model", str(world["dense"]), "--data", str(world["data"]), "--seq-len", "32", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    (line,) = [line for line in err.splitlines() if "error" in line]  # the progress bar writes to stderr too
    assert "out of memory" in line and "--seq-len" in line and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    def a_bug(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(scanner, "scan_batch", a_bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(argv)


def test_out_where_nothing_can_be_written_is_refused_before_any_work(world, tmp_path, monkeypatch, capsys):
    """/proc takes no new folder: the scan used to run to the end and fail with a traceback when writing its output."""
    import tiny_onn.scan.scanner as scanner

    def must_not_run(*args, **kwargs):
        raise AssertionError("the scan ran before its output was checked")

    monkeypatch.setattr(scanner, "scan_batch", must_not_run)
    assert main(["scan", "--model", str(world["dense"]), "--data", str(world["data"]), "--seq-len", "32",
                 "--out", "/proc/tiny-onn-out"]) == 2
    err = capsys.readouterr().err
    assert "nothing can be written under /proc" in err and "Traceback" not in err


def test_out_under_a_file_is_refused_before_any_work(world, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("precious")
    under = str(a_file / "sub")
    cases = [
        ["scan", "--model", str(world["dense"]), "--data", str(world["data"]), "--out", under],
        ["carve", "--scan", str(world["scan"]), "--out", under],
        ["eval", "--model", str(world["moe"]), "--tasks", "ppl", "--out", under],
        ["interpret", "--model", str(world["moe"]), "--data", str(world["data"]), "--out", under],
        ["train", "--model", str(world["moe"]), "--data", str(world["data"]), "--out", under],
        ["train", "--model", str(world["moe"]), "--data", str(world["data"]), "--out", str(a_file)],
        ["distil-data", "--model", str(world["dense"]), "--out", under],
        ["distil-data", "--model", str(world["dense"]), "--out", str(a_file)],
        ["export", "--model", str(world["moe"]), "--out", under + ".gguf"],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert ("is a file, not a folder" in err or "is not a folder" in err) and len(err.splitlines()) == 1, err
    assert a_file.read_text() == "precious"


def test_train_never_replaces_a_folder_it_did_not_write(world, tmp_path, capsys):
    """A training run's --out that holds a user's files, or whose `model` is a model that is not a trained one (here
    the teacher itself), is refused before any work; both are left as they were."""
    user = tmp_path / "proj"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    base = ["train", "--model", str(world["moe"]), "--data", str(world["data"]), "--steps", "1", "--batch-size", "2",
            "--seq-len", "32", "--eval-tokens", "0"]
    assert main(base + ["--out", str(user)]) == 2
    assert "already holds other things than a training run's outputs (notes.txt)" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(world["dense"], run / "model")
    teacher_files = sorted(p.name for p in (run / "model").iterdir())
    assert main(base + ["--teacher", str(run / "model"), "--kd", "0.5", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"output folder {run / 'model'} already holds other things" in err and "and no train.json" in err, err
    assert sorted(p.name for p in (run / "model").iterdir()) == teacher_files
    assert (user / "notes.txt").read_text() == "precious" and sorted(p.name for p in user.iterdir()) == ["notes.txt"]


def test_carve_plots_folder_overlapping_the_model_folder_is_refused(world, tmp_path, capsys):
    for plots, out in ((tmp_path / "p1", tmp_path / "p1"), (tmp_path / "p2", tmp_path / "p2" / "moe")):
        assert main(["carve", "--scan", str(world["scan"]), "--plots-out", str(plots), "--out", str(out)]) == 2
        assert "overlap" in capsys.readouterr().err
        assert not out.exists() and not plots.exists()


def test_alchemy_out_holding_a_users_files_is_refused_and_left_alone(world, tmp_path, capsys):
    out = tmp_path / "proj"
    out.mkdir()
    (out / "summary.md").write_text("# my notes")
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"scan: {{model: {world['dense']}, data: {world['data']}, seq_len: 32}}\n")
    assert main(["alchemy", "--config", str(config), "--out", str(out)]) == 2
    assert "is not an earlier alchemy run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["summary.md"] and (out / "summary.md").read_text() == "# my notes"
    earlier = tmp_path / "earlier"  # an earlier run's folder whose report/ holds a user's page
    (earlier / "report").mkdir(parents=True)
    (earlier / "stages.json").write_text("{}")
    (earlier / "report" / "index.html").write_text("mine")
    assert main(["alchemy", "--config", str(config), "--out", str(earlier)]) == 2
    assert "report already holds other things" in capsys.readouterr().err
    assert not (earlier / "scan").exists() and (earlier / "report" / "index.html").read_text() == "mine"


def test_a_run_that_trained_no_step_writes_nothing(world, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--model", str(world["moe"]), "--data", str(world["data"]), "--steps", "2", "--batch-size",
                 "1", "--seq-len", "2", "--eval-tokens", "0", "--policy", "full", "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no step trained: all 2 step(s) were skipped" in last and "Traceback" not in last
    assert not out.exists()


def test_a_moe_whose_source_moved_is_named_before_any_evaluation(world, tmp_path, capsys):
    import json

    moe = tmp_path / "moe"
    shutil.copytree(world["moe"], moe)
    record = json.loads((moe / "provenance.json").read_text())
    record.update(source_model="models/gone", source_model_path=str(tmp_path / "models" / "gone"))
    (moe / "provenance.json").write_text(json.dumps(record))
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(moe), "--tasks", "ppl,facts", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "was carved from models/gone" in err and "give the dense source with --facts-source" in err, err
    assert len(err.splitlines()) == 1 and not out.exists()
