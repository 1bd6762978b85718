"""Where does the knowledge die: at the split into experts, or at the router? Fact retention and general-text
perplexity of SmolLM2 under oracles, beside the carved models' own routers.

    python benchmarks/knowledge_ceiling.py [--models moe25 moe50] [--trained moe25:kd-both:full:0] [--fractions 0.25 0.5]
    python benchmarks/knowledge_ceiling.py --models moe25f --trained --fractions --append   # add rows
    python benchmarks/knowledge_ceiling.py --models --trained --fractions --predictor-ranks 64 128 --append
    python benchmarks/knowledge_ceiling.py --models --trained --fractions --gate-ranks 0 64 --predictor-fractions 0.25 0.5 --append
    python benchmarks/knowledge_ceiling.py --models --trained --fractions --threshold-scopes layer global --append
    python benchmarks/knowledge_ceiling.py --models --trained --fractions --allocated-fractions 0.25 --append
    python benchmarks/knowledge_ceiling.py --models --trained --fractions --taylor-fractions 0.25 0.5 --append

Rows (all scored exactly as benchmarks/knowledge_recovery.py scores, on its protocol's facts and tokens):
- neuron oracle at f (0.25, 0.5): the dense source with every FFN keeping, per token, its f·F neurons of largest
  |h_j|·‖d_j‖ — no experts, no router: the per-token ceiling of design.md, which bounds any carve at that active fraction.
- each carved start model of knowledge_recovery (`moe25`, `moe50`) with its calibrated router, and with the expert
  oracle (each token's top-k experts by true gain 2⟨R, y_e⟩ − ‖y_e‖²): what a perfect router would keep of that split.
- low-rank predictor r at f (`--predictor-ranks`): the neuron oracle's selection with the activations *predicted* by
  rank-r factors of each FFN's gate and up projections, fitted to the source's FFN inputs on `--predictor-data`
  (`tiny_onn.carve.neuron_predictor`): a router a real model could run (2·r·(D + F) multiply-adds per token), at
  single-neuron granularity.
- exact-gate predictor r at f (`--gate-ranks`): the same with the exact gate pre-activations (every neuron's gate
  computed, a third of the FFN) and the up pre-activation at rank r, or at r = 0 its root mean square: the selection of
  the `gate` router.
- neuron threshold oracle at f (`--threshold-scopes layer|global`): per token the neurons whose |h_j|·‖d_j‖ reaches
  a threshold fitted so that on `--predictor-data` a fraction f of (token, neuron) pairs pass, per FFN or one for all
  FFNs: the neuron oracle with a budget that varies per token (and, global, per layer); the row records the active
  fraction measured on everything it scored.
- neuron oracle with allocated fractions at f (`--allocated-fractions`): the neuron oracle with per-FFN fractions that
  average f, each FFN's chosen so that the next neuron anywhere would remove about the same share of its FFN's output
  (`allocate_neuron_fractions`, fitted on `--predictor-data`).
- neuron oracle by Taylor importance at f (`--taylor-fractions`): the neuron oracle with each neuron's ‖d_j‖ replaced
  by the scan's mean |∂L/∂h_j| (`benchmarks/_common.smollm2_scan`, the default mix), so each token keeps the neurons
  of largest first-order estimate |h_j|·|∂L/∂h_j| of what dropping them changes in the loss.
- a trained run of knowledge_recovery (`--trained MODEL:RECIPE:POLICY:SEED`), router and expert oracle: whether training
  left the router behind its experts.
Router rows already scored by knowledge_recovery (same protocol) are copied from its result file, not re-run.
Writes benchmarks/results/knowledge_ceiling.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, smollm2_scan, write_result  # noqa: E402
from knowledge_recovery import SOURCE, ensure_start_model, evaluate, protocol_name, ratios  # noqa: E402

from tiny_onn.carve.neuron_predictor import fit_neuron_predictors, predicted_neurons  # noqa: E402
from tiny_onn.data import DataArgs, build_dataset  # noqa: E402
from tiny_onn.eval.facts import KnownFacts  # noqa: E402
from tiny_onn.eval.harness import EvalConfig, evaluation_facts  # noqa: E402
from tiny_onn.eval.oracle import (  # noqa: E402
    KeptNeurons,
    allocate_neuron_fractions,
    calibrate_neuron_thresholds,
    neuron_oracle,
    neuron_threshold_oracle,
    oracle_expert_routing,
)
from tiny_onn.scan import ScanResult  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source  # noqa: E402

EVAL_KEYS = ("seq_len", "eval_tokens", "general_tokens", "facts_limit")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", choices=("moe25", "moe50", "moe25f", "moe50f", "moe25n", "moe50n"), default=["moe25", "moe50"])
    p.add_argument("--append", action="store_true", help="keep the rows of the result file and add these")
    p.add_argument("--trained", nargs="*", default=["moe25:kd-both:full:0"],
                   help="runs of knowledge_recovery's protocol (MODEL:RECIPE:POLICY:SEED) to score under the oracle")
    p.add_argument("--fractions", type=float, nargs="*", default=[0.25, 0.5], help="neuron-oracle active fractions")
    p.add_argument("--predictor-ranks", type=int, nargs="*", default=[],
                   help="low-rank neuron predictors to score (each at every --predictor-fractions value)")
    p.add_argument("--gate-ranks", type=int, nargs="*", default=[],
                   help="exact-gate predictors to score (the gate router's selection; rank of the up predictor, 0: "
                        "the up root mean square), each at every --predictor-fractions value")
    p.add_argument("--gate-candidates", type=float, nargs="*", default=[],
                   help="two-stage exact-gate selection: c·k candidates by the gate predictor (rank 0), then the k of "
                        "largest true |h_j|·‖d_j‖ among them (a router that computes the candidates' up projections)")
    p.add_argument("--predictor-fractions", type=float, nargs="+", default=[0.25])
    p.add_argument("--allocated-fractions", type=float, nargs="*", default=[],
                   help="neuron oracles at these average fractions with per-FFN fractions from "
                        "allocate_neuron_fractions (equal relative gain of the next neuron, fitted on --predictor-data)")
    p.add_argument("--taylor-fractions", type=float, nargs="*", default=[],
                   help="neuron oracles ranking by |h_j| times the scan's mean |dL/dh_j| instead of the down norm")
    p.add_argument("--threshold-scopes", nargs="*", choices=("layer", "global"), default=[],
                   help="neuron threshold oracles to score at every --predictor-fractions value: per token the neurons "
                        "whose |h_j|·‖d_j‖ reach a threshold fitted on --predictor-data (per FFN, or one for all FFNs)")
    p.add_argument("--predictor-data", default="default,runs/corpus-smollm2",
                   help="data whose train split fits the predictors (its FFN inputs' second moments)")
    p.add_argument("--predictor-tokens", type=int, default=16384)
    p.add_argument("--protocol", default="60x4x256-lr0.0003", help="knowledge_recovery protocol to score like")
    p.add_argument("--workdir", default="runs/bench/knowledge")
    args = p.parse_args()

    recovery = json.loads((RESULTS / "knowledge_recovery.json").read_text())
    entry = next((e for e in recovery["protocols"] if protocol_name(e["protocol"]) == args.protocol), None)
    if entry is None:
        raise SystemExit(f"no knowledge_recovery protocol {args.protocol}: run benchmarks/knowledge_recovery.py first")
    proto = entry["protocol"]
    ecfg = EvalConfig(model=[SOURCE], tasks="ppl,general,facts", eval_tokens=proto["eval_tokens"],
                      seq_len=proto["seq_len"], general_tokens=proto["general_tokens"], facts_limit=proto["facts_limit"],
                      facts_source=SOURCE, device="cpu", out=str(Path(args.workdir) / "eval-unused"))
    # the oracle rows score the dense source itself: its known facts must be stored first, or its oracle answers would
    # be taken for what it knows
    if KnownFacts(SOURCE, ecfg.facts_max_new_tokens).missing(evaluation_facts(ecfg)):
        raise SystemExit("the dense source's known facts are not stored yet: run benchmarks/knowledge_recovery.py first")
    dense = entry["start"]["dense"]
    rows, commands = previous_rows(args) if args.append else ({}, [])
    commands.append("python " + " ".join(sys.argv))

    def record(key: str, row: dict, **extra) -> None:
        rows[key] = {**row, "ratios": ratios(row, dense), **extra}
        save(args, proto, dense, rows, commands)
        r = rows[key]
        print(f"{key}: retention {r['fact_retention']:.3f} ({r['facts_retained']}/{r['facts_known']}), general "
              f"×{r['ratios']['general_ppl']:.2f}, mix ×{r['ratios']['mix_ppl']:.2f}", flush=True)

    for f in args.fractions:
        record(f"neuron oracle {f:g}", evaluate(SOURCE, ecfg, within=partial(neuron_oracle, fraction=f)),
               kind="neuron oracle", active_ffn_fraction=f)
    if args.taylor_fractions:
        scan = ScanResult.load(smollm2_scan())
        grads = [scan.stat(layer, "grad").float() for layer in range(scan.num_layers)]
        for f in args.taylor_fractions:
            within = partial(neuron_oracle, fraction=f, neuron_weights=grads)
            record(f"neuron oracle taylor {f:g}", evaluate(SOURCE, ecfg, within=within),
                   kind="neuron oracle (Taylor importance)", active_ffn_fraction=f, scan_tokens=scan.meta["tokens_fed"],
                   scan_data=scan.meta.get("config", {}).get("data", "default"))
    if args.predictor_ranks or args.gate_ranks or args.gate_candidates or args.threshold_scopes or args.allocated_fractions:
        source = load_source(SourceArgs(model=SOURCE))
        fit_data = build_dataset(source.tokenizer, DataArgs(data=args.predictor_data, seq_len=proto["seq_len"]), "train",
                                 max_tokens=args.predictor_tokens)
        variants = [(r, False) for r in args.predictor_ranks] + [(r, True) for r in args.gate_ranks]
        for r, exact_gate in variants:
            predictors = fit_neuron_predictors(source.model, fit_data, rank=r, exact_gate=exact_gate)
            for f in args.predictor_fractions:
                record(f"{'gate' if exact_gate else 'predictor'} r{r} {f:g}",
                       evaluate(SOURCE, ecfg, within=partial(predicted_neurons, predictors=predictors, fraction=f)),
                       kind="exact-gate predictor" if exact_gate else "low-rank predictor", active_ffn_fraction=f,
                       rank=r, predictor_data=args.predictor_data, predictor_tokens=fit_data.num_tokens)
        if args.gate_candidates:
            predictors = fit_neuron_predictors(source.model, fit_data, rank=0, exact_gate=True)
            for c in args.gate_candidates:
                for f in args.predictor_fractions:
                    within = partial(predicted_neurons, predictors=predictors, fraction=f, candidate_factor=c)
                    record(f"gate r0 candidates x{c:g} {f:g}", evaluate(SOURCE, ecfg, within=within),
                           kind="two-stage exact-gate predictor", active_ffn_fraction=f, rank=0, candidate_factor=c,
                           predictor_data=args.predictor_data, predictor_tokens=fit_data.num_tokens)
        for f in args.allocated_fractions:
            fractions = allocate_neuron_fractions(source.model, fit_data.batches(8), f)
            record(f"neuron oracle allocated {f:g}", evaluate(SOURCE, ecfg, within=partial(neuron_oracle, fraction=fractions)),
                   kind="neuron oracle (allocated)", active_ffn_fraction=f, fractions_by_layer=fractions,
                   predictor_data=args.predictor_data, predictor_tokens=fit_data.num_tokens)
        for scope in args.threshold_scopes:
            for f in args.predictor_fractions:
                thresholds = calibrate_neuron_thresholds(source.model, fit_data.batches(8), f, scope=scope)
                kept = KeptNeurons(len(thresholds))
                within = partial(neuron_threshold_oracle, thresholds=thresholds, counts=kept)
                record(f"neuron threshold {scope} {f:g}", evaluate(SOURCE, ecfg, within=within),
                       kind=f"neuron threshold oracle ({scope})", active_ffn_fraction=f,
                       measured_active_fraction=kept.fraction(), measured_active_by_layer=kept.per_layer(),
                       predictor_data=args.predictor_data, predictor_tokens=fit_data.num_tokens)
        del source
    for name in args.models:
        folder = ensure_start_model(name, Path(args.workdir), "")
        if name in entry["start"]:
            rows[f"{name} router"] = {**entry["start"][name], "kind": "router", "copied_from": "knowledge_recovery"}
        else:
            record(f"{name} router", evaluate(str(folder), ecfg), kind="router")
        record(f"{name} oracle", evaluate(str(folder), ecfg, within=oracle_expert_routing), kind="expert oracle")
    for key in args.trained:
        run = entry["runs"].get(key)
        if run is None:
            raise SystemExit(f"--trained {key}: no such run in protocol {args.protocol}")
        rows[f"{key} router"] = {**run, "kind": "router", "copied_from": "knowledge_recovery"}
        record(f"{key} oracle", evaluate(run["model_folder"], ecfg, within=oracle_expert_routing), kind="expert oracle")
    save(args, proto, dense, rows, commands)


def previous_rows(args) -> tuple[dict, list]:
    """Rows and commands of the result file, when it scored the same knowledge_recovery protocol (--append)."""
    path = RESULTS / "knowledge_ceiling.json"
    if not path.is_file():
        return {}, []
    old = json.loads(path.read_text())
    if old.get("knowledge_recovery_protocol") != args.protocol:
        return {}, []
    return old["rows"], old.get("commands") or [old["command"]]


def save(args, proto: dict, dense: dict, rows: dict, commands: list) -> None:
    write_result("knowledge_ceiling", {
        "source": SOURCE, "protocol": {k: proto[k] for k in EVAL_KEYS}, "knowledge_recovery_protocol": args.protocol,
        "dense": dense, "rows": rows, "commands": commands,
    })


if __name__ == "__main__":
    main()
