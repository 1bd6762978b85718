"""`tiny-onn alchemy`: scan → carve → train → eval → interpret in one run folder, each stage skipped when its artifact
already exists and was made with the same configuration from the same inputs (so an interrupted run continues, and a
changed upstream artifact, model or data file makes every stage that depends on it run again), then a summary table."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from tiny_onn.artifacts import content_hash, read_json, write_json
from tiny_onn.config import check_sections, load_yaml, make_config, top_level_options
from tiny_onn.errors import TinyOnnError
from tiny_onn.model.export import carve_metadata_path

log = logging.getLogger(__name__)


@dataclass
class AlchemyConfig:
    """Run the whole pipeline from one YAML file (sections scan, distil, carve, train, eval, interpret)."""

    config: str = "configs/demo.yaml"
    """Pipeline YAML with one section per stage; with a `distil` section the teacher writes a corpus first, and `{corpus}` in a stage's data names it."""
    out: str = "runs/demo"
    """Run folder: scan/, corpus/, moe/, carve/, train/, eval/, report/, summary.md."""
    skip_train: bool = False
    """Stop after carving (no training): eval compares dense and carved only."""
    questions: list[str] = dataclasses.field(default_factory=list)
    """Questions the dense source and the final MoE answer side by side at the end of the summary (empty = the pipeline YAML's `alchemy: questions:`, if any)."""


def _located(value):
    """A stored configuration value with every local path in it (a comma-separated part, a list item: anything that
    exists or holds a "/") given as an absolute path: the same run folder is the same, spelt relatively or absolutely.
    Both sides of a comparison are located from the same working folder, so a hub id stays equal to itself."""
    from tiny_onn.data.sources import absolute_data_spec

    if isinstance(value, dict):
        return {k: v if k in _NOT_PATHS else _located(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_located(v) for v in value]
    return absolute_data_spec(value, unmade=True) if isinstance(value, str) else value


_NOT_PATHS = ("questions", "tasks", "prompt")  # texts that may hold a "/" without naming a file


def _same(stored: dict | None, cfg) -> bool:
    """Was an artifact made with this configuration? (compared as JSON, as it was stored, local paths by where they
    are)"""
    return stored is not None and _located(json.loads(json.dumps(stored, default=str))) == _located(json.loads(
        json.dumps(dataclasses.asdict(cfg), default=str)))


def _stored_config(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()).get("config")
    except (OSError, json.JSONDecodeError):
        return None


STAGE_RECORDS = "stages.json"
"""In the run folder: for each stage, the configuration and the identity of the inputs it last ran with."""
# the sections a pipeline file may hold (the stage commands' other sections, e.g. export, are not run by alchemy)
ALCHEMY_SECTIONS = ("alchemy", "scan", "distil", "carve", "train", "eval", "interpret")


def input_identity(spec: str) -> str:
    """What a stage input is, by content: a file or folder (the sha256 of its bytes), the bundled `smollm2` (its GGUF);
    anything else, a hub id, by its name (it cannot be read offline)."""
    from tiny_onn.sources.loading import SMOLLM2_ALIAS, smollm2_gguf_path

    path = Path(spec).expanduser()
    if path.exists():
        return content_hash(path)
    if spec == SMOLLM2_ALIAS:
        return content_hash(smollm2_gguf_path())
    return f"name:{spec}"


def stage_inputs(name: str, cfg) -> dict[str, str]:
    """The identities of everything a stage reads besides its own configuration: upstream artifacts, models, data."""
    from tiny_onn.data.pipeline import data_identity

    if name == "carve":  # an empty model or data means the scan's, which the scan's own hash covers
        models = {"scan": cfg.scan, "model": cfg.model}
    elif name == "train":
        models = {"model": cfg.model, "teacher": cfg.teacher}
    elif name == "eval":
        models = {f"model {i}": m for i, m in enumerate(cfg.model)}
    else:  # scan, interpret
        models = {"model": cfg.model}
    ids = {key: input_identity(spec) for key, spec in models.items() if spec}
    if cfg.data:
        ids["data"] = data_identity(cfg.data)
    for task in getattr(cfg, "task_list", []):
        if task.startswith("mc:"):
            ids[task] = input_identity(task[3:])
    return ids


# the options alchemy sets in each stage's section, whatever the section says (to this run's folders and models)
ALCHEMY_SETS = {
    "scan": ("out",),
    "distil": ("out",),
    "carve": ("scan", "out", "plots_out"),
    "train": ("model", "out"),
    "eval": ("model", "out"),
    "interpret": ("model", "out"),
}


def _stage_configs(acfg: AlchemyConfig) -> dict:
    from tiny_onn.carve import CarveConfig
    from tiny_onn.data.distil import DistilDataConfig
    from tiny_onn.eval.harness import EvalConfig
    from tiny_onn.interpret import InterpretConfig
    from tiny_onn.scan import ScanConfig
    from tiny_onn.train import TrainConfig

    out = Path(acfg.out)
    check_sections(acfg.config, sections=ALCHEMY_SECTIONS)
    loose = top_level_options(load_yaml(acfg.config))
    if loose:
        raise TinyOnnError(f"config file {acfg.config}: {', '.join(loose)} at the top level would be ignored: a pipeline "
                           "file holds one section per stage (scan, distil, carve, train, eval, interpret); put each "
                           "option in the section of the stage it is for")
    check_questions(acfg.questions, "--questions")
    alchemy_section(acfg.config)
    raw = {k: load_yaml(acfg.config, k) if isinstance(load_yaml(acfg.config).get(k), dict) else {}
           for k in ("scan", "distil", "carve", "train", "eval", "interpret")}
    for section in raw.values():  # `{corpus}` in a data spec is this run's teacher-written corpus
        data = section.get("data")
        if isinstance(data, str):
            section["data"] = data.replace("{corpus}", str(out / "corpus"))
        elif isinstance(data, list):  # a comma-separated option written as a YAML list
            section["data"] = [d.replace("{corpus}", str(out / "corpus")) if isinstance(d, str) else d for d in data]
    scan = make_config(ScanConfig, {**raw["scan"], "out": str(out / "scan")}, f"{acfg.config} [scan]")
    distil = None
    if "distil" in load_yaml(acfg.config):  # an empty `distil:` section: the corpus with distil-data's defaults
        distil = make_config(DistilDataConfig, {"model": scan.model, **raw["distil"], "out": str(out / "corpus")},
                             f"{acfg.config} [distil]")
    elif any("{corpus}" in str(sec.get("data", "")) or str(out / "corpus") in str(sec.get("data", ""))
             for sec in raw.values()):
        raise TinyOnnError(f"{acfg.config} uses {{corpus}} in a data spec but has no `distil` section to write it")
    carve = make_config(CarveConfig, {**raw["carve"], "scan": str(out / "scan"), "out": str(out / "moe"),
                                      "plots_out": str(out / "carve")}, f"{acfg.config} [carve]")
    train = make_config(TrainConfig, {**raw["train"], "model": str(out / "moe"), "out": str(out / "train")},
                        f"{acfg.config} [train]")
    models = [scan.model, str(out / "moe")] + ([] if acfg.skip_train else [str(out / "train" / "model")])
    ev = make_config(EvalConfig, {**raw["eval"], "model": models, "out": str(out / "eval")}, f"{acfg.config} [eval]")
    final = str(out / "moe") if acfg.skip_train else str(out / "train" / "model")
    interp = make_config(InterpretConfig, {**raw["interpret"], "model": final, "out": str(out / "report")},
                         f"{acfg.config} [interpret]")
    check_train_fits_carve(train, carve, acfg.config, acfg.skip_train)
    cfgs = {"scan": scan, "distil": distil, "carve": carve, "train": train, "eval": ev, "interpret": interp}
    for name, keys in ALCHEMY_SETS.items():  # kept in the file for the single-stage commands (`tiny-onn scan --config`)
        if name == "train" and acfg.skip_train:
            continue  # a stage that does not run overrides nothing
        for key in sorted(set(raw[name]) & set(keys)):
            used = getattr(cfgs[name], key) if cfgs[name] is not None else None
            if used is not None and Path(str(raw[name][key])).absolute() != Path(str(used)).absolute():
                log.info("%s [%s] %s: alchemy uses %s instead", acfg.config, name, key, used)
    return cfgs


def check_train_fits_carve(train, carve, where: str, skip_train: bool) -> None:
    """Before any stage runs, what train would find out only after the scan and the carve: smk/smk2 update k experts
    per layer, so the carve must make at least k; --top-k-start must lie between the carve's top-k and its experts (or
    two-stage candidates) and needs a fixed top-k; and alchemy resumes its stages itself, so train's own resume stays
    off."""
    if skip_train:
        return
    if train.resume:
        raise TinyOnnError(f"{where}: train's resume is set, but alchemy resumes its stages itself (run the same "
                           "command again to continue an interrupted pipeline): drop it from the train section")
    k = train.updated_experts
    if train.policy != "full" and k > carve.experts:
        option = "max_k" if train.policy == "smk2" else "min_k"
        raise TinyOnnError(f"{where}: train's policy {train.policy} updates {option} = {k} experts per layer, but "
                           f"carve makes {carve.experts}: set carve's experts to at least {k}, or train's {option} to "
                           f"{carve.experts} or less, or train's policy to full")
    if train.top_k_start:
        most = carve.candidates or carve.experts
        if carve.top_p or not carve.top_k <= train.top_k_start <= most:
            raise TinyOnnError(f"{where}: train's top_k_start {train.top_k_start} must lie between carve's top_k "
                               f"({carve.top_k}) and {'its candidates' if carve.candidates else 'its experts'} "
                               f"({most}), with a fixed top-k (carve's top_p 0; it is {carve.top_p:g})")


def check_alchemy_out(out: Path, cfgs: dict, skip_train: bool) -> None:
    """One clear error before any stage runs (and before anything in `out` is removed) when `out` is not new, empty
    or an earlier alchemy run (marked by its stages.json), or when a stage's folder in it holds something that stage
    would not replace (a user's `report/`, say)."""
    from tiny_onn.artifacts import check_output_folder, check_replaceable
    from tiny_onn.carve.carver import PLOTS_MARKER, plots_folder
    from tiny_onn.data.distil import check_corpus_out
    from tiny_onn.model.export import CARVE_META
    from tiny_onn.train.trainer import check_train_out

    path = check_output_folder(out)
    if path.is_dir() and any(path.iterdir()) and not (path / STAGE_RECORDS).is_file():
        shown = ", ".join(sorted(e.name for e in path.iterdir())[:5])
        raise TinyOnnError(f"--out {out} already holds other things ({shown}) and no {STAGE_RECORDS}, so it is not an "
                           "earlier alchemy run, whose outputs alone would be replaced; give a new or empty folder")
    check_replaceable(out / "scan", "scan.json")
    check_replaceable(cfgs["carve"].out, CARVE_META)
    if cfgs["carve"].plots:
        check_replaceable(plots_folder(cfgs["carve"]), PLOTS_MARKER)
    if not skip_train:
        check_train_out(cfgs["train"])
    check_replaceable(cfgs["eval"].out, "eval.json")
    check_replaceable(cfgs["interpret"].out, "interpret.json")
    check_corpus_out(out / "corpus")


def _local_path(part: str) -> Path | None:
    """One part of a data spec (or a model name) as an absolute local path, or None for a bundled or hub name."""
    from tiny_onn.data.sources import looks_like_a_local_path

    return Path(part.strip()).expanduser().absolute() if part.strip() and looks_like_a_local_path(part) else None


def check_categories_exist(name: str, cfg, made_here: Path) -> None:
    """A stage's --categories must name categories of its data (where the data exists before the run)."""
    from tiny_onn.data.pipeline import cached_examples, selected_categories

    spec = str(getattr(cfg, "data", "") or "")
    if not getattr(cfg, "categories", "") or not spec.strip():
        return
    for part in spec.split(","):
        path = _local_path(part)
        if path is not None and path.is_relative_to(made_here):
            return  # written by this run (the distil stage's corpus): checked when the stage reads it
    available = {e.category for e in cached_examples(spec)}
    unknown = sorted(set(selected_categories(cfg.categories, available)) - available)
    if unknown:
        raise TinyOnnError(f"[{name}] categories {', '.join(unknown)} are not in data {spec!r} (it has: "
                           f"{', '.join(sorted(available))}; checked before the first stage runs)")


def check_input_files(cfgs: dict, out: Path) -> None:
    """One clear error before the first stage for an input file a later stage would only find missing or invalid after
    the stages before it ran (minutes on the demo): every local data file of every stage (its data, replay and EWC data),
    train's local teacher, every stage's --categories, and eval's multiple-choice,
    general-text and fact files (read and checked here as eval reads them)."""
    from tiny_onn.eval.harness import evaluation_facts, read_task_files

    made_here = out.absolute()  # what the stages write (the distil stage's corpus, the carved model) is not there yet
    for name, cfg in cfgs.items():
        for field in ("data", "replay_data", "ewc_data", "teacher"):
            value = str(getattr(cfg, field, "") or "")
            for part in [value] if field == "teacher" else value.split(","):  # a teacher is one name
                path = _local_path(part)
                if path is not None and not path.exists() and not path.is_relative_to(made_here):
                    what = "teacher model" if field == "teacher" else f"{field.replace('_', ' ')} file"
                    raise TinyOnnError(f"[{name}] {what} not found: {part.strip()} (checked before the first stage runs)")
        check_categories_exist(name, cfg, made_here)
    ev = cfgs["eval"]
    read_task_files(ev)
    if "facts" in ev.task_list:
        evaluation_facts(ev)


def _config_json(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def run(acfg: AlchemyConfig) -> Path:
    from tiny_onn import carve, interpret, scan, train
    from tiny_onn.data import distil as distil_data
    from tiny_onn.eval import harness

    out = Path(acfg.out)
    cfgs = _stage_configs(acfg)
    check_alchemy_out(out, cfgs, acfg.skip_train)
    check_input_files(cfgs, out)
    # the summary describes a finished run: it is written again at the end, and a run that stops before then (a stage
    # failing after earlier ones reran) must not leave the previous run's summary beside changed artifacts
    for stale in (out / "summary.md", out / "alchemy.json"):
        stale.unlink(missing_ok=True)
    done: dict[str, str] = {}
    records_path = out / STAGE_RECORDS
    records = json.loads(records_path.read_text()) if records_path.is_file() else {}

    def record(name: str, cfg, inputs: dict, complete: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        records[name] = {"config": _config_json(cfg), "inputs": inputs, "complete": complete}
        write_json(records_path, records)

    def same_inputs(name: str, inputs: dict) -> bool:
        return records.get(name, {}).get("inputs") == inputs

    def stage(name: str, artifact: Path, fn, cfg) -> None:
        inputs = stage_inputs(name, cfg)  # after the stages before it ran: their artifacts are final now
        if _same(_stored_config(artifact), cfg) and same_inputs(name, inputs) and records[name].get("complete"):
            log.info("%s: %s is up to date, skipped", name, artifact)
            done[name] = "reused"
            return
        if records.get(name) and not same_inputs(name, inputs):
            old = records[name]["inputs"]
            changed = sorted(k for k in set(inputs) | set(old) if inputs.get(k) != old.get(k))
            log.info("%s: its inputs changed (%s)", name, ", ".join(changed))
        log.info("%s: running", name)
        record(name, cfg, inputs, complete=False)
        fn(cfg)
        record(name, cfg, inputs, complete=True)
        done[name] = "ran"

    def remove_stale_outputs() -> None:
        """After a failure, the outputs that no longer describe what is beside them go (each is made by the next
        run): those of the stage that failed, which hold an earlier run's artifact (its atomic write kept it), and
        those of later stages whose inputs changed (a carve that ran before the training failed leaves the earlier
        eval/ describing a model that no longer exists). A training run's checkpoints stay, for the next run to
        continue from."""
        removed = False
        for name, folders in stage_folders().items():
            if name in done or name not in records:
                continue
            try:
                current = stage_inputs(name, cfgs[name])
            except Exception:  # noqa: BLE001 — an input that cannot be read now is a changed one
                current = None
            unfinished = not records[name].get("complete") and name != "train"
            if unfinished or current != records[name].get("inputs"):
                for folder in folders:
                    if folder.exists():
                        log.info("%s: removing %s, made from inputs that have changed since", name, folder)
                        shutil.rmtree(folder)
                records.pop(name)
                removed = True
        if removed:
            write_json(records_path, records)

    def drop_training_of_another_carve() -> None:
        """A run that skips training keeps an earlier run's train/ only while it was trained from the MoE beside it:
        once the carve ran again, that model describes a MoE that no longer exists."""
        if "train" not in records or not (out / "train").exists():
            return
        carved_now = stage_inputs("train", cfgs["train"]).get("model")
        if records["train"].get("inputs", {}).get("model") == carved_now:
            log.info("train: skipped; %s, trained earlier from this MoE, is kept", out / "train")
            return
        log.info("train: skipped; removing %s, trained from an earlier carve", out / "train")
        shutil.rmtree(out / "train")
        records.pop("train")
        write_json(records_path, records)

    def stage_folders() -> dict[str, list[Path]]:
        from tiny_onn.carve.carver import plots_folder

        carve_cfg = cfgs["carve"]
        return {"scan": [out / "scan"],  # in pipeline order: a stage's removal changes its readers' inputs
                "carve": [Path(carve_cfg.out)] + ([plots_folder(carve_cfg)] if carve_cfg.plots else []),
                "train": [] if acfg.skip_train else [out / "train"],
                "eval": [Path(cfgs["eval"].out)], "interpret": [Path(cfgs["interpret"].out)]}

    try:
        if cfgs["distil"] is not None:
            dcfg = cfgs["distil"]
            if records.get("distil") and not same_inputs("distil", stage_inputs("distil", dcfg)) and (out / "corpus").exists():
                shutil.rmtree(out / "corpus")  # written from another teacher or mix: a resume would mix two corpora
            corpus_meta = out / "corpus" / "corpus.json"
            if dcfg.max_prompts and corpus_meta.is_file() and read_json(corpus_meta, "corpus metadata").get("records", 0) > dcfg.max_prompts:
                log.info("distil: max_prompts is now %d, below this run's corpus; writing it again", dcfg.max_prompts)
                shutil.rmtree(out / "corpus")  # distil-data never cuts a corpus; this one is the run's own
            stage("distil", out / "corpus" / "corpus.json", distil_data.run, dcfg)
        stage("scan", out / "scan" / "scan.json", scan.run, cfgs["scan"])
        stage("carve", carve_metadata_path(out / "moe"), carve.run, cfgs["carve"])
        if acfg.skip_train:
            drop_training_of_another_carve()
        else:
            tcfg = cfgs["train"]
            ckpt = out / "train" / "checkpoints" / "latest.json"
            if not _same(_stored_config(out / "train" / "train.json"), tcfg) and ckpt.is_file():
                if not same_inputs("train", stage_inputs("train", tcfg)):
                    log.info("train: %s was trained from other inputs; starting over", out / "train")
                    shutil.rmtree(out / "train")
                else:
                    state = json.loads(ckpt.read_text())
                    stored = _stored_config(out / "train" / "checkpoints" / state["folder"] / "state.json")
                    if _same({**(stored or {}), "resume": True}, dataclasses.replace(tcfg, resume=True)):
                        log.info("train: continuing from checkpoint %s", state["folder"])
                        tcfg = dataclasses.replace(tcfg, resume=True)
                    else:
                        raise TinyOnnError(f"{out / 'train'} holds checkpoints of another training configuration; "
                                           "remove that folder or use another --out")
            elif not same_inputs("train", stage_inputs("train", tcfg)) and (out / "train").exists():
                shutil.rmtree(out / "train")  # finished on other inputs: its checkpoints must not be mistaken for ours
            stage("train", out / "train" / "train.json", train.run, tcfg)
        stage("eval", out / "eval" / "eval.json", harness.run, cfgs["eval"])
        stage("interpret", out / "report" / "interpret.json", interpret.run, cfgs["interpret"])
    except BaseException:
        remove_stale_outputs()
        raise
    table = summary_table(out, acfg)
    questions = acfg.questions or alchemy_section(acfg.config).get("questions") or []
    if questions:
        final = out / ("moe" if acfg.skip_train else "train/model")
        table += "\n\n" + side_by_side(questions, cfgs["scan"].model, str(final), cfgs["eval"].device)
    (out / "summary.md").write_text(table + "\n")
    write_json(out / "alchemy.json", {"stages": done, "config_file": acfg.config})
    return out


def summary_table(out: Path, acfg: AlchemyConfig) -> str:
    """Dense vs carved vs trained: knowledge (fact retention, general-text perplexity) beside the mix perplexity."""
    report = json.loads((out / "eval" / "eval.json").read_text())
    names = ["dense source", "carved MoE"] + ([] if acfg.skip_train else ["trained MoE"])
    dense = report["models"][0]

    def ratio(row: dict, task: str) -> str:
        value, ref = row.get(task, {}).get("ppl"), dense.get(task, {}).get("ppl")
        return "–" if value is None else f"{value:.2f}" + (f" ({value / ref:.2f}×)" if ref else "")

    def num(value, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    lines = ["| model | fact retention | fact acc | general-text ppl (÷ dense) | mix held-out ppl (÷ dense) | "
             "active params/token | prefill tok/s | decode tok/s |", "|---|---|---|---|---|---|---|---|"]
    for name, row in zip(names, report["models"], strict=True):
        facts = row.get("facts", {})
        retained = f" ({facts['retained']}/{facts['known']})" if facts.get("known") else ""
        retention = facts.get("retention") if facts.get("known") else None
        lines.append(f"| {name} | {num(retention, '.3f')}{retained} | {num(facts.get('accuracy'), '.3f')} | "
                     f"{ratio(row, 'general')} | {ratio(row, 'perplexity')} | "
                     f"{row['params']['active_per_token'] / 1e6:.4g}M | {num(row.get('prefill_tokens_per_second'), '.0f')} | "
                     f"{num(row.get('decode_tokens_per_second'), '.1f')} |")
    return "\n".join(lines)


def alchemy_section(path: str) -> dict:
    """The pipeline file's `alchemy:` section, checked: only `questions`, a list of non-empty strings."""
    section = load_yaml(path).get("alchemy") or {}
    if not isinstance(section, dict):
        raise TinyOnnError(f"config file {path}: the alchemy section must be a mapping (questions: [...])")
    unknown = sorted(set(section) - {"questions"})
    if unknown:
        raise TinyOnnError(f"unknown option(s) in {path} [alchemy]: {', '.join(unknown)}; known: questions")
    check_questions(section.get("questions") or [], f"{path} [alchemy] questions")
    return section


def check_questions(questions: object, where: str) -> None:
    """Questions for the side-by-side table: a list of non-empty strings (a single string would be read letter by
    letter)."""
    if not isinstance(questions, list) or any(not isinstance(q, str) or not q.strip() for q in questions):
        raise TinyOnnError(f"{where} must be a list of non-empty strings, e.g. [\"What is the capital of France?\"]")


def side_by_side(questions: list[str], dense: str, moe: str, device: str = "auto", max_new_tokens: int = 40) -> str:
    """A markdown table of the dense source's and the MoE's greedy answers to the same questions."""
    from tiny_onn.data.encoding import prompt_ids
    from tiny_onn.generate import generate_batched
    from tiny_onn.sources import SourceArgs, load_source

    answers = {}
    for label, spec in (("dense source", dense), ("trained MoE" if "train" in moe else "carved MoE", moe)):
        src = load_source(SourceArgs(model=spec, device=device), dense_only=False)
        prompts = [prompt_ids(src.tokenizer, [{"role": "user", "content": q}]) for q in questions]
        replies = generate_batched(src.model, src.tokenizer, prompts, max_new_tokens, batch_size=len(prompts))
        answers[label] = [" ".join(src.tokenizer.decode(r, skip_special_tokens=True).split()) for r in replies]
    labels = list(answers)
    lines = ["| question | " + " | ".join(labels) + " |", "|---|---|---|"]
    for i, q in enumerate(questions):
        cells = [" ".join(text.split()).replace("|", "\\|") for text in (q, *(answers[label][i] for label in labels))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(acfg: AlchemyConfig, out: Path) -> str:
    """What the CLI prints: where things are, then the summary (ending with the side-by-side answers)."""
    stages = json.loads((Path(out) / "alchemy.json").read_text())["stages"]
    ran = ", ".join(f"{k} {v}" for k, v in stages.items())
    trained = "" if acfg.skip_train else ", train/model/"
    return (f"stages: {ran}\nresults in {out}: summary.md, eval/, report/dashboard.html, moe/{trained}\n\n"
            + (Path(out) / "summary.md").read_text())
