"""Eval stage: one table for quality, speed and memory across models (dense source, MoE, …), side by side in one run,
and the sparsity–quality curve of each MoE."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tiny_onn.artifacts import atomic_dir, check_replaceable, figure_text, read_json, versions, write_json
from tiny_onn.config import config_to_dict
from tiny_onn.data import DataArgs, build_dataset
from tiny_onn.data.distil import tokenizer_digest
from tiny_onn.data.facts import Fact, load_facts
from tiny_onn.data.general import build_general_dataset, general_documents
from tiny_onn.errors import TinyOnnError
from tiny_onn.eval.efficiency import (
    decode_tokens_per_second,
    flops_per_token,
    memory,
    parameter_counts,
    prefill_tokens_per_second,
)
from tiny_onn.eval.facts import KnownFacts, answer_facts, facts_scores, source_identity
from tiny_onn.eval.humaneval import humaneval_pass_at_1
from tiny_onn.eval.perplexity import perplexity
from tiny_onn.eval.probe import factual_probe
from tiny_onn.eval.tasks import load_mc, longest_mc_sequence, score_mc
from tiny_onn.sources import SMOLLM2_ALIAS, SourceArgs, load_source
from tiny_onn.sources.loading import (
    check_device,
    check_model_spec,
    looks_like_local_path,
    recorded_model,
    warn_if_beyond_positions,
)

log = logging.getLogger(__name__)
KNOWN_TASKS = ("ppl", "general", "facts", "probe", "humaneval", "speed", "curve")


@dataclass
class EvalConfig(DataArgs):
    """Evaluate one or more models side by side."""

    model: list[str] = field(default_factory=lambda: ["smollm2"])
    """Models to compare (repeat --model or list several): MoE folders, 'smollm2', .gguf files, HF folders."""
    tasks: str = "ppl,general,facts,speed,curve"
    """Comma-separated: ppl (held-out split of the training mix), general (perplexity on general English text no training data shares a source with), facts (fact accuracy and retention of the dense source's known facts), probe (24 easy questions), speed, curve, humaneval, mc:FILE.jsonl (ARC/MMLU/HellaSwag/C-Eval format)."""
    eval_tokens: int = 4096
    """Held-out tokens for perplexity."""
    general: str = "news"
    """General-text set: 'news' (the Lee news corpus bundled in the gensim package) or a plain-text file."""
    general_tokens: int = 4096
    """Tokens of the general-text set to score."""
    facts: str = "builtin"
    """Fact questions: 'builtin' (countries and chemical elements from bundled knowledge bases) or a jsonl file of {question, answer(s)}."""
    facts_limit: int = 0
    """Score only N evaluation-split facts (a fixed hash-ordered subset; 0 = all)."""
    facts_source: str = ""
    """Dense model whose correctly answered facts define retention; empty = each MoE's source (provenance.json), or the model itself."""
    facts_max_new_tokens: int = 32
    """Greedy reply length for fact questions."""
    facts_batch: int = 16
    """Fact questions generated together."""
    allow_code_execution: bool = False
    """Allow HumanEval to run model-generated code. Each program runs in `python -I` in an empty temporary folder with
    CPU, memory and wall-clock limits and, where the Linux kernel allows, in a new network namespace (no network) under a
    Landlock ruleset (reads only the standard library and system libraries, writes only its folder, no TCP); eval.json
    records which of these layers applied (`humaneval.sandbox`) and a warning names any that is missing. Not a hardened
    jail: it runs as your user on your kernel."""
    humaneval_limit: int = 0
    """Evaluate only the first N problems of HumanEval's evaluation part (0 = all of it: the problems, chosen by a hash of
    their prompts, that the default training mix leaves out)."""
    speed_batch: int = 4
    """Prefill speed: sequences per batch."""
    speed_seq_len: int = 256
    """Prefill speed: tokens per sequence (also the context for analytic FLOPs)."""
    repeats: int = 3
    """Timing repeats (median reported)."""
    device: str = "auto"
    """Device for every model."""
    dtype: str = "auto"
    """Weight dtype for every model."""
    trust_remote_code: bool = False
    """Allow remote modeling code for hub/folder models."""
    out: str = "runs/demo/eval"
    """Output folder: eval.json, eval.md, curve PNGs."""

    def __post_init__(self) -> None:
        DataArgs.__post_init__(self)
        if isinstance(self.model, str):
            self.model = [self.model]
        if not self.model:
            raise TinyOnnError("give at least one --model")
        check_device(self.device)
        for name in ("eval_tokens", "general_tokens", "facts_max_new_tokens", "facts_batch", "speed_batch", "repeats"):
            if getattr(self, name) < 1:
                raise TinyOnnError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("facts_limit", "humaneval_limit"):
            if getattr(self, name) < 0:
                raise TinyOnnError(f"{name} must be 0 (all) or positive, got {getattr(self, name)}")
        if self.speed_seq_len < 2:
            raise TinyOnnError(f"speed_seq_len must be at least 2, got {self.speed_seq_len}")
        if not self.task_list:
            raise TinyOnnError(f"no task given (--tasks {self.tasks!r}); known: {', '.join(KNOWN_TASKS)}, mc:FILE.jsonl")
        for task in self.task_list:
            if task not in KNOWN_TASKS and not task.startswith("mc:"):
                hint = ("; tasks are separated by commas, so a task file's name cannot hold one: rename the file"
                        if "." in task or "/" in task else "")
                raise TinyOnnError(f"unknown task {task!r}; known: {', '.join(KNOWN_TASKS)}, mc:FILE.jsonl{hint}")
        if "humaneval" in self.task_list and not self.allow_code_execution:
            raise TinyOnnError("HumanEval runs model-generated code: pass --allow-code-execution to allow it")

    @property
    def task_list(self) -> list[str]:
        """The tasks, each stripped of spaces (also a task file's name after "mc:")."""
        tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        return ["mc:" + t[3:].strip() if t.startswith("mc:") else t for t in tasks]


def curve_top_ks(num_experts: int, top_k: int, candidates: int = 0) -> list[int]:
    """The top-k values of a sparsity curve: a fixed ladder up to every expert for up to 100 experts; for more (one-
    neuron experts) multiples of the model's own top-k, from a quarter to four times it. Always the model's top-k, and
    never more than a two-stage router's candidates (the experts beyond them would add nothing)."""
    limit = min(num_experts, candidates) if candidates else num_experts
    if num_experts <= 100:
        ladder = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 100, num_experts}
    else:
        ladder = {max(1, round(top_k * f)) for f in (0.25, 0.5, 0.75, 1.5, 2, 3, 4)}
    return sorted({k for k in ladder | {top_k} if k <= limit})


def sparsity_curve(model, held, ids: torch.Tensor, source_neurons: int, repeats: int) -> list[dict]:
    """Perplexity and prefill speed of one MoE at the top-k values of `curve_top_ks` and a few top-p values."""
    c = model.config
    k0 = c.num_experts_per_tok
    ks = curve_top_ks(c.num_experts, k0, getattr(c, "router_candidates", 0))
    points = []
    for k, p in [(k, 0.0) for k in ks] + [(k0, p) for p in (0.5, 0.7, 0.9)]:
        with model.routing_settings(top_k=k, top_p=p):
            chosen = _mean_experts_per_token(model, held)
            active = (c.shared_expert_intermediate_size + chosen * c.moe_intermediate_size) / source_neurons
            points.append({"top_k": k, "top_p": p, "experts_per_token": chosen, "active_fraction": active,
                           "ppl": perplexity(model, held)["ppl"],
                           "prefill_tokens_per_second": prefill_tokens_per_second(model, ids, repeats)})
    return points


@torch.no_grad()
def _mean_experts_per_token(model, held) -> float:
    batch = next(held.batches(4))
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    mask = batch["attention_mask"].reshape(-1).bool()
    return float(torch.stack([s[mask].float().sum(-1).mean() for s in out.expert_selections]).mean())


@dataclass(frozen=True)
class TaskFiles:
    """What the tasks read from files, read once before the first model so that every model is scored on the same
    items and text even if a file changes during the run: the multiple-choice items by task path, and the general
    text's documents (None: the general task is not run)."""

    mc_items: dict[str, tuple[str, list]] = field(default_factory=dict)
    general_docs: list[str] | None = None


def read_task_files(cfg: EvalConfig) -> TaskFiles:
    """Read `cfg`'s multiple-choice files and general text (each file's errors come here, before any model)."""
    return TaskFiles(mc_items={task[3:]: load_mc(task[3:]) for task in cfg.task_list if task.startswith("mc:")},
                     general_docs=general_documents(cfg.general) if "general" in cfg.task_list else None)


def evaluate_model(spec: str, cfg: EvalConfig, within: Callable | None = None, files: TaskFiles | None = None) -> dict:
    """Evaluate one model on `cfg`'s tasks. `within(model)`: a context manager every task runs inside (e.g. an oracle
    router from `tiny_onn.eval.oracle`); `files`: the task files already read (None: read here)."""
    files = read_task_files(cfg) if files is None else files
    src = load_source(SourceArgs(model=spec, device=cfg.device, dtype=cfg.dtype,
                                 trust_remote_code=cfg.trust_remote_code), dense_only=False)
    with within(src.model) if within is not None else nullcontext():
        return _evaluate_loaded(spec, src, cfg, files)


def _evaluate_loaded(spec: str, src, cfg: EvalConfig, files: TaskFiles) -> dict:
    model, tok = src.model, src.tokenizer
    warn_if_beyond_positions(model.config, cfg.seq_len, "--seq-len")
    if "speed" in cfg.task_list:
        warn_if_beyond_positions(model.config, cfg.speed_seq_len, "--speed-seq-len")
    is_moe = model.config.model_type == "tiny_onn"
    row: dict = {"model": spec, "origin": src.origin, "kind": "moe" if is_moe else "dense",
                 "tokenizer": tokenizer_digest(tok)}
    row["params"] = parameter_counts(model)
    row["flops_per_token"] = flops_per_token(model, cfg.speed_seq_len)
    if src.origin.startswith(("bundled GGUF", "GGUF")):
        from tiny_onn.sources.loading import smollm2_gguf_path

        gguf = smollm2_gguf_path() if spec == "smollm2" else Path(spec)
        row["note"] = "weights dequantized from the 4-bit GGUF: its quality is the Q4 model's"
        row["gguf_file_bytes"] = gguf.stat().st_size
    held = None
    tasks = cfg.task_list
    if "ppl" in tasks or "curve" in tasks:
        held = build_dataset(tok, cfg, "heldout", max_tokens=cfg.eval_tokens)
    if "ppl" in tasks:
        row["perplexity"] = perplexity(model, held)
    if "general" in tasks:
        general = build_general_dataset(tok, cfg.general, cfg.seq_len, cfg.general_tokens, files.general_docs)
        row["general"] = perplexity(model, general)
        if not row["general"]["tokens"]:
            raise TinyOnnError(f"the general text {cfg.general!r} gave no token to score (its first "
                               f"{general.num_tokens} token(s) predict none): give a longer text or a larger "
                               "--general-tokens")
        if general.num_tokens < cfg.general_tokens:
            log.warning("general text %s holds %d tokens, fewer than --general-tokens %d: its perplexity (%d tokens "
                        "scored) is noisier than usual", cfg.general, general.num_tokens, cfg.general_tokens,
                        row["general"]["tokens"])
    if "facts" in tasks:
        row["facts"] = facts_row(spec, model, tok, cfg)
    if "probe" in tasks:
        row["probe"] = factual_probe(model, tok)
    for task in tasks:
        if task.startswith("mc:"):
            fmt, items = files.mc_items[task[3:]]
            warn_if_beyond_positions(model.config, longest_mc_sequence(tok, items), f"the longest item of {task}")
            row.setdefault("mc", {})[task[3:]] = {"format": fmt, **score_mc(model, tok, items)}
    if "humaneval" in tasks:
        row["humaneval"] = humaneval_pass_at_1(model, tok, cfg.allow_code_execution, cfg.humaneval_limit)
    ids = None
    if "speed" in tasks or ("curve" in tasks and is_moe):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(10, model.config.vocab_size, (cfg.speed_batch, cfg.speed_seq_len), generator=g)
        ids = ids.to(next(model.parameters()).device)
    if "speed" in tasks:
        row["prefill_tokens_per_second"] = prefill_tokens_per_second(model, ids, cfg.repeats)
        row["decode_tokens_per_second"] = decode_tokens_per_second(model, ids[:1, :32], 32, cfg.repeats)
    row["memory"] = memory(model)
    if "curve" in tasks and is_moe:
        source_neurons = _source_neurons(spec, model)
        row["curve"] = sparsity_curve(model, held, ids, source_neurons, cfg.repeats)
    del model
    return row


def evaluation_facts(cfg: EvalConfig) -> list[Fact]:
    """The evaluation-split facts scored by `eval` (a fixed subset when `facts_limit` is set)."""
    facts = sorted(load_facts(cfg.facts, "eval"), key=lambda f: f.uid)
    if not facts:
        raise TinyOnnError(f"the facts {cfg.facts!r} have none in their evaluation split (a fact without a \"split\" "
                           "field is assigned by its content hash): mark the ones to score with \"split\": \"eval\"")
    return facts[: cfg.facts_limit] if cfg.facts_limit else facts


def check_facts_source(spec: str) -> None:
    """One clear error, before any model is evaluated, for a `--facts-source` that cannot be the dense source: a local
    path that does not exist (a name of the form org/model may still be on the hub) or a carved MoE folder."""
    if not spec or spec == SMOLLM2_ALIAS:
        return
    path = Path(spec).expanduser()
    config = path / "config.json"
    if path.is_dir() and config.is_file() and read_json(config, "model config").get("model_type") == "tiny_onn":
        raise TinyOnnError(f"--facts-source {spec} is a carved MoE; give the dense source whose known facts define "
                           "retention (the model it was carved from)")
    if (spec.endswith(".gguf") or looks_like_local_path(spec)) and not path.exists():
        raise TinyOnnError(f"--facts-source {spec}: no such file or folder; give the dense source's folder, a .gguf "
                           "or smollm2")


def check_recorded_sources(cfg: EvalConfig) -> None:
    """One clear error, before any model is evaluated, when a MoE's retention would be measured against a source
    recorded in its provenance.json that is no longer where it was carved from (a local folder or file since moved)."""
    if cfg.facts_source:
        return
    for spec in cfg.model:
        prov = Path(spec) / "provenance.json"
        if not prov.is_file():
            continue
        record = read_json(prov, "provenance")
        source, absolute = record.get("source_model") or "", record.get("source_model_path")
        if absolute and not Path(recorded_model(record, "source_model")).expanduser().exists():
            raise TinyOnnError(f"{spec} was carved from {source} ({absolute}), which is no longer there, so its "
                               "dense-known facts cannot be computed; give the dense source with --facts-source")


def facts_source_of(spec: str, cfg: EvalConfig) -> str:
    """The dense source whose known facts define a model's retention."""
    if cfg.facts_source:
        return cfg.facts_source
    prov = Path(spec) / "provenance.json"
    if prov.is_file():
        source = recorded_model(read_json(prov, "provenance"), "source_model")
        if source:
            return source
    return spec


def facts_row(spec: str, model, tok, cfg: EvalConfig) -> dict:
    """Accuracy on the evaluation facts, and retention of those the source answers correctly (computed once per
    source and stored)."""
    facts = evaluation_facts(cfg)
    answers = answer_facts(model, tok, facts, cfg.facts_max_new_tokens, cfg.facts_batch)
    source = facts_source_of(spec, cfg)
    store = KnownFacts(source, cfg.facts_max_new_tokens)
    missing = store.missing(facts)
    if missing and model.config.model_type != "tiny_onn" and source_identity(spec) == store.identity:
        store.add(answers)  # this model is the source itself
    elif missing:
        log.info("computing the facts %s knows (once; stored in %s)", source, store.path)
        src = load_source(SourceArgs(model=source, device=cfg.device, dtype=cfg.dtype,
                                     trust_remote_code=cfg.trust_remote_code))
        store.add(answer_facts(src.model, src.tokenizer, missing, cfg.facts_max_new_tokens, cfg.facts_batch))
        del src
    return {**facts_scores(answers, store.known(facts)), "source": source, "known_store": str(store.path),
            "answers": answers}


def _source_neurons(spec: str, model) -> int:
    import json

    from tiny_onn.model.export import read_carve_metadata

    prov = Path(spec) / "provenance.json"
    c = model.config
    if prov.is_file():
        layer0 = json.loads(prov.read_text())["layers"][0]
        meta = read_carve_metadata(spec) or {}
        if "active_fraction" in meta and c.num_experts_per_tok:
            return round((c.shared_expert_intermediate_size + c.num_experts_per_tok * c.moe_intermediate_size)
                         / meta["active_fraction"])
        return len(layer0["shared_expert"]["neurons"]) + sum(len(e["neurons"]) for e in layer0["experts"])
    return c.shared_expert_intermediate_size + c.num_experts * c.moe_intermediate_size


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


_COLUMNS = (  # (header, value of a row or None, format)
    # four significant digits: 134.5M for SmolLM2, 0.04150M for a test-sized model (not 0.0M)
    ("total params", lambda r: r["params"]["total"] / 1e6, ".4g", "M"),
    ("active params/token", lambda r: r["params"]["active_per_token"] / 1e6, ".4g", "M"),
    ("GFLOPs/token", lambda r: r["flops_per_token"] / 1e9, ".4g", ""),
    ("mix held-out ppl", lambda r: r.get("perplexity", {}).get("ppl"), ".2f", ""),
    ("general-text ppl", lambda r: r.get("general", {}).get("ppl"), ".2f", ""),
    ("fact acc", lambda r: r.get("facts", {}).get("accuracy"), ".3f", ""),
    ("fact retention", lambda r: r.get("facts", {}).get("retention"), ".3f", ""),
    ("probe acc", lambda r: r.get("probe", {}).get("accuracy"), ".2f", ""),
    ("prefill tok/s", lambda r: r.get("prefill_tokens_per_second"), ".0f", ""),
    ("decode tok/s", lambda r: r.get("decode_tokens_per_second"), ".1f", ""),
    ("weights MB", lambda r: r["memory"]["weights_bytes"] / 2**20, ".4g", ""),
)


def markdown_table(rows: list[dict]) -> str:
    """One row per model; a column appears when some model has its value."""
    cols = [c for c in _COLUMNS if any(c[1](r) is not None for r in rows)]
    lines = ["| model | kind | " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for r in rows:
        cells = [_fmt(get(r), fmt) + (unit if get(r) is not None else "") for _, get, fmt, unit in cols]
        lines.append(f"| {r['model']} | {r['kind']} | " + " | ".join(cells) + " |")
    extra = []
    for r in rows:
        for path, sc in r.get("mc", {}).items():
            extra.append(f"| {r['model']} | {path} ({sc['format']}) | acc {sc['acc']:.3f}, acc_norm {sc['acc_norm']:.3f} "
                         f"| {sc['n']} |")
        if "humaneval" in r:
            extra.append(f"| {r['model']} | HumanEval | pass@1 {r['humaneval']['pass@1']:.3f} | {r['humaneval']['n']} |")
    if extra:
        lines += ["", "| model | task | score | items |", "|---|---|---|---|", *extra]
    lines += scored_tokens_note(rows)
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(r.get("tokenizer", ""), []).append(r["model"])
    if len(groups) > 1:
        names = "; ".join(", ".join(models) for models in groups.values())
        lines += ["", f"Note: these models tokenize differently ({names}). Perplexities are per token of each model's "
                  "own tokenizer and chat template, so they compare only within a group."]
    return "\n".join(lines)


def scored_tokens_note(rows: list[dict]) -> list[str]:
    """How many tokens each perplexity was scored on (one line when every model's are the same), so that a
    perplexity from a small text file reads as what it is."""
    def counts(r: dict) -> str:
        parts = [f"{label} {r[key]['tokens']:,}" for key, label in (("perplexity", "mix held-out"),
                                                                     ("general", "general text"))
                 if "tokens" in r.get(key, {})]
        return ", ".join(parts)

    per_model = {r["model"]: counts(r) for r in rows if counts(r)}
    if not per_model:
        return []
    if len(set(per_model.values())) == 1:
        return ["", f"Perplexities scored on: {next(iter(per_model.values()))} tokens."]
    return ["", "Perplexities scored on (tokens): " + "; ".join(f"{m}: {c}" for m, c in per_model.items()) + "."]


def _short_name(spec: str) -> str:
    """A model's name for a plot legend: a folder's name (its parent's for a training run's `model` folder)."""
    path = Path(spec)
    return path.parent.name if path.name == "model" and path.parent.name else path.name or spec


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in rows:
        name = _short_name(r["model"])
        if r["kind"] == "dense" and "perplexity" in r:
            a1.axhline(r["perplexity"]["ppl"], ls="--", color="k", lw=0.8, label=f"dense {name}")
            if "prefill_tokens_per_second" in r:
                a2.axhline(r["prefill_tokens_per_second"], ls="--", color="k", lw=0.8, label=f"dense {name}")
        if "curve" in r:
            pts = sorted((p for p in r["curve"] if not p["top_p"]), key=lambda p: p["active_fraction"])
            xs = [p["active_fraction"] for p in pts]
            a1.plot(xs, [p["ppl"] for p in pts], "o-", label=f"{name} top-k")
            a2.plot(xs, [p["prefill_tokens_per_second"] for p in pts], "o-", label=f"{name} top-k")
            tp = [p for p in r["curve"] if p["top_p"]]
            a1.scatter([p["active_fraction"] for p in tp], [p["ppl"] for p in tp], marker="x", label=f"{name} top-p")
    a1.set_yscale("log")
    a1.set_xlabel("active fraction of source FFN neurons")
    a1.set_ylabel("held-out perplexity")
    a2.set_xlabel("active fraction of source FFN neurons")
    a2.set_ylabel("prefill tokens/s")
    handles, labels = a1.get_legend_handles_labels()
    fig.legend(handles, [figure_text(label) for label in labels], fontsize=7, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.045 * ((len(labels) + 1) // 2) + 0.03, 1, 1))  # room for the legend below
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: EvalConfig) -> Path:
    check_replaceable(cfg.out, "eval.json")
    for spec in cfg.model:  # every model's path before the first one's work
        check_model_spec(spec)
    repeated = sorted({spec for spec in cfg.model if cfg.model.count(spec) > 1})
    if repeated:
        log.warning("--model %s is given more than once: each copy is evaluated again and gets a row of its own",
                    ", ".join(repeated))
    if "facts" in cfg.task_list:
        evaluation_facts(cfg)  # a fact file's errors before any model loads
        check_facts_source(cfg.facts_source)
        if cfg.facts_source:
            check_model_spec(cfg.facts_source, "--facts-source")
        check_recorded_sources(cfg)
    files = read_task_files(cfg)  # once, before any model: their errors up front, the same items for every model
    rows = []
    for spec in cfg.model:
        log.info("evaluating %s", spec)
        rows.append(evaluate_model(spec, cfg, files=files))
    if "curve" in cfg.task_list and not any(r.get("kind") == "moe" for r in rows):
        log.warning("--tasks curve sweeps a MoE's top-k and top-p; none of the models evaluated is a MoE, so there is "
                    "no curve (give a carved or trained MoE folder among the models)")
    report = {"format": "tiny_onn.eval/1", "models": rows, "config": config_to_dict(cfg), "versions": versions()}
    with atomic_dir(cfg.out, "eval.json") as tmp:
        write_json(tmp / "eval.json", report)
        (tmp / "eval.md").write_text(markdown_table(rows) + "\n")
        if any("curve" in r for r in rows):
            plot_curves(rows, tmp / "sparsity_quality.png")
    return Path(cfg.out)


def summary(cfg: EvalConfig, out: Path) -> str:
    written = ", ".join(f for f in ("eval.json", "eval.md", "sparsity_quality.png") if (Path(out) / f).is_file())
    return (Path(out) / "eval.md").read_text() + f"\nwritten to {out} ({written})"

