"""The seed's remaining training mechanisms, each on vs off: SmolLM2 carved at 25 % active, every run with the same
tokens under the knowledge issue's recipe (`kd-both` by default: pure KL to the dense teacher, T = 1, on the mix + the
teacher-written corpus), scored on fact retention, general-text and mix perplexity ÷ dense, NMI(top-1 expert,
category) and step time; then perpetual training (learn one category only, plain CE) from the recovered baseline.

    python benchmarks/seed_mechanisms.py --corpus runs/corpus-smollm2                 # every row, then perpetual
    python benchmarks/seed_mechanisms.py --corpus ... --rows baseline gaussian-router  # some rows (others kept)
    python benchmarks/seed_mechanisms.py --corpus ... --rows --perpetual full min1     # some perpetual rows only

Rows (`--rows`): `baseline` (policy full), `gaussian-router` (the same carve with Gaussian routers, calibrated by
`tiny_onn.carve.reroute`), `router-distill`, `specificity`, `input-embedding` / `input-context` (linear routers that read
the token embedding / the running mean of the sequence's embeddings, calibrated the same way), `smk2` (policy smk2,
k = 4) and `smk2-pi-schedule` (its PI-driven learning rate and expert count). Perpetual rows (`--perpetual`), each
`--forget-steps` steps of plain CE on `--forget-category` from the baseline's trained model: `full`, `smk2`, `min1`
(perpetual mode: policy smk, min_k = 1), `min1-replay`, `min1-ewc`, `min1-both` (replay and EWC on the recipe's data).
Results are written after every run to benchmarks/results/seed_mechanisms.json; rows already there are skipped
(`--redo` runs them again). The machine is shared: step times are medians of noisy steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402
from knowledge_recovery import (  # noqa: E402
    RECIPES,
    SOURCE,
    ensure_corpus,
    ensure_start_model,
    evaluate,
    ratios,
    train_and_evaluate,
    train_config,
)

from tiny_onn.carve.reroute import reroute  # noqa: E402
from tiny_onn.data import DataArgs, build_dataset  # noqa: E402
from tiny_onn.eval.harness import EvalConfig  # noqa: E402
from tiny_onn.interpret.profiles import layer_nmi, record_routing  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source  # noqa: E402

START = "moe25"
ROUTER_VARIANTS = {"gaussian-router": ("gaussian", "ffn"), "input-embedding": ("linear", "embedding"),
                   "input-context": ("linear", "context")}
ROWS = {  # row -> (start model variant, TrainConfig overrides)
    "baseline": (START, {}),
    "gaussian-router": ("gaussian-router", {}),
    "router-distill": (START, {"router_distill": "{router_distill}"}),
    "specificity": (START, {"specificity": "{specificity}"}),
    "input-embedding": ("input-embedding", {}),
    "input-context": ("input-context", {}),
    "smk2": (START, {"policy": "smk2"}),
    "smk2-pi-schedule": (START, {"policy": "smk2", "pi_schedule": True}),
}
PERPETUAL = {  # row -> TrainConfig overrides for learning the forget category
    "full": {"policy": "full"},
    "smk2": {"policy": "smk2"},
    "min1": {"perpetual": True},
    "min1-replay": {"perpetual": True, "replay_data": "{earlier}"},
    "min1-ewc": {"perpetual": True, "ewc": "{ewc}", "ewc_data": "{earlier}"},
    "min1-both": {"perpetual": True, "replay_data": "{earlier}", "ewc": "{ewc}", "ewc_data": "{earlier}"},
}
PROTOCOL_KEYS = ("recipe", "steps", "batch_size", "seq_len", "lr", "k", "kd_temperature", "eval_tokens",
                 "general_tokens", "facts_limit", "nmi_tokens", "router_distill", "specificity")
PERPETUAL_KEYS = ("forget_category", "forget_steps", "replay_size", "replay_ratio", "ewc", "ewc_samples")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--perpetual", nargs="*", choices=list(PERPETUAL), default=list(PERPETUAL))
    p.add_argument("--recipe", choices=list(RECIPES), default="kd-both", help="the knowledge issue's recipe to use")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--k", type=int, default=4, help="smk2: experts updated per layer and step")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--router-distill", type=float, default=1.0, help="weight of the router-distill row")
    p.add_argument("--specificity", type=float, default=1.0, help="weight of the specificity row")
    p.add_argument("--corpus", default="runs/corpus-smollm2", help="teacher-written corpus (made if missing)")
    p.add_argument("--corpus-prompts", type=int, default=576, help="prompts of the corpus when it has to be made")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--general-tokens", type=int, default=4096)
    p.add_argument("--facts-limit", type=int, default=240)
    p.add_argument("--nmi-tokens", type=int, default=4096, help="held-out mix tokens for NMI(top-1 expert, category)")
    p.add_argument("--calib-tokens", type=int, default=8192, help="router calibration of the rerouted start models")
    p.add_argument("--calib-steps", type=int, default=300)
    p.add_argument("--forget-category", default="math")
    p.add_argument("--forget-steps", type=int, default=30)
    p.add_argument("--replay-size", type=int, default=256)
    p.add_argument("--replay-ratio", type=float, default=0.25)
    p.add_argument("--ewc", type=float, default=1.0, help="EWC strength λ of the perpetual rows")
    p.add_argument("--ewc-samples", type=int, default=16)
    p.add_argument("--workdir", default="runs/bench/knowledge", help="start models are shared with knowledge_recovery")
    p.add_argument("--redo", action="store_true", help="run rows that are already in the result file again")
    args = p.parse_args()

    corpus = corpus_folder(args)
    protocol = {key: getattr(args, key) for key in PROTOCOL_KEYS}
    protocol["tokens_per_run"] = args.steps * args.batch_size * args.seq_len
    protocol["corpus"] = corpus_identity(corpus)
    results = load_results(protocol)
    results["commands"] = results.get("commands", []) + ["python " + " ".join(sys.argv)]
    work = Path(args.workdir) / "seed" / f"{args.recipe}-{args.steps}x{args.batch_size}x{args.seq_len}"
    ecfg = EvalConfig(model=[SOURCE], tasks="ppl,general,facts", eval_tokens=args.eval_tokens, seq_len=args.seq_len,
                      general_tokens=args.general_tokens, facts_limit=args.facts_limit, facts_source=SOURCE,
                      device="cpu", out=str(work / "eval-unused"))
    if "dense" not in results:
        results["dense"] = evaluate(SOURCE, ecfg)
        save(results)
    dense = results["dense"]
    for row in args.rows:
        if row in results["runs"] and not args.redo:
            continue
        variant, overrides = ROWS[row]
        start = start_model(variant, args, corpus)
        if variant not in results["start"]:
            results["start"][variant] = evaluate_row(str(start), ecfg, dense, args)
            save(results)
        data, kd, ce = RECIPES[args.recipe]
        out = work / row
        cfg = train_config(args, start, out, data.format(corpus=corpus), kd, ce, "full", args.k, 0)
        apply(cfg, overrides, args, earlier="")
        results["runs"][row] = {"start": variant, "overrides": {k: getattr(cfg, k) for k in overrides},
                                **train_evaluate_nmi(cfg, out, ecfg, dense, args)}
        save(results)
        print(f"{row}: {summarise(results['runs'][row])}", flush=True)
    if args.perpetual:
        perpetual(args, results, work, ecfg, dense, corpus)


def corpus_folder(args) -> str:
    """The recipe's corpus: a finished corpus folder is used as it is; otherwise it is generated (ensure_corpus)."""
    meta = Path(args.corpus) / "corpus.json"
    if "{corpus}" not in RECIPES[args.recipe][0]:
        return ""
    if meta.is_file() and json.loads(meta.read_text()).get("complete"):
        return args.corpus
    return ensure_corpus(args)


def corpus_identity(corpus: str) -> dict | None:
    """What distinguishes one teacher-written corpus from another (rows trained on different corpora never mix)."""
    if not corpus:
        return None
    meta = json.loads((Path(corpus) / "corpus.json").read_text())
    return {k: meta.get(k) for k in ("teacher", "tokenizer_digest", "records", "tokens")}


def start_model(variant: str, args, corpus: str) -> Path:
    """The carved 25 % MoE of knowledge_recovery, or a copy of it with other routers (made once)."""
    base = ensure_start_model(START, Path(args.workdir), corpus)
    if variant == START:
        return base
    folder = Path(args.workdir) / "start" / f"{START}-{variant}"
    if not (folder / "config.json").is_file():
        score, side = ROUTER_VARIANTS[variant]
        reroute(base, folder, router_score=score, router_input=side, calib_tokens=args.calib_tokens,
                calib_steps=args.calib_steps, calib_refine="adam")
    return folder


def apply(cfg, overrides: dict, args, earlier: str) -> None:
    """Set the row's TrainConfig fields ('{name}' values come from the benchmark's arguments) and re-validate."""
    values = {"router_distill": args.router_distill, "specificity": args.specificity, "ewc": args.ewc,
              "earlier": earlier}
    for key, value in overrides.items():
        if isinstance(value, str) and value.startswith("{"):
            value = values[value.strip("{}")]
        setattr(cfg, key, value)
    if cfg.replay_data:
        cfg.replay_size, cfg.replay_ratio = args.replay_size, args.replay_ratio
    if cfg.ewc:
        cfg.ewc_samples = args.ewc_samples
    cfg.__post_init__()


def train_evaluate_nmi(cfg, out: Path, ecfg: EvalConfig, dense: dict, args) -> dict:
    """knowledge_recovery's train_and_evaluate, plus the trained model's NMI and the training log's mechanism values."""
    row = train_and_evaluate(cfg, out, ecfg, dense)
    row["nmi"] = routing_nmi(out / "model", args)
    report = json.loads((out / "train.json").read_text())
    trained = [h for h in report["history"] if not h.get("skipped")]  # steps without response tokens did not train
    last = trained[-1]
    row["final_log"] = {k: last[k] for k in ("ce", "kd", "router_distill", "specificity", "ewc", "pi", "lr_scale",
                                             "experts_updated_mean") if k in last}
    row["experts_updated_mean"] = sum(h["experts_updated_mean"] for h in trained) / len(trained)
    return row


def evaluate_row(spec: str, ecfg: EvalConfig, dense: dict, args) -> dict:
    row = evaluate(spec, ecfg)
    return {**row, "ratios": ratios(row, dense), "nmi": routing_nmi(Path(spec), args)}


def routing_nmi(folder: Path, args) -> dict:
    """NMI between each held-out mix token's top-1 expert and its category, per layer and mean."""
    src = load_source(SourceArgs(model=str(folder), device="cpu"), dense_only=False)
    held = build_dataset(src.tokenizer, DataArgs(data="default", seq_len=args.seq_len), "heldout",
                         max_tokens=args.nmi_tokens)
    per_layer = layer_nmi(record_routing(src.model, held, max_tokens=args.nmi_tokens))
    return {"mean": sum(per_layer) / len(per_layer), "per_layer": per_layer}


def perpetual(args, results: dict, work: Path, ecfg: EvalConfig, dense: dict, corpus: str) -> None:
    """From the baseline's trained model, learn --forget-category only (plain CE) under each perpetual row."""
    base = results["runs"].get("baseline")
    if base is None:
        raise SystemExit("the perpetual rows start from the baseline row's trained model: run --rows baseline first")
    settings = {key: getattr(args, key) for key in PERPETUAL_KEYS}
    settings["tokens_per_run"] = args.forget_steps * args.batch_size * args.seq_len
    section = results.get("perpetual")
    if section is None or any(section["settings"].get(k) != settings[k] for k in PERPETUAL_KEYS):
        if section is not None:
            results.setdefault("perpetual_previous", []).append(section)
            print("perpetual rows with other settings are kept under perpetual_previous; starting anew", flush=True)
        section = results["perpetual"] = {"start": "baseline", "settings": settings, "after": {}}
    earlier = RECIPES[args.recipe][0].format(corpus=corpus)  # the data the recovered model was trained on
    for name in args.perpetual:
        if name in section["after"] and not args.redo:
            continue
        out = work / f"perpetual-{args.forget_category}-{name}"
        cfg = train_config(args, Path(base["model_folder"]), out, "default", 0.0, 1.0, "full", args.k, 0,
                           categories=args.forget_category)
        cfg.steps = args.forget_steps
        apply(cfg, PERPETUAL[name], args, earlier)
        row = train_evaluate_nmi(cfg, out, ecfg, dense, args)
        row["overrides"] = {k: getattr(cfg, k) for k in ("policy", "min_k", "max_k", "replay_data", "replay_ratio",
                                                         "replay_size", "ewc", "ewc_data", "ewc_samples")}
        section["after"][name] = row
        save(results)
        print(f"perpetual {name}: {forgetting_summary(base, row, args.forget_category)}", flush=True)


def summarise(row: dict) -> str:
    r = row["ratios"]
    return (f"retention {row['fact_retention']:.3f} ({row['facts_retained']}/{row['facts_known']}), general ppl "
            f"×{r['general_ppl']:.2f}, mix ppl ×{r['mix_ppl']:.2f}, NMI {row['nmi']['mean']:.3f}, step "
            f"{row['step_seconds_median']:.1f} s")


def forgetting_summary(before: dict, after: dict, category: str) -> str:
    change = {c: after["mix_ppl_by_category"][c] / before["mix_ppl_by_category"][c] for c in before["mix_ppl_by_category"]}
    return (f"ppl after/before {', '.join(f'{c} {v:.2f}' for c, v in change.items())}; general "
            f"{after['general_ppl'] / before['general_ppl']:.2f}; retention {before['fact_retention']:.3f} -> "
            f"{after['fact_retention']:.3f} (learned: {category})")


def load_results(protocol: dict) -> dict:
    path = RESULTS / "seed_mechanisms.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if all(old["protocol"].get(k) == protocol[k] for k in (*PROTOCOL_KEYS, "corpus")):
            kept = {k: old[k] for k in ("commands", "dense", "start", "runs", "perpetual", "perpetual_previous")
                    if k in old}
            return {"protocol": protocol, **kept}
        stale = path.with_name("seed_mechanisms.previous.json")
        shutil.copy(path, stale)
        print(f"the result file holds another protocol: kept as {stale}, starting a new one", flush=True)
    return {"protocol": protocol, "start": {}, "runs": {}}


def save(results: dict) -> None:
    write_result("seed_mechanisms", {
        "source": SOURCE, "start_model": START,
        "note": "2 CPU cores shared with other jobs: step times are noisy medians; one seed per row",
        **results})


if __name__ == "__main__":
    main()
