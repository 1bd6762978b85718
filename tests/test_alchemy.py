"""Alchemy: the whole pipeline on a tiny model, artifact reuse, interruption and resume, determinism."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_tiny_model
from tiny_onn.cli import main
from tiny_onn.train import MaskedAdamW

PIPELINE = """
alchemy: {{questions: ["What is the capital of France?", "Hello number 3, how are you?"]}}
distil: {{data: {data}, prompts: "facts,mix", max_prompts: 8, batch_size: 4, max_new_tokens: 6, device: cpu}}
scan: {{model: {dense}, data: {data}, tokens: 100000, seq_len: 32, batch_size: 4, fingerprint_tokens: 32, device: cpu}}
carve: {{experts: 4, top_k: 2, shared: 0.125, calib_tokens: 512, calib_steps: 10, eval_tokens: 256, plots: false,
        device: cpu, seq_len: 32}}
train: {{data: "{data},{{corpus}}", teacher: {dense}, kd: 1.0, policy: smk2, max_k: 2, steps: 6, batch_size: 2, seq_len: 32, checkpoint_every: 2,
        eval_tokens: 128, device: cpu, warmup_steps: 2}}
eval: {{data: {data}, tasks: "ppl,general,facts,probe,speed", eval_tokens: 256, general_tokens: 256, facts_limit: 6,
       seq_len: 32, speed_batch: 2, speed_seq_len: 16, repeats: 1, device: cpu}}
interpret: {{data: {data}, tokens: 256, seq_len: 32, device: cpu}}
"""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_tokenizer, tiny_moe):
    root = tmp_path_factory.mktemp("alchemy")
    dense = root / "dense"
    make_tiny_model("llama", len(tiny_tokenizer)).save_pretrained(dense)
    tiny_tokenizer.save_pretrained(dense)
    cfg = root / "pipeline.yaml"
    cfg.write_text(PIPELINE.format(dense=dense, data=tiny_moe[1]))
    return cfg


def _numbers(run):
    ev = json.loads((run / "eval" / "eval.json").read_text())
    return [(m["perplexity"]["ppl"], m["probe"]["accuracy"]) for m in ev["models"]]


def test_alchemy_runs_reuses_and_resumes(pipeline, tmp_path, monkeypatch, capsys):
    a = tmp_path / "a"
    assert main(["alchemy", "--config", str(pipeline), "--out", str(a)]) == 0
    text = capsys.readouterr().out
    assert "| trained MoE |" in text and "dashboard.html" in text
    # the summary puts knowledge beside the mix perplexity and ends with the side-by-side answers
    assert "fact retention" in text and "general-text ppl" in text
    assert text.rstrip().split("\n")[-4].startswith("| question | dense source | trained MoE |")  # + 2 questions
    corpus = json.loads((a / "corpus" / "corpus.json").read_text())
    assert corpus["complete"] and corpus["records"] == 8
    train_cfg = json.loads((a / "train" / "train.json").read_text())["config"]
    assert train_cfg["data"].endswith(str(a / "corpus"))
    for path in ("scan/scan.json", "moe/provenance.json", "train/model/config.json", "eval/eval.json",
                 "report/dashboard.html", "summary.md", "moe/README.md", "train/model/README.md"):
        assert (a / path).is_file(), path
    # a second run reuses every artifact, also with the run folder spelt relatively
    assert main(["alchemy", "--config", str(pipeline), "--out", str(a)]) == 0
    stages = json.loads((a / "alchemy.json").read_text())["stages"]
    assert set(stages.values()) == {"reused"}
    monkeypatch.chdir(tmp_path)
    assert main(["alchemy", "--config", str(pipeline), "--out", "./a/"]) == 0
    assert set(json.loads((a / "alchemy.json").read_text())["stages"].values()) == {"reused"}
    monkeypatch.undo()
    # a rerun with other training settings that fails does not leave the earlier run's summary behind
    changed = tmp_path / "changed.yaml"
    changed.write_text(pipeline.read_text().replace("steps: 6,", "steps: 5,"))

    def failing(cfg):
        from tiny_onn.errors import TinyOnnError

        raise TinyOnnError("training failed")

    monkeypatch.setattr("tiny_onn.train.run", failing)
    assert main(["alchemy", "--config", str(changed), "--out", str(a)]) == 2
    assert not (a / "summary.md").exists() and not (a / "alchemy.json").exists()
    monkeypatch.undo()
    capsys.readouterr()

    # killed during training, then started again: continues from the last checkpoint, same final numbers
    calls = {"n": 0}
    original = MaskedAdamW.step

    def interrupted(self, closure=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, closure)

    b = tmp_path / "b"
    monkeypatch.setattr(MaskedAdamW, "step", interrupted)
    assert main(["alchemy", "--config", str(pipeline), "--out", str(b)]) == 130
    monkeypatch.setattr(MaskedAdamW, "step", original)
    assert (b / "train" / "checkpoints" / "latest.json").is_file() and not (b / "train" / "train.json").exists()
    assert main(["alchemy", "--config", str(pipeline), "--out", str(b)]) == 0
    assert json.loads((b / "alchemy.json").read_text())["stages"]["scan"] == "reused"
    # determinism: same config and seed -> same experts and the same eval numbers
    assert (a / "moe" / "provenance.json").read_text() == (b / "moe" / "provenance.json").read_text()
    assert _numbers(a) == _numbers(b)
    hist_a = json.loads((a / "train" / "train.json").read_text())["history"]
    hist_b = json.loads((b / "train" / "train.json").read_text())["history"]
    assert [h["ce"] for h in hist_a] == [h["ce"] for h in hist_b]


def test_a_changed_upstream_artifact_or_data_file_reruns_what_depends_on_it(tiny_moe, tmp_path):
    """Each stage records the hashes of its inputs: a stage whose own configuration is unchanged still runs again when a
    file it reads changed (a data file edited in place, a scan redone outside alchemy), and only then."""
    from tiny_onn.alchemy import AlchemyConfig, _stage_configs
    from tiny_onn.scan import run as scan

    lines, data, cfg, run, argv = _light_run(tiny_moe, tmp_path)

    def stages() -> dict:
        assert main(argv) == 0
        return json.loads((run / "alchemy.json").read_text())["stages"]

    assert set(stages().values()) == {"ran"}
    assert set(stages().values()) == {"reused"}
    data.write_text("".join(lines[: len(lines) // 2]))  # same path, same configuration, other examples
    assert set(stages().values()) == {"ran"}
    # the scan made again outside alchemy with the very same configuration: a new artifact, so the carve runs again;
    # its statistics are the same, so the carve writes the same model, and eval and interpret are still up to date
    scan(_stage_configs(AlchemyConfig(config=str(cfg), out=str(run), skip_train=True))["scan"])
    assert stages() == {"scan": "reused", "carve": "ran", "eval": "reused", "interpret": "reused"}


def _light_run(tiny_moe, tmp_path):
    """A scan → carve → eval → interpret pipeline on a copy of the tiny data: (its lines, the copy, the pipeline file,
    the run folder, the alchemy command)."""
    lines = tiny_moe[1].read_text().splitlines(keepends=True)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(lines))
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(LIGHT_PIPELINE.format(dense=tiny_moe[0].parent / "dense", data=data))
    run = tmp_path / "run"
    return lines, data, cfg, run, ["alchemy", "--config", str(cfg), "--out", str(run), "--skip-train"]


LIGHT_PIPELINE = """
scan: {{model: {dense}, data: {data}, tokens: 2000, seq_len: 32, batch_size: 4, fingerprint_tokens: 16, device: cpu}}
carve: {{experts: 4, top_k: 2, calib_tokens: 256, calib_steps: 2, eval_tokens: 0, plots: false, device: cpu, seq_len: 32}}
eval: {{data: {data}, tasks: "ppl", eval_tokens: 128, seq_len: 32, device: cpu}}
interpret: {{data: {data}, tokens: 128, seq_len: 32, device: cpu}}
"""


def test_an_empty_distil_section_and_corpus_in_a_yaml_list(tmp_path):
    from tiny_onn.alchemy import AlchemyConfig, _stage_configs

    config = tmp_path / "pipeline.yaml"
    config.write_text('distil:\ntrain:\n  data: [default, "{corpus}"]\n')
    cfgs = _stage_configs(AlchemyConfig(config=str(config), out=str(tmp_path / "run")))
    assert cfgs["distil"] is not None and cfgs["distil"].out == str(tmp_path / "run" / "corpus")
    assert cfgs["train"].data == f"default,{tmp_path / 'run' / 'corpus'}"


def test_a_failed_rerun_leaves_no_output_made_from_changed_inputs(tiny_moe, tmp_path, monkeypatch):
    """The data changes, scan and carve run again, then eval fails: the earlier eval/ (of the earlier MoE) and report/
    go, the new scan and MoE stay, and the next run makes only what is missing."""
    lines, data, cfg, run, argv = _light_run(tiny_moe, tmp_path)
    assert main(argv) == 0
    data.write_text("".join(lines[: len(lines) // 2]))

    def failing(cfg):
        from tiny_onn.errors import TinyOnnError

        raise TinyOnnError("eval failed")

    monkeypatch.setattr("tiny_onn.eval.harness.run", failing)
    assert main(argv) == 2
    assert (run / "scan" / "scan.json").is_file() and (run / "moe" / "config.json").is_file()
    assert not (run / "eval").exists() and not (run / "report").exists()
    monkeypatch.undo()
    assert main(argv) == 0
    stages = json.loads((run / "alchemy.json").read_text())["stages"]
    assert stages == {"scan": "reused", "carve": "reused", "eval": "ran", "interpret": "ran"}


def test_skip_train_keeps_a_training_of_this_carve_and_removes_one_of_an_earlier_carve(tiny_moe, tmp_path, caplog):
    """An earlier full run left train/: a --skip-train rerun keeps it while the MoE it was trained from is the one
    beside it, and removes it (with its record) once the carve runs again; train's overrides are not logged."""
    from tiny_onn.alchemy import AlchemyConfig, _stage_configs, stage_inputs

    lines, data, cfg, run, argv = _light_run(tiny_moe, tmp_path)
    cfg.write_text(cfg.read_text() + f"train: {{out: {tmp_path / 'elsewhere'}, steps: 1}}\n")  # alchemy overrides out
    assert main(argv) == 0
    train_cfg = _stage_configs(AlchemyConfig(config=str(cfg), out=str(run)))["train"]
    (run / "train" / "model").mkdir(parents=True)  # what a full run on this carve left
    records = json.loads((run / "stages.json").read_text())
    records["train"] = {"config": {}, "inputs": stage_inputs("train", train_cfg), "complete": True}
    (run / "stages.json").write_text(json.dumps(records))
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    assert (run / "train" / "model").is_dir() and "is kept" in caplog.text
    assert "alchemy uses" not in caplog.text
    data.write_text("".join(lines[: len(lines) // 2]))  # the scan and the carve run again
    assert main(argv) == 0
    assert not (run / "train").exists()
    assert "train" not in json.loads((run / "stages.json").read_text())


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('tasks: "ppl"', 'tasks: "ppl,mc:{root}/nope.jsonl"', "task file not found"),
        ('tasks: "ppl"', 'tasks: "ppl,general", general: {root}/nope.txt', "nope.txt"),
        ('tasks: "ppl"', 'tasks: "ppl,facts", facts: {root}/nope.jsonl', "nope.jsonl"),
        ("interpret: {{data: {data}", "interpret: {{data: {root}/missing.jsonl", "[interpret] data file not found"),
        ("eval: {{data", "train: {{teacher: {root}/no-teacher, kd: 1.0}}\neval: {{data", "[train] teacher model not found"),
        ("interpret: {{data: {data}", "interpret: {{categories: bogus, data: {data}", "[interpret] categories bogus are not"),
        ("eval: {{data", "train: {{replay_data: {root}/nope.jsonl}}\neval: {{data", "[train] replay data file not found"),
        ("eval: {{data", "train: {{ewc_data: {root}/nope.jsonl, ewc: 1.0}}\neval: {{data", "[train] ewc data file not found"),
    ],
)
def test_a_later_stages_missing_file_is_refused_before_the_first_stage(tiny_moe, tmp_path, capsys, old, new,
                                                                        message):
    """eval's task files and every stage's data are checked up front: nothing runs, nothing is written."""
    _, data, cfg, run, argv = _light_run(tiny_moe, tmp_path)
    text = LIGHT_PIPELINE.replace(old, new).format(dense=tiny_moe[0].parent / "dense", data=data, root=tmp_path)
    assert text != LIGHT_PIPELINE.format(dense=tiny_moe[0].parent / "dense", data=data)  # the edit took
    cfg.write_text(text)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()
