"""Which training recipe brings the dense source's knowledge back into a carved MoE? SmolLM2 carved at 25 % and 50 %
active, every run with the same token budget, scored on fact retention, general-text perplexity and mix perplexity.

    python benchmarks/knowledge_recovery.py                                  # the default grid (see --help)
    python benchmarks/knowledge_recovery.py --models moe25 --recipes kd-both --policies smk2 --append
    python benchmarks/knowledge_recovery.py --models dense width25 --recipes kd-both --append   # the controls
    python benchmarks/knowledge_recovery.py --forgetting moe25:kd-both:full:0 --append         # the forgetting test

Models: `moe25` / `moe50` (dsc carve, shared 12.5 % + 14 experts of 96, top-2 / top-6; `moe25k` / `moe50k`: the same
carve from a scan that also sees the teacher-written corpus, so the shared expert and the clustering see knowledge
categories; `moe25c` / `moe50c`: the same carve with routers calibrated layer by layer on the carved model's own FFN
inputs, `--calib-inputs carved`; `moe25f` / `moe50f`: finer experts, shared 12.5 % + 56 experts of 24, top-8 /
top-24, the same active neurons; `moe25n` / `moe50n`: single-neuron experts, shared 12.5 % + 1,344 experts of one
neuron, top-192 / top-576, with rank-64 `lowrank` routers that predict each neuron's activation; `moe25n128` /
`moe50n128`: the same with rank-128 routers; `moe25g` / `moe50g`: the same single-neuron experts with `gate` routers,
which compute every routed neuron's exact gate and scale |act(gate)| by the neuron's up root mean square and down norm
— the gate rows are then active for every token, so these match the 50 % layouts' / more active parameters; `moe25g64` /
`moe50g64`: with a rank-64 up predictor; `moe25gc2` / `moe25gc3` / `moe50gc2`: two-stage gate routers, the
2 or 3 × top-k experts of largest estimated score ranked again by their exact |h|·‖d‖, their up rows computed;
`moe25gc2s0`: the same with 2 × top-k candidates and no shared expert, all 1,536 neurons routed, top-384 — as many
up rows per token as `moe25gc3` (768), chosen per token instead of 192 of them fixed; `moe25gc4s0` / `moe50gc2s0`:
every neuron a candidate, so each token runs its exact top 25 % / 50 % of neurons by |h|·‖d‖ — the per-token neuron
oracle of knowledge_ceiling.py made a layout, every gate and up row read: how much any router could keep; a `b` suffix,
e.g. `moe25gc2s0b`: the same carve with `--output-bias`, each block's output bias fitted to the mean of what the
neurons a token does not run would add), `width25` / `width50` / `width67` (the
dense source with each FFN cut to its top 25 % / 50 % / 67 % neurons by importance a·s: same active neurons, no router;
`width50` has the active parameters of `moe25g`, `width67` about those of `moe50g`) and
`dense` (the source itself, trained the same way: separates adaptation to our data from what sparsity costs).
Recipes: `ce-mix` (cross-entropy on the training mix, the earlier recipe), `kd-mix` (full-vocabulary KL to the dense
teacher on the mix), `kd-corpus` (KL on the teacher-written corpus of `tiny-onn distil-data`), `kd-both` (KL on
both), `ce-both` (cross-entropy on both: the teacher's text without its distribution; the recipe under which the dense
control means something, as KL of the dense source to itself is zero), `kd-both-hidden` (kd-both plus hidden-state
distillation, `--hidden-kd 1`: each decoder layer's output pulled toward the teacher's; `kd-both-hidden10`: weight
10), `kd-both-attn` (kd-both with the attention layers and norms trained too, `--train-attention`, at the same
learning rate), `kd-facts` (KL on the teacher-written corpus plus the teacher's greedy answers to every
training-split fact question, `--facts-corpus`, without the mix: the fact answers are then a third of the tokens,
where kd-both gives the corpus' sampled ones a sixth), `kd-both-anneal` (kd-both with gradual sparsification,
`--top-k-start`: the first step runs twice the MoE's top-k (at most its experts or two-stage candidates), the top-k
falls linearly to the MoE's own over the first half of the steps, the second half runs at it). Every row: fact accuracy and retention (facts the dense source answers correctly), general-text (news)
perplexity ÷ dense, mix held-out perplexity ÷ dense, per category, active parameters, training tokens.
The forgetting test starts from a trained run, learns one category only (plain CE) under each update policy, and
reports what the other categories, the general text and the facts lose.
Writes benchmarks/results/knowledge_recovery.json (rows merge into the protocol with the same settings: --append).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, smollm2_scan, write_result  # noqa: E402

from tiny_onn.carve import CarveConfig  # noqa: E402
from tiny_onn.carve import run as carve  # noqa: E402
from tiny_onn.carve.baselines import save_width_pruned  # noqa: E402
from tiny_onn.data.distil import DistilDataConfig  # noqa: E402
from tiny_onn.data.distil import run as distil_data  # noqa: E402
from tiny_onn.eval.harness import EvalConfig, evaluate_model  # noqa: E402
from tiny_onn.scan import ScanResult  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source  # noqa: E402
from tiny_onn.train import TrainConfig  # noqa: E402
from tiny_onn.train import run as train  # noqa: E402
from tiny_onn.train.trainer import Checkpoints  # noqa: E402

MODELS = ("moe25", "moe50", "moe25k", "moe50k", "moe25c", "moe50c", "moe25f", "moe50f", "moe25n", "moe50n", "moe25n128",
          "moe50n128", "moe25g", "moe50g", "moe25g64", "moe50g64", "moe25gc2", "moe25gc3", "moe50gc2", "moe25gc2s0",
          "moe25gc4s0", "moe50gc2s0", "moe25gc2s0b", "moe25gc4s0b", "moe50gc2s0b", "width25",
          "width50", "width67", "dense")
RECIPES = {  # data, teacher KD weight, CE weight
    "ce-mix": ("default", 0.0, 1.0),
    "kd-mix": ("default", 1.0, 0.0),
    "kd-corpus": ("{corpus}", 1.0, 0.0),
    "kd-both": ("default,{corpus}", 1.0, 0.0),
    "ce-both": ("default,{corpus}", 0.0, 1.0),
    "kd-both-hidden": ("default,{corpus}", 1.0, 0.0),
    "kd-both-hidden10": ("default,{corpus}", 1.0, 0.0),
    "kd-both-attn": ("default,{corpus}", 1.0, 0.0),
    "kd-facts": ("{facts_corpus},{corpus}", 1.0, 0.0),
    "kd-both-anneal": ("default,{corpus}", 1.0, 0.0),
}
# recipes' further TrainConfig settings: hidden-state distillation, attention (and norms) trained beside the FFNs
RECIPE_OPTIONS = {"kd-both-hidden": {"hidden_kd": 1.0}, "kd-both-hidden10": {"hidden_kd": 10.0},
                  "kd-both-attn": {"train_attention": True}, "kd-both-anneal": {"top_k_start_factor": 2.0}}
FORGET_POLICIES = {"full": ("full", 4), "smk": ("smk", 4), "smk2": ("smk2", 4), "smk-min1": ("smk", 1)}
SOURCE = "smollm2"
NEURONS = 1536  # SmolLM2's FFN width
CHECKPOINT_EVERY = 50  # an interrupted run continues from its last checkpoint on the next call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=["moe25", "moe50"])
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--policies", nargs="+", choices=("full", "smk", "smk2"), default=["full"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of experts (MoE) or FFNs (dense controls)")
    p.add_argument("--k", type=int, default=4, help="smk/smk2: experts updated per layer and step")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--corpus", default="runs/corpus-smollm2",
                   help="teacher-written corpus folder (made or extended if missing; one folder per --corpus-prompts)")
    p.add_argument("--corpus-prompts", type=int, default=576, help="prompts the teacher answers (the corpus' records)")
    p.add_argument("--facts-corpus", default="runs/corpus-facts-greedy",
                   help="kd-facts: the teacher's greedy answers to every training-split fact question (made if missing)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="mix held-out tokens")
    p.add_argument("--general-tokens", type=int, default=4096)
    p.add_argument("--facts-limit", type=int, default=240, help="evaluation facts scored per model (fixed subset)")
    p.add_argument("--forgetting", default="", help="MODEL:RECIPE:POLICY:SEED of a finished run to start from")
    p.add_argument("--forget-category", default="math")
    p.add_argument("--forget-steps", type=int, default=40)
    p.add_argument("--forget-policies", nargs="+", choices=list(FORGET_POLICIES), default=list(FORGET_POLICIES))
    p.add_argument("--workdir", default="runs/bench/knowledge")
    p.add_argument("--append", action="store_true", help="merge into the result file's protocol with these settings")
    args = p.parse_args()

    protocol = {key: getattr(args, key) for key in PROTOCOL_KEYS}
    protocol["tokens_per_run"] = args.steps * args.batch_size * args.seq_len
    work = Path(args.workdir) / protocol_name(protocol)
    results = load_results(protocol) if args.append else {"protocol": protocol, "start": {}, "runs": {}, "forgetting": {}}
    results["start"] = {**start_rows_of_other_protocols(protocol, ["dense", *args.models]), **results["start"]}
    results["commands"] = results.get("commands", []) + ["python " + " ".join(sys.argv)]
    ecfg = EvalConfig(model=[SOURCE], tasks="ppl,general,facts", eval_tokens=args.eval_tokens, seq_len=args.seq_len,
                      general_tokens=args.general_tokens, facts_limit=args.facts_limit, facts_source=SOURCE,
                      device="cpu", out=str(work / "eval-unused"))
    if "dense" not in results["start"]:
        results["start"]["dense"] = evaluate(SOURCE, ecfg)
        save(results)
    dense = results["start"]["dense"]

    if args.forgetting:
        forgetting(args, results, work, ecfg, dense)
        return
    needs_corpus = any("{corpus}" in RECIPES[r][0] for r in args.recipes) or any(m.endswith("k") for m in args.models)
    corpus = ensure_corpus(args) if needs_corpus else ""
    facts_corpus = ensure_facts_corpus(args) if any("{facts_corpus}" in RECIPES[r][0] for r in args.recipes) else ""
    for name in args.models:
        start = ensure_start_model(name, Path(args.workdir), corpus)
        if name not in results["start"]:
            row = evaluate(str(start), ecfg)
            results["start"][name] = {**row, "ratios": ratios(row, dense)}
            save(results)
        for recipe in args.recipes:
            for policy in args.policies if name.startswith("moe") else ["full"]:
                for seed in args.seeds:
                    key = f"{name}:{recipe}:{policy}:{seed}"
                    out = work / key.replace(":", "-")
                    data, kd, ce = RECIPES[recipe]
                    cfg = train_config(args, start, out, data.format(corpus=corpus, facts_corpus=facts_corpus), kd, ce, policy, args.k, seed,
                                       **RECIPE_OPTIONS.get(recipe, {}))
                    row = train_and_evaluate(cfg, out, ecfg, dense)
                    results["runs"][key] = {"model": name, "recipe": recipe, "policy": policy, "seed": seed, **row}
                    save(results)
                    print(f"{key}: {summarise(results['runs'][key])}", flush=True)


PROTOCOL_KEYS = ("steps", "batch_size", "seq_len", "lr", "k", "kd_temperature", "eval_tokens", "general_tokens",
                 "facts_limit", "corpus_prompts")
EVAL_KEYS = ("seq_len", "eval_tokens", "general_tokens", "facts_limit")  # what an untrained model's row depends on


LEGACY_CORPUS_PROMPTS = 576  # the corpus of every protocol before corpus_prompts was a key: their names omit it


def protocol_name(protocol: dict) -> str:
    corpus = protocol.get("corpus_prompts", LEGACY_CORPUS_PROMPTS)
    return (f"{protocol['steps']}x{protocol['batch_size']}x{protocol['seq_len']}-lr{protocol['lr']:g}"
            + (f"-corpus{corpus}" if corpus != LEGACY_CORPUS_PROMPTS else ""))


def ensure_corpus(args) -> str:
    """The teacher-written corpus (its first `corpus_prompts` records; generated or extended when missing). A folder
    holding more records is refused: distil-data would cut it to this size, under the runs that used all of it."""
    meta = Path(args.corpus) / "corpus.json"
    records = json.loads(meta.read_text()).get("records", 0) if meta.is_file() else 0
    if records > args.corpus_prompts:
        raise SystemExit(f"{args.corpus} holds {records} records; --corpus-prompts {args.corpus_prompts} would cut it. "
                         f"Pass --corpus with a folder of its own for {args.corpus_prompts} prompts")
    distil_data(DistilDataConfig(model=SOURCE, max_prompts=args.corpus_prompts, batch_size=48, max_new_tokens=160,
                                 device="cpu", out=args.corpus))
    return args.corpus


def ensure_facts_corpus(args) -> str:
    """The teacher's greedy answers (up to 64 tokens) to every training-split fact question (made when missing)."""
    distil_data(DistilDataConfig(model=SOURCE, prompts="facts", max_prompts=0, temperature=0.0, batch_size=64,
                                 max_new_tokens=64, device="cpu", out=args.facts_corpus))
    return args.facts_corpus


def ensure_start_model(name: str, root: Path, corpus: str) -> Path:
    """The carved MoE or the width-pruned control a run starts from (made once, shared by every protocol)."""
    if name == "dense":
        return Path(SOURCE)
    folder = root / "start" / name
    if (folder / "config.json").is_file():
        return folder
    knowledge = name.endswith("k")
    scan = smollm2_scan(folder="runs/bench/scan-knowledge", data=f"default,{corpus}") if knowledge else smollm2_scan()
    if name.startswith("moe"):
        fraction, variant, rank, candidates, no_shared, bias = re.fullmatch(
            r"moe(25|50)([kcf]?|[ng](\d*)(?:c(\d+))?)(s0)?(b)?", name).group(1, 2, 3, 4, 5, 6)
        single_neuron = variant[:1] in ("n", "g")
        shared = 0.0 if no_shared else 0.125
        score = {"n": "lowrank", "g": "gate"}.get(variant[:1], "linear")
        # the same active neurons in every layout
        if single_neuron and no_shared:  # every neuron routed, one per expert
            experts, top_k = NEURONS, NEURONS * int(fraction) // 100
        elif single_neuron:  # one neuron per expert: 1,344 routed = 87.5 % of 1,536
            experts, top_k = NEURONS * 7 // 8, {"25": NEURONS // 8, "50": NEURONS * 3 // 8}[fraction]
        elif variant == "f":  # 56 experts of 24 neurons instead of 14 of 96
            experts, top_k = 56, {"25": 8, "50": 24}[fraction]
        else:
            experts, top_k = 14, {"25": 2, "50": 6}[fraction]
        carve(CarveConfig(scan=str(scan), experts=experts, top_k=top_k, shared=shared, calib_tokens=8192, calib_steps=300,
                          calib_refine="adam", calib_inputs="carved" if variant == "c" else "dense",
                          router_score=score, router_rank=int(rank or (0 if score == "gate" else 64)),
                          router_candidates=float(candidates or 0), output_bias=bool(bias),
                          eval_tokens=0, plots=False, device="cpu", out=str(folder)))
    else:
        source = load_source(SourceArgs(model=SOURCE, device="cpu"))
        save_width_pruned(source, ScanResult.load(scan), round(NEURONS * int(name[5:]) / 100), folder)
    return folder


def train_config(args, start: Path, out: Path, data: str, kd: float, ce: float, policy: str, k: int, seed: int,
                 categories: str = "", hidden_kd: float = 0.0, train_attention: bool = False,
                 top_k_start_factor: float = 0.0) -> TrainConfig:
    return TrainConfig(model=str(start), data=data, categories=categories, teacher=SOURCE if kd else "", kd=kd,
                       hidden_kd=hidden_kd, train_attention=train_attention,
                       top_k_start=annealing_start(start, top_k_start_factor), top_k_anneal=0.5,
                       ce_weight=ce, kd_temperature=args.kd_temperature, policy=policy, max_k=k, min_k=k,
                       steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=seed,
                       eval_tokens=0, checkpoint_every=CHECKPOINT_EVERY, device="cpu", out=str(out))


def annealing_start(start: Path, factor: float) -> int:
    """kd-both-anneal's first top-k: `factor` × the MoE's own, at most its experts or its two-stage candidates (0: no
    annealing)."""
    if not factor:
        return 0
    config = json.loads((start / "config.json").read_text())
    most = config.get("router_candidates") or config["num_experts"]
    return min(round(factor * config["num_experts_per_tok"]), most)


def train_and_evaluate(cfg: TrainConfig, out: Path, ecfg: EvalConfig, dense: dict) -> dict:
    """Train (continuing from the run folder's last checkpoint when an interrupted run left one), then evaluate."""
    if Checkpoints(out).latest() is not None and not (out / "train.json").is_file():
        print(f"resuming the interrupted run in {out}", flush=True)
        cfg = dataclasses.replace(cfg, resume=True)
    else:
        shutil.rmtree(out, ignore_errors=True)
    train(cfg)
    report = json.loads((out / "train.json").read_text())
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    row = evaluate(str(out / "model"), ecfg)
    return {**row, "ratios": ratios(row, dense), "training_tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
            "step_seconds_median": report.get("step_seconds_median"), "train_losses": loss_ends(report["history"]),
            "model_folder": str(out / "model"),
            "config": {k: getattr(cfg, k) for k in ("data", "categories", "kd", "hidden_kd", "train_attention",
                                                     "ce_weight", "policy", "max_k", "min_k", "steps", "lr", "seed",
                                                     "top_k_start", "top_k_anneal")}}


def loss_ends(history: list[dict], steps: int = 10) -> dict:
    """Each logged training loss averaged over the first and the last `steps` steps of a run's history."""
    history = [r for r in history if not r.get("skipped")]  # steps without response tokens did not train
    keys = [k for k in ("ce", "kd", "hidden_kd") if k in history[0]]
    return {k: {"first": statistics.fmean(r[k] for r in history[:steps]),
                "last": statistics.fmean(r[k] for r in history[-steps:])} for k in keys}


def evaluate(spec: str, ecfg: EvalConfig, within=None) -> dict:
    """Mix perplexity (per category), general-text perplexity, facts (accuracy, retention), parameters (`within`: see
    `evaluate_model`)."""
    row = evaluate_model(spec, ecfg, within=within)
    facts = row["facts"]
    return {"mix_ppl": row["perplexity"]["ppl"], "mix_ppl_by_category": row["perplexity"]["by_category"],
            "general_ppl": row["general"]["ppl"], "fact_accuracy": facts["accuracy"], "facts_known": facts["known"],
            "facts_retained": facts["retained"], "fact_retention": facts["retention"], "facts_n": facts["n"],
            "active_params": row["params"]["active_per_token"], "total_params": row["params"]["total"]}


def ratios(row: dict, dense: dict) -> dict:
    return {"mix_ppl": row["mix_ppl"] / dense["mix_ppl"], "general_ppl": row["general_ppl"] / dense["general_ppl"],
            "mix_ppl_by_category": {c: v / dense["mix_ppl_by_category"][c]
                                    for c, v in row["mix_ppl_by_category"].items() if c in dense["mix_ppl_by_category"]}}


def summarise(row: dict) -> str:
    r = row["ratios"]
    return (f"retention {row['fact_retention']:.3f} ({row['facts_retained']}/{row['facts_known']}), "
            f"general ppl ×{r['general_ppl']:.2f}, mix ppl ×{r['mix_ppl']:.2f}")


def forgetting(args, results: dict, work: Path, ecfg: EvalConfig, dense: dict) -> None:
    """Learn one category only (CE) from a trained run under each policy; report what the rest loses."""
    base = results["runs"].get(args.forgetting)
    if base is None:
        raise SystemExit(f"--forgetting {args.forgetting}: no such run in this protocol; run it first")
    start = Path(base["model_folder"])
    section = results["forgetting"].setdefault(args.forgetting, {"category": args.forget_category,
                                                                 "steps": args.forget_steps, "before": base, "after": {}})
    for name in args.forget_policies:
        policy, k = FORGET_POLICIES[name]
        out = work / f"forget-{args.forgetting.replace(':', '-')}-{args.forget_category}-{name}"
        cfg = train_config(args, start, out, "default", 0.0, 1.0, policy, k, 0, categories=args.forget_category)
        cfg.steps = args.forget_steps
        row = train_and_evaluate(cfg, out, ecfg, dense)
        section["after"][name] = row
        save(results)
        before = base["mix_ppl_by_category"]
        change = {c: row["mix_ppl_by_category"][c] / before[c] for c in before}
        print(f"forget {name}: per-category ppl change {change}, retention {base['fact_retention']:.3f} -> "
              f"{row['fact_retention']:.3f}, general ppl ×{row['general_ppl'] / base['general_ppl']:.2f}", flush=True)


def start_rows_of_other_protocols(protocol: dict, names: list[str]) -> dict:
    """Rows of the untrained models `names` already scored under the same evaluation settings (start models are shared
    by every protocol; the knowledge-aware carves, whose scan reads the corpus, are scored again). Only the models this
    command trains are taken, so a protocol's table lists the starts of its own runs."""
    path = RESULTS / "knowledge_recovery.json"
    rows = {}
    for entry in json.loads(path.read_text()).get("protocols", []) if path.is_file() else []:
        if all(entry["protocol"].get(k) == protocol[k] for k in EVAL_KEYS):
            rows.update({name: row for name, row in entry["start"].items() if name in names and not name.endswith("k")})
    return rows


def load_results(protocol: dict) -> dict:
    path = RESULTS / "knowledge_recovery.json"
    if path.is_file():
        old = json.loads(path.read_text())
        for entry in old.get("protocols", []):
            if all(entry["protocol"].get(k) == protocol[k] for k in PROTOCOL_KEYS):
                return entry
    return {"protocol": protocol, "start": {}, "runs": {}, "forgetting": {}}


def save(entry: dict) -> None:
    """Write this protocol's entry into the result file, keeping the other protocols, and the rows another run of the
    same protocol wrote since this one started (two runs of one protocol may write the file in turn)."""
    path = RESULTS / "knowledge_recovery.json"
    protocols = json.loads(path.read_text()).get("protocols", []) if path.is_file() else []
    same = [p for p in protocols if all(p["protocol"].get(k) == entry["protocol"][k] for k in PROTOCOL_KEYS)]
    protocols = [p for p in protocols if any(p["protocol"].get(k) != entry["protocol"][k] for k in PROTOCOL_KEYS)]
    for other in same:
        for part in ("start", "runs", "forgetting"):
            entry[part] = {**other.get(part, {}), **entry.get(part, {})}
        entry["commands"] = [*other.get("commands", []),
                             *(c for c in entry.get("commands", []) if c not in other.get("commands", []))]
    write_result("knowledge_recovery", {
        "source": SOURCE, "targets": {"25": {"retention": 0.8, "general_ppl_ratio": 1.3},
                                      "50": {"retention": 0.95, "general_ppl_ratio": 1.05}, "max_tokens_cpu": 400_000},
        "protocols": [*protocols, entry]})


if __name__ == "__main__":
    main()
