"""Expert update policies compared on SmolLM2 carved at 25 % active: full vs SMK vs SMK², with and without distillation.

    python benchmarks/train_policies.py                         # the full protocol: 200 steps x 4 x 256 tokens, 2 seeds
    python benchmarks/train_policies.py --steps 20 --batch-size 2 --seeds 0   # what fits a 2-core CPU session
    python benchmarks/train_policies.py --append --policies full --kd 0.5 --seeds 0   # one more protocol, kept beside

Same carved start (runs/bench/train_policies/moe25), data, steps, tokens and seed for every run; each protocol's trained
models stay in their own folder, runs/bench/train_policies/steps{S}-bs{B}-seq{T}-lr{LR}-k{K}/{policy}-kd{KD}-seed{N}/model. Reports held-out perplexity ÷ dense after training, and the
median step time of smk2 ÷ full (target <= 1.05). Writes benchmarks/results/train_policies.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, smollm2_scan, write_result  # noqa: E402

from tiny_onn.carve import CarveConfig  # noqa: E402
from tiny_onn.carve import run as carve  # noqa: E402
from tiny_onn.data import DataArgs, build_dataset  # noqa: E402
from tiny_onn.eval import perplexity  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source  # noqa: E402
from tiny_onn.train import TrainConfig  # noqa: E402
from tiny_onn.train import run as train  # noqa: E402

POLICIES = ("full", "smk", "smk2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--kd", type=float, nargs="+", default=[0.0, 0.5], help="distillation weights to try (0 = no KD)")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="expert learning rate")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4, help="experts updated per layer and step (smk min_k, smk2 max_k)")
    parser.add_argument("--workdir", default="runs/bench/train_policies")
    parser.add_argument("--append", action="store_true",
                        help="keep the protocols of earlier runs in the result file (one with the same settings is replaced)")
    args = parser.parse_args()
    work = Path(args.workdir)
    moe = work / "moe25"
    if not (moe / "config.json").is_file():
        carve(CarveConfig(scan=str(smollm2_scan()), experts=14, top_k=2, shared=0.125, calib_tokens=8192,
                          calib_steps=300, calib_refine="adam", eval_tokens=0, plots=False, device="cpu", out=str(moe)))
    source = load_source(SourceArgs(model="smollm2", device="cpu"))
    held = build_dataset(source.tokenizer, DataArgs(seq_len=args.seq_len), "heldout", max_tokens=args.eval_tokens)
    dense = perplexity(source.model, held)["ppl"]
    del source
    protocol = {
        "commands": ["python " + " ".join(sys.argv)],
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "k": args.k,
        "tokens_per_run": args.steps * args.batch_size * args.seq_len, "seeds": args.seeds, "runs": [],
    }
    runs_dir = protocol_folder(work, args)
    planned = {(p, kd, seed) for seed in args.seeds for kd in args.kd for p in args.policies}
    protocols = _earlier_protocols(protocol, dense, planned) if args.append else []
    if protocol not in protocols:
        protocols.append(protocol)
    for seed in args.seeds:
        for kd in args.kd:
            for policy in args.policies:
                out = runs_dir / f"{policy}-kd{kd}-seed{seed}"
                shutil.rmtree(out, ignore_errors=True)
                cfg = TrainConfig(model=str(moe), teacher="smollm2" if kd else "", kd=kd, policy=policy, max_k=args.k,
                                  min_k=args.k, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                  lr=args.lr, seed=seed, eval_tokens=args.eval_tokens, checkpoint_every=0,
                                  device="cpu", out=str(out))
                train(cfg)
                report = json.loads((out / "train.json").read_text())
                after = report["perplexity"]["after"]["ppl"]
                before = report["perplexity"]["before"]["ppl"]
                row = {"policy": policy, "kd": kd, "seed": seed, "ppl_before": before, "ppl_after": after,
                       "ratio_before": before / dense, "ratio_after": after / dense,
                       "step_seconds_median": report["step_seconds_median"],
                       "emergent_shared_experts": report["emergent_shared_experts"]["count"],
                       "final_ce": report["final"]["ce"], "model_folder": str(out / "model")}
                protocol["runs"].append(row)
                protocol["seeds"] = sorted({r["seed"] for r in protocol["runs"]})
                print(f"{policy:>4} kd={kd} seed={seed}: ppl ratio {row['ratio_before']:.2f} -> {row['ratio_after']:.2f}, "
                      f"step {row['step_seconds_median']:.2f}s, emergent shared experts {row['emergent_shared_experts']}",
                      flush=True)
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
                protocol["step_time_ratio_smk2_over_full"] = _step_time_ratio(protocol["runs"])
                _write(protocols, dense)  # a stopped run keeps what it measured


def protocol_folder(work: Path, args) -> Path:
    """The folder of one protocol's runs: runs of different protocols never overwrite each other's models."""
    return work / f"steps{args.steps}-bs{args.batch_size}-seq{args.seq_len}-lr{args.lr:g}-k{args.k}"


def _step_time_ratio(runs: list[dict]) -> float | None:
    """Median step time of smk2 ÷ full over the runs with the smallest KD weight both have (None until both ran)."""
    for kd in sorted({r["kd"] for r in runs}):
        smk2 = [r["step_seconds_median"] for r in runs if r["policy"] == "smk2" and r["kd"] == kd]
        full = [r["step_seconds_median"] for r in runs if r["policy"] == "full" and r["kd"] == kd]
        if smk2 and full:
            return statistics.median(smk2) / statistics.median(full)
    return None


def _earlier_protocols(protocol: dict, dense: float, planned: set[tuple]) -> list[dict]:
    """The protocols in the result file. One with the same settings as `protocol` is merged into it: its runs are kept
    unless this invocation reruns them (same policy, KD and seed)."""
    path = RESULTS / "train_policies.json"
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    if abs(old.get("dense_ppl", 0.0) - dense) > 1e-6 * dense:
        print("--append: the earlier result used another held-out set; starting over", flush=True)
        return []
    keys = ("steps", "batch_size", "seq_len", "lr", "k")
    protocols = []
    for p in old.get("protocols", []):
        if any(p.get(key) != protocol[key] for key in keys):
            protocols.append(p)
            continue
        protocol["commands"] = p.get("commands", []) + protocol["commands"]
        protocol["runs"] = [r for r in p["runs"] if (r["policy"], r["kd"], r["seed"]) not in planned]
        protocols.append(protocol)
    return protocols


def _write(protocols: list[dict], dense: float) -> None:
    write_result("train_policies", {
        "model": "smollm2 carved: shared 12.5% + 14 experts of 96, top-2 (25% of FFN neurons active)",
        "dense_ppl": dense,
        # "200k tokens" read as the 200-step protocol: 200 x 4 x 256 = 204,800; report.py picks the best run within it
        "targets": {"ppl_ratio": 1.10, "within_tokens": 204_800, "step_time_ratio": 1.05},
        "protocols": protocols,
    })


if __name__ == "__main__":
    main()
