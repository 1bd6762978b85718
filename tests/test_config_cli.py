"""Config files and CLI flags, and the CLI's one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_onn.cli import build_parser, main
from tiny_onn.config import config_from_args, field_docs, load_yaml
from tiny_onn.errors import TinyOnnError
from tiny_onn.scan import ScanConfig


def test_yaml_section_then_flags_override(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("scan:\n  tokens: 123\n  batch_size: 3\ncarve:\n  experts: 8\n")
    args = build_parser().parse_args(["scan", "--config", str(cfg_file), "--batch-size", "5"])
    cfg = config_from_args(ScanConfig, args, "scan")
    assert cfg.tokens == 123 and cfg.batch_size == 5 and cfg.model == "smollm2"


def test_sections_are_never_read_as_options_and_may_be_empty(tmp_path):
    """carve has a `scan` option: a `scan:` section in a pipeline file is not it; an empty section means defaults."""
    from tiny_onn.carve import CarveConfig

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("scan:\n  tokens: 64\n")
    cfg = config_from_args(CarveConfig, build_parser().parse_args(["carve", "--config", str(cfg_file)]), "carve")
    assert cfg.scan == CarveConfig().scan
    cfg_file.write_text("scan:\ncarve:\n  experts: 8\n  top_k: 2\n")
    cfg = config_from_args(ScanConfig, build_parser().parse_args(["scan", "--config", str(cfg_file)]), "scan")
    assert cfg.tokens == ScanConfig().tokens


def test_distil_data_reads_a_pipeline_files_distil_section(tmp_path):
    """alchemy names distil-data's section `distil:`; `tiny-onn distil-data --config` of that file reads it too, and a
    `distil-data:` section, where a file has one, wins."""
    from tiny_onn.data.distil import DistilDataConfig

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("scan:\n  tokens: 64\ndistil:\n  max_prompts: 12\n  temperature: 0\n")
    args = build_parser().parse_args(["distil-data", "--config", str(cfg_file)])
    cfg = config_from_args(DistilDataConfig, args, "distil-data")
    assert (cfg.max_prompts, cfg.temperature) == (12, 0)
    cfg_file.write_text("distil:\n  max_prompts: 12\ndistil-data:\n  max_prompts: 7\n")
    cfg = config_from_args(DistilDataConfig, args, "distil-data")
    assert cfg.max_prompts == 7


def test_a_tilde_in_a_path_option_is_the_home_folder(tmp_path, monkeypatch):
    """YAML and quoted flags reach the tool with `~` unexpanded: every path option reads it as the shell would, so each
    stage writes (and reads) where its message says; other options keep their text."""
    from tiny_onn.eval.harness import EvalConfig
    from tiny_onn.generate import GenerateConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_parser().parse_args(["eval", "--model", "~/moe", "smollm2", "--out", "~/ev", "--data", "default, ~/d.jsonl",
                                      "--tasks", "ppl,mc:~/mc.jsonl"])
    cfg = config_from_args(EvalConfig, args, "eval")
    assert cfg.model == [str(tmp_path / "moe"), "smollm2"] and cfg.out == str(tmp_path / "ev")
    assert cfg.data == f"default,{tmp_path / 'd.jsonl'}" and cfg.tasks == f"ppl,mc:{tmp_path / 'mc.jsonl'}"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("scan:\n  out: ~/scan\n")
    assert config_from_args(ScanConfig, build_parser().parse_args(["scan", "--config", str(cfg_file)]),
                            "scan").out == str(tmp_path / "scan")
    cfg = config_from_args(GenerateConfig, build_parser().parse_args(["generate", "--prompt", "~/not a path"]), "generate")
    assert cfg.prompt == "~/not a path"


def test_top_level_options_beside_the_stages_section_are_refused_not_ignored(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    for text in ("device: cpu\nscan:\n  tokens: 64\n", "scan:\ntokens: 64\n"):
        cfg_file.write_text(text)
        with pytest.raises(TinyOnnError, match="at the top level beside a `scan:` section"):
            config_from_args(ScanConfig, build_parser().parse_args(["scan", "--config", str(cfg_file)]), "scan")
    cfg_file.write_text("device: cpu\ncarve:\n  experts: 8\n")  # no scan section: the top level is scan's
    assert config_from_args(ScanConfig, build_parser().parse_args(["scan", "--config", str(cfg_file)]),
                            "scan").device == "cpu"
    cfg_file.write_text("device: cpu\nscan:\n  tokens: 64\n")
    assert main(["alchemy", "--config", str(cfg_file), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_yaml_lists_join_only_for_comma_separated_options(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("scan:\n  data: [default, extra.jsonl]\n  categories: [chat, math]\n")
    cfg = config_from_args(ScanConfig, build_parser().parse_args(["scan", "--config", str(cfg_file)]), "scan")
    assert (cfg.data, cfg.categories) == ("default,extra.jsonl", "chat,math")
    for option in ("out", "model"):
        cfg_file.write_text(f"scan:\n  {option}: [a, b]\n")
        with pytest.raises(TinyOnnError, match=f"option '{option}' .* must be a string, got \\['a', 'b'\\]"):
            config_from_args(ScanConfig, build_parser().parse_args(["scan", "--config", str(cfg_file)]), "scan")


def test_unknown_yaml_key(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("tokenz: 5\n")
    args = build_parser().parse_args(["scan", "--config", str(cfg_file)])
    with pytest.raises(TinyOnnError, match="unknown option.*tokenz"):
        config_from_args(ScanConfig, args, "scan")


@pytest.mark.parametrize(("text", "message"), [
    ("scan:\n  tokens: 100\nscan:\n  tokens: 150\n", "'scan' is given twice \\(lines 1 and 3\\)"),  # PyYAML kept the last
    ("scan:\n  tokens: 100\n  tokens: 150\n", "'tokens' is given twice"),
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
])
def test_a_key_given_twice_or_an_empty_file_is_refused(tmp_path, text, message):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(text)
    with pytest.raises(TinyOnnError, match=message):
        config_from_args(ScanConfig, build_parser().parse_args(["scan", "--config", str(cfg_file)]), "scan")


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("base: &b\n  tokens: 100\n  batch_size: 3\nmine:\n  <<: *b\n  tokens: 64\n")
    assert load_yaml(cfg_file)["mine"] == {"tokens": 64, "batch_size": 3}


def test_yaml_values_are_checked_against_the_field_types(tmp_path):
    """PyYAML reads `3e-4` and `1e4` as strings: numbers written so are converted; a value of the wrong type is named."""
    from tiny_onn.train import TrainConfig

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  lr: 3e-4\n  steps: 1e2\n  data: [default, extra.jsonl]\n  train_attention: false\n")
    cfg = config_from_args(TrainConfig, build_parser().parse_args(["train", "--config", str(cfg_file)]), "train")
    assert cfg.lr == pytest.approx(3e-4) and cfg.steps == 100 and isinstance(cfg.steps, int)
    assert cfg.data == "default,extra.jsonl"
    for text, message in [("scan:\n  tokens: abc\n", "option 'tokens' in .* must be an integer, got 'abc'"),
                          ("scan:\n  tokens: 2.5\n", "must be an integer, got 2.5"),
                          ("scan:\n  tokens: .nan\n", "must be an integer, got nan"),
                          ("scan:\n  w_act: inf\n", "option 'w_act' .* must be a number, got 'inf'"),
                          ("scan:\n  seq_len: true\n", "must be an integer, got True"),
                          ("scan:\n  model: {a: 1}\n", "option 'model' .* must be a string")]:
        cfg_file.write_text(text)
        with pytest.raises(TinyOnnError, match=message):
            config_from_args(ScanConfig, build_parser().parse_args(["scan", "--config", str(cfg_file)]), "scan")


def test_every_field_has_help():
    docs = field_docs(ScanConfig)
    import dataclasses

    assert {f.name for f in dataclasses.fields(ScanConfig)} <= set(docs)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["scan", "--model", "/nonexistent/m.gguf"], "model file not found"),
        (["scan", "--tokens", "0"], "tokens must be positive"),
        (["scan", "--w-act", "0", "--w-inv-grad", "0", "--w-freq", "0"], "the S_p weights must be finite numbers, not all 0"),
        (["scan", "--w-act", "nan"], "must be a number, got nan"),
        (["scan", "--positions", "middle"], "positions must be one of"),
        (["scan", "--config", "/nonexistent.yaml"], "config file not found"),
        (["scan", "--config", "{tiny}"], "is a folder; give a YAML file"),
        (["scan", "--data", "/nonexistent/data.jsonl", "--model", "{tiny}"], "data file not found"),
    ],
)
def test_cli_bad_input_one_line_error(argv, message, capsys, tmp_path, tiny_model_dir):
    argv = [a.replace("{tiny}", str(tiny_model_dir)) for a in argv] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir()), "a failed stage leaves nothing behind"


@pytest.mark.parametrize("name", ["demo", "debug", "qwen3-0.6b-gpu", "qwen3-4b-4bit"])
def test_shipped_pipeline_configs_are_valid(name):
    from pathlib import Path

    from tiny_onn.alchemy import AlchemyConfig, _stage_configs

    path = Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"
    cfgs = _stage_configs(AlchemyConfig(config=str(path), out="runs/x"))
    assert {k for k, v in cfgs.items() if v is not None} >= {"scan", "carve", "train", "eval", "interpret"}
    if cfgs["distil"] is not None:  # the demo distils on its own corpus
        assert "runs/x/corpus" in cfgs["train"].data


def test_artifact_json_is_standard_json(tmp_path):
    """Undefined numbers (NaN, ±inf) are written as null: Python would write NaN/Infinity, which strict readers refuse."""
    import json

    from tiny_onn.artifacts import write_json

    write_json(tmp_path / "a.json", {"x": float("nan"), "y": [1.5, float("inf"), {"z": -float("inf")}], "n": 3})
    text = (tmp_path / "a.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}")) == {
        "x": None, "y": [1.5, None, {"z": None}], "n": 3}


def test_atomic_dir_replaces_only_its_own_earlier_output(tmp_path):
    import pytest

    import tiny_onn.artifacts as artifacts
    from tiny_onn.errors import TinyOnnError

    out = tmp_path / "out"
    for value in ("first", "second"):  # new, then an earlier output of the same kind: replaced
        with artifacts.atomic_dir(out, "scan.json") as tmp:
            (tmp / "scan.json").write_text(value)
    assert (out / "scan.json").read_text() == "second"
    other = tmp_path / "other"
    other.mkdir()
    (other / "eval.json").write_text("kept")
    with (pytest.raises(TinyOnnError, match=r"already holds other things \(eval.json\) and no scan.json"),
          artifacts.atomic_dir(other, "scan.json") as tmp):
        (tmp / "scan.json").write_text("x")
    assert (other / "eval.json").read_text() == "kept"
    (tmp_path / "empty").mkdir()
    assert artifacts.check_replaceable(tmp_path / "empty", "scan.json") == (tmp_path / "empty").absolute()
    # a stage that forgets its marker is a bug
    with pytest.raises(RuntimeError, match="lacks its marker"), artifacts.atomic_dir(tmp_path / "bug", "scan.json"):
        pass
    assert not (tmp_path / "bug").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_artifacts_get_the_umask_permissions(tmp_path, monkeypatch):
    """tempfile makes files 0600 and folders 0700 (safetensors too, for weights); a finished artifact is as readable as
    a plain file or folder under the umask."""
    import os

    import tiny_onn.artifacts as artifacts

    monkeypatch.setattr(artifacts, "_UMASK", 0o022)
    with artifacts.atomic_dir(tmp_path / "art", "sub/w.bin") as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "w.bin").write_bytes(b"x")
        os.chmod(tmp / "sub" / "w.bin", 0o600)
    artifacts.write_json(tmp_path / "art" / "meta.json", {"a": 1})
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777
             for p in [tmp_path / "art", *(tmp_path / "art").rglob("*")]}
    assert modes == {"art": 0o755, "art/sub": 0o755, "art/sub/w.bin": 0o644, "art/meta.json": 0o644}


def test_an_existing_output_folder_is_checked_itself_and_a_new_one_by_its_parent(tmp_path, monkeypatch):
    """Stages that write inside their --out need that folder writable, not its parent (a job folder made for the user
    inside a read-only scratch space); a folder still to be made needs its parent writable."""
    import tempfile

    from tiny_onn.artifacts import check_output_folder

    job = tmp_path / "job"
    job.mkdir()
    real = tempfile.mkdtemp

    def read_only_parent(*args, dir=None, **kwargs):
        if Path(dir) == tmp_path:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only_parent)
    assert check_output_folder(job) == job
    assert list(job.iterdir()) == []  # the probe left nothing
    with pytest.raises(TinyOnnError, match="nothing can be written under .* \\(Permission denied\\)"):
        check_output_folder(tmp_path / "new")


def test_a_process_started_with_sigterm_ignored_keeps_ignoring_it(tmp_path, monkeypatch):
    """While the stage runs (not only after it), SIGTERM stays ignored."""
    import signal

    import tiny_onn.cli as cli

    during = []

    def read_options(*args, **kwargs):
        during.append(signal.getsignal(signal.SIGTERM))
        raise TinyOnnError("stop here")

    monkeypatch.setattr(cli, "config_from_args", read_options)
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert main(["scan"]) == 2
        assert during == [signal.SIG_IGN] and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not ignored: the stage runs with its own handler
        assert main(["scan"]) == 2
        assert during[1] is cli._raise_terminated and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
