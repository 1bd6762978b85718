"""`tiny-onn alchemy`: scan → carve → train → eval → interpret in one run folder, each stage skipped when its artifact
already exists and was made with the same configuration (so an interrupted run continues), then a summary table."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tiny_onn.artifacts import write_json
from tiny_onn.config import load_yaml, make_config
from tiny_onn.errors import TinyOnnError
from tiny_onn.model.export import carve_metadata_path

log = logging.getLogger(__name__)


@dataclass
class AlchemyConfig:
    """Run the whole pipeline from one YAML file (sections scan, carve, train, eval, interpret)."""

    config: str = "configs/demo.yaml"
    """Pipeline YAML with one section per stage."""
    out: str = "runs/demo"
    """Run folder: scan/, moe/, carve/, train/, eval/, report/, summary.md."""
    skip_train: bool = False
    """Stop after carving (no training): eval compares dense and carved only."""


def _same(stored: dict | None, cfg) -> bool:
    """Was an artifact made with this configuration? (compared as JSON, as it was stored)"""
    return stored is not None and json.loads(json.dumps(stored, default=str)) == json.loads(
        json.dumps(dataclasses.asdict(cfg), default=str))


def _stored_config(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()).get("config")
    except (OSError, json.JSONDecodeError):
        return None


def _stage_configs(acfg: AlchemyConfig) -> dict:
    from tiny_onn.carve import CarveConfig
    from tiny_onn.eval.harness import EvalConfig
    from tiny_onn.interpret import InterpretConfig
    from tiny_onn.scan import ScanConfig
    from tiny_onn.train import TrainConfig

    out = Path(acfg.out)
    raw = {k: load_yaml(acfg.config, k) if isinstance(load_yaml(acfg.config).get(k), dict) else {}
           for k in ("scan", "carve", "train", "eval", "interpret")}
    scan = make_config(ScanConfig, {**raw["scan"], "out": str(out / "scan")}, f"{acfg.config} [scan]")
    carve = make_config(CarveConfig, {**raw["carve"], "scan": str(out / "scan"), "out": str(out / "moe"),
                                      "plots_out": str(out / "carve")}, f"{acfg.config} [carve]")
    train = make_config(TrainConfig, {**raw["train"], "model": str(out / "moe"), "out": str(out / "train")},
                        f"{acfg.config} [train]")
    models = [scan.model, str(out / "moe")] + ([] if acfg.skip_train else [str(out / "train" / "model")])
    ev = make_config(EvalConfig, {**raw["eval"], "model": models, "out": str(out / "eval")}, f"{acfg.config} [eval]")
    final = str(out / "moe") if acfg.skip_train else str(out / "train" / "model")
    interp = make_config(InterpretConfig, {**raw["interpret"], "model": final, "out": str(out / "report")},
                         f"{acfg.config} [interpret]")
    return {"scan": scan, "carve": carve, "train": train, "eval": ev, "interpret": interp}


def run(acfg: AlchemyConfig) -> Path:
    from tiny_onn import carve, interpret, scan, train
    from tiny_onn.eval import harness

    out = Path(acfg.out)
    cfgs = _stage_configs(acfg)
    done: dict[str, str] = {}

    def stage(name: str, artifact: Path, fn, cfg) -> None:
        if _same(_stored_config(artifact), cfg):
            log.info("%s: %s is up to date, skipped", name, artifact)
            done[name] = "reused"
            return
        log.info("%s: running", name)
        fn(cfg)
        done[name] = "ran"

    stage("scan", out / "scan" / "scan.json", scan.run, cfgs["scan"])
    stage("carve", carve_metadata_path(out / "moe"), carve.run, cfgs["carve"])
    if not acfg.skip_train:
        tcfg = cfgs["train"]
        ckpt = out / "train" / "checkpoints" / "latest.json"
        if not _same(_stored_config(out / "train" / "train.json"), tcfg) and ckpt.is_file():
            state = json.loads(ckpt.read_text())
            stored = _stored_config(out / "train" / "checkpoints" / state["folder"] / "state.json")
            if _same({**(stored or {}), "resume": True}, dataclasses.replace(tcfg, resume=True)):
                log.info("train: continuing from checkpoint %s", state["folder"])
                tcfg = dataclasses.replace(tcfg, resume=True)
            else:
                raise TinyOnnError(f"{out / 'train'} holds checkpoints of another training configuration; "
                                   "remove that folder or use another --out")
        stage("train", out / "train" / "train.json", train.run, tcfg)
    stage("eval", out / "eval" / "eval.json", harness.run, cfgs["eval"])
    stage("interpret", out / "report" / "interpret.json", interpret.run, cfgs["interpret"])
    table = summary_table(out, acfg)
    (out / "summary.md").write_text(table + "\n")
    write_json(out / "alchemy.json", {"stages": done, "config_file": acfg.config})
    return out


def summary_table(out: Path, acfg: AlchemyConfig) -> str:
    report = json.loads((out / "eval" / "eval.json").read_text())
    names = ["dense source", "carved MoE"] + ([] if acfg.skip_train else ["trained MoE"])
    lines = ["| model | held-out ppl | probe acc | MC acc | active params/token | prefill tok/s |",
             "|---|---|---|---|---|---|"]
    for name, row in zip(names, report["models"], strict=True):
        ppl = row.get("perplexity", {}).get("ppl")
        probe = row.get("probe", {}).get("accuracy")
        mc = next(iter(row.get("mc", {}).values()), {}).get("acc")
        tps = row.get("prefill_tokens_per_second")
        lines.append(f"| {name} | {ppl:.2f} | " if ppl else f"| {name} | – | ")
        lines[-1] += (f"{probe:.2f} | " if probe is not None else "– | ") + (f"{mc:.2f} | " if mc is not None else "– | ")
        lines[-1] += f"{row['params']['active_per_token'] / 1e6:.1f}M | " + (f"{tps:.0f} |" if tps else "– |")
    return "\n".join(lines)


def summary(acfg: AlchemyConfig, out: Path) -> str:
    stages = json.loads((Path(out) / "alchemy.json").read_text())["stages"]
    ran = ", ".join(f"{k} {v}" for k, v in stages.items())
    return (Path(out) / "summary.md").read_text() + f"\nstages: {ran}\ndashboard: {Path(out) / 'report' / 'dashboard.html'}"
