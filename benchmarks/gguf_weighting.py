"""What the llama.cpp-exportable weighting costs: SmolLM2 carved at 25 % active with the default straight-through weighting
and with `--expert-weighting probs`, each trained with the same budget, held-out perplexity side by side.

    python benchmarks/gguf_weighting.py                 # 200 steps x 4 x 256 tokens per weighting (full policy, lr 3e-4)
    python benchmarks/gguf_weighting.py --steps 20      # a quick look

Layout as benchmarks/train_policies.py: shared expert 12.5 % + 14 experts of 96 neurons, top-2. Model folders are kept in
runs/bench/gguf/ (carved: moe25-WEIGHTING, trained: train-WEIGHTING/model), so benchmarks/gguf_speed.py and later
evaluations (`evaluate_folder`) reuse them. Writes benchmarks/results/gguf_weighting.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import smollm2_scan, write_result  # noqa: E402

from tiny_onn.carve import CarveConfig  # noqa: E402
from tiny_onn.carve import run as carve  # noqa: E402
from tiny_onn.data import DataArgs, build_dataset  # noqa: E402
from tiny_onn.eval import perplexity  # noqa: E402
from tiny_onn.model.export import read_carve_metadata  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source  # noqa: E402
from tiny_onn.train import TrainConfig  # noqa: E402
from tiny_onn.train import run as train  # noqa: E402

WEIGHTINGS = ("straight_through", "probs")
WORK = Path("runs/bench/gguf")


def carved_folder(weighting: str, work: Path = WORK) -> Path:
    """The carved 25 %-active MoE with this weighting (carved on first use). The probs model is the straight-through
    carve (same plan, same calibrated routers) plus what `carve --expert-weighting probs` adds after calibration: the
    fitted router temperature and expert scales. Deriving it skips a second clustering run (minutes on 2 cores)."""
    out = work / f"moe25-{weighting}"
    if (out / "config.json").is_file():
        return out
    if weighting == "probs":
        derive_probs(carved_folder("straight_through", work), out)
        return out
    carve(CarveConfig(scan=str(smollm2_scan()), experts=14, top_k=2, shared=0.125, calib_tokens=8192,
                      calib_steps=300, calib_refine="adam", eval_tokens=0, plots=False, device="cpu", out=str(out)))
    return out


def derive_probs(straight: Path, out: Path) -> None:
    """Carve step 'probs' on an existing straight-through carve, with the calibration tokens that carve used."""
    import torch

    from tiny_onn.artifacts import atomic_dir
    from tiny_onn.carve.calibrate import collect_ffn_inputs
    from tiny_onn.carve.weighting import fit_expert_scales
    from tiny_onn.model import TinyOnnForCausalLM
    from tiny_onn.model.export import CARVE_META, save_model_folder

    extra = read_carve_metadata(straight)
    cfg = extra["config"]
    source = load_source(SourceArgs(model="smollm2", device="cpu"))
    data_args = DataArgs(data=cfg["data"] or "default", seq_len=cfg["seq_len"], seed=cfg["seed"])
    calib = build_dataset(source.tokenizer, data_args, "train", max_tokens=cfg["calib_tokens"])
    model = TinyOnnForCausalLM.from_pretrained(straight, dtype=torch.float32).eval()
    model.config.expert_weighting = "probs"
    scales = fit_expert_scales(model, collect_ffn_inputs(source.model, calib))
    for row, s in zip(extra["calibration"], scales, strict=True):
        row["expert_scales"] = s
    extra["config"]["expert_weighting"] = "probs"
    extra["derived_from"] = str(straight)
    card = (straight / "README.md").read_text() + "\nExpert weighting: probs (router temperature and expert scales fitted).\n"
    with atomic_dir(out) as tmp:
        save_model_folder(model, source.tokenizer, tmp, json.loads((straight / "provenance.json").read_text()),
                          {CARVE_META: extra}, card)


def trained_folder(weighting: str, work: Path = WORK) -> Path:
    return work / f"train-{weighting}" / "model"


def evaluate_folder(folder: str | Path, eval_tokens: int = 4096, seq_len: int = 256) -> dict:
    """Held-out perplexity (response tokens of the mix's held-out split) of a model folder or 'smollm2'.

    One function so that more columns (fact retention, general-text perplexity) can be added in one place."""
    source = load_source(SourceArgs(model=str(folder), device="cpu"), dense_only=False)
    held = build_dataset(source.tokenizer, DataArgs(seq_len=seq_len), "heldout", max_tokens=eval_tokens)
    return {"heldout_ppl": perplexity(source.model, held)["ppl"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--weightings", nargs="+", choices=WEIGHTINGS, default=list(WEIGHTINGS))
    parser.add_argument("--retrain", action="store_true", help="train again even where a trained folder exists")
    args = parser.parse_args()
    dense = evaluate_folder("smollm2", args.eval_tokens, args.seq_len)["heldout_ppl"]
    rows = []
    for weighting in args.weightings:
        moe = carved_folder(weighting)
        out = trained_folder(weighting).parent
        if args.retrain or not (out / "train.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            train(TrainConfig(model=str(moe), policy="full", steps=args.steps, batch_size=args.batch_size,
                              seq_len=args.seq_len, lr=args.lr, seed=0, eval_tokens=args.eval_tokens, checkpoint_every=0,
                              device="cpu", out=str(out)))
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        report = json.loads((out / "train.json").read_text())
        carved = read_carve_metadata(moe)
        row = {"weighting": weighting, "carved": str(moe), "trained": str(trained_folder(weighting)),
               "ppl_carved": report["perplexity"]["before"]["ppl"], "ppl_trained": report["perplexity"]["after"]["ppl"],
               "trained_steps": report.get("steps", args.steps), "step_seconds_median": report["step_seconds_median"]}
        if weighting == "probs":
            scales = [r["expert_scales"] for r in carved["calibration"]]
            row["expert_scale_mean"] = sum(s["scale_mean"] for s in scales) / len(scales)
            row["router_temperature_factors"] = [s["router_temperature_factor"] for s in scales]
            row["routed_rel_err"] = {k: sum(s[k] for s in scales) / len(scales)
                                     for k in ("rel_err_straight_through", "rel_err_mean_restoring", "rel_err_fitted")}
        row["ratio_carved"], row["ratio_trained"] = row["ppl_carved"] / dense, row["ppl_trained"] / dense
        rows.append(row)
        print(f"{weighting:>16}: carved {row['ppl_carved']:.2f} ({row['ratio_carved']:.2f}x dense), "
              f"trained {row['ppl_trained']:.2f} ({row['ratio_trained']:.2f}x)", flush=True)
        _write(args, dense, rows)


def _write(args: argparse.Namespace, dense: float, rows: list[dict]) -> None:
    write_result("gguf_weighting", {
        "model": "smollm2 carved: shared 12.5% + 14 experts of 96, top-2 (25% of FFN neurons active)",
        "protocol": {"policy": "full", "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "lr": args.lr, "tokens_per_run": args.steps * args.batch_size * args.seq_len, "seed": 0,
                     "eval_tokens": args.eval_tokens},
        "dense_ppl": dense,
        "rows": rows,
        "note": "same scan, carve plan, data, steps and seed for both weightings; the machine's 2 cores were shared",
    })


if __name__ == "__main__":
    main()
