"""Quality of a carved MoE before any training: held-out perplexity ratio carved / dense on SmolLM2.

    python benchmarks/carve_quality.py

Every method (dsc, random, actgrad, coact; dsc without its per-category ΔSC features; dsc with the seed's S_p-picked
shared expert) at the same budget, routers calibrated in all, at 25 % and 50 % of FFN neurons active, for two layouts (16 routed experts; a 12.5 % shared expert + 14 routed experts). The plan and the router
calibration do not depend on top-k, so each (method, layout) is carved once and evaluated at both budgets. The oracle
row replaces the router by the true per-token expert gains (an upper bound for any router on that split).
Writes benchmarks/results/carve_quality.json. Targets: dsc <= 1.5 at 25 %, <= 1.05 at 50 %, dsc <= 0.9 x random at 25 %.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, smollm2_scan, write_result  # noqa: E402

from tiny_onn.carve import CarveConfig, carve_model  # noqa: E402
from tiny_onn.carve.carver import active_fraction  # noqa: E402
from tiny_onn.data import DataArgs, build_dataset  # noqa: E402
from tiny_onn.data.pipeline import data_identity  # noqa: E402
from tiny_onn.eval import perplexity  # noqa: E402
from tiny_onn.eval.oracle import oracle_expert_routing  # noqa: E402
from tiny_onn.scan import ScanResult  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source  # noqa: E402

LAYOUTS = {
    "shared 12.5% + 14 experts": {"experts": 14, "shared": 0.125, "top_k": {"25%": 2, "50%": 6}},
    "16 experts": {"experts": 16, "shared": 0.0, "top_k": {"25%": 4, "50%": 8}},
}
METHODS = {  # row label -> CarveConfig settings
    "dsc": {"method": "dsc"},
    "dsc without ΔSC": {"method": "dsc", "delta_sc_features": 0.0},  # the same method, ΔSC left out of the features
    "dsc, seed S_p shared": {"method": "dsc", "shared_score": "s_p"},  # the seed's shared-expert score, for comparison
    "random": {"method": "random"},
    "actgrad": {"method": "actgrad"},
    "coact": {"method": "coact"},
}
WITH_ORACLE = ("dsc", "dsc, seed S_p shared", "random")


def planned_methods(layout: dict, chosen: list[str] | None = None) -> list[str]:
    """Row labels carved for a layout (of `chosen`, default all): the shared-expert variant only where there is one."""
    return [m for m, settings in METHODS.items()
            if (layout["shared"] or "shared_score" not in settings) and (chosen is None or m in chosen)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--calib-steps", type=int, default=500)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS),
                        help="which layouts to carve (default: both)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="which rows to carve (default: all)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of a stopped run with the same settings and carve only what is missing")
    args = parser.parse_args()
    torch.manual_seed(0)
    source = load_source(SourceArgs(model="smollm2", device="cpu"))
    scan = ScanResult.load(smollm2_scan())
    data_args = DataArgs(seq_len=256)
    calib = build_dataset(source.tokenizer, data_args, "train", max_tokens=args.calib_tokens)
    held = build_dataset(source.tokenizer, data_args, "heldout", max_tokens=args.eval_tokens)
    dense = perplexity(source.model, held)
    print(f"dense held-out perplexity {dense['ppl']:.3f} on {dense['tokens']} response tokens", flush=True)
    rows, commands = _previous_rows(args, dense) if args.resume else ([], [])
    commands.append("python " + shlex.join(sys.argv))

    def save(rows: list, complete: bool) -> None:
        write_result("carve_quality", {**_payload(args, scan, calib, dense, rows, complete), "commands": commands})

    for layout_name in args.layouts:
        layout = LAYOUTS[layout_name]
        for method in planned_methods(layout, args.methods):
            if any(r["layout"] == layout_name and r["method"] == method for r in rows):
                print(f"{layout_name:>26} {method:>8}: kept from the previous run", flush=True)
                continue
            start = time.perf_counter()
            cfg = CarveConfig(**METHODS[method], experts=layout["experts"], shared=layout["shared"], top_k=1,
                              calib_tokens=args.calib_tokens, calib_steps=args.calib_steps, calib_refine="adam")
            moe, plan, _ = carve_model(scan, source, cfg, calib)
            for budget, k in layout["top_k"].items():
                moe.set_routing(top_k=k)
                ppl = perplexity(moe, held)
                row = {"layout": layout_name, "method": method, "budget": budget, "top_k": k,
                       "active_fraction": active_fraction(plan, k, 1536), "ppl": ppl["ppl"],
                       "ratio": ppl["ppl"] / dense["ppl"], "by_category": ppl["by_category"]}
                if method in WITH_ORACLE:
                    with oracle_expert_routing(moe):
                        row["oracle_ratio"] = perplexity(moe, held)["ppl"] / dense["ppl"]
                rows.append(row)
                print(f"{layout_name:>26} {method:>8} {budget}: ratio {row['ratio']:.3f}"
                      + (f" (oracle router {row['oracle_ratio']:.3f})" if "oracle_ratio" in row else ""), flush=True)
            print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
            del moe
            save(rows, complete=False)  # a long run keeps what it measured if it is stopped
    save(rows, complete=all(any(r["layout"] == n and r["method"] == m for r in rows)
                            for n, layout in LAYOUTS.items() for m in planned_methods(layout)))


def _previous_rows(args, dense: dict) -> tuple[list, list]:
    """Rows and commands of earlier runs of this script, if they used the same data, calibration and held-out set."""
    path = RESULTS / "carve_quality.json"
    if not path.exists():
        return [], []
    old = json.loads(path.read_text())
    same = (old.get("data", {}).get("identity") == data_identity("default")
            and old.get("calibration", {}).get("adam_steps") == args.calib_steps
            and old.get("settings", {}).get("calib_tokens", args.calib_tokens) == args.calib_tokens
            and old.get("heldout_tokens_scored") == dense["tokens"]
            and abs(old.get("dense", {}).get("ppl", 0.0) - dense["ppl"]) < 1e-6 * dense["ppl"])
    if not same:
        print("--resume: the previous result used other settings; starting over", flush=True)
        return [], []
    return old.get("rows", []), old.get("commands", [old["command"]])


def _payload(args, scan, calib, dense, rows, complete: bool) -> dict:
    return {
        "model": "smollm2 (SmolLM2-135M-Instruct, fp32)",
        "data": {"spec": "default", "identity": data_identity("default")},  # the mix's examples, by content
        "scan_tokens": scan.meta["tokens_fed"],
        "calibration": {"tokens": calib.num_tokens, "adam_steps": args.calib_steps},
        "settings": {"calib_tokens": args.calib_tokens, "eval_tokens": args.eval_tokens},
        "heldout_tokens_scored": dense["tokens"],
        "dense": dense,
        "targets": {"dsc_25": 1.5, "dsc_50": 1.05, "dsc_over_random_25": 0.9},
        "complete": complete,
        "rows": rows,
    }


if __name__ == "__main__":
    main()
