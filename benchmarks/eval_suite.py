"""The evaluation table on SmolLM2: the dense source (its weights are the Q4_1 GGUF's, dequantized) against a carved
25 %-active MoE, side by side in one run, with the MoE's sparsity–quality curve.

    python benchmarks/eval_suite.py

Tasks: held-out perplexity per category, the built-in factual probe, a multiple-choice arithmetic task generated from
held-out word problems (MMLU format, 4 choices), HumanEval pass@1 on the first --humaneval-limit problems (sandboxed),
parameters, FLOPs/token, prefill and decode tokens/s, memory. Writes benchmarks/results/eval_suite.json and
benchmarks/results/sparsity_quality.png.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, smollm2_scan, write_result  # noqa: E402

from tiny_onn.carve import CarveConfig  # noqa: E402
from tiny_onn.carve import run as carve  # noqa: E402
from tiny_onn.data.sources import arithmetic_examples, split_examples  # noqa: E402
from tiny_onn.eval.harness import EvalConfig  # noqa: E402
from tiny_onn.eval.harness import run as evaluate  # noqa: E402


def arithmetic_mc(path: Path, n: int = 100, seed: int = 0) -> Path:
    """MMLU-format items from held-out generated word problems: the right answer and three near misses."""
    rng = random.Random(seed)
    _, held = split_examples(arithmetic_examples(), 0.1)
    lines = []
    for ex in held[:n]:
        answer = int(ex.messages[1][1].rsplit("The answer is ", 1)[1].rstrip("."))
        wrong = set()
        while len(wrong) < 3:
            cand = answer + rng.choice([-10, -2, -1, 1, 2, 10, answer or 1])
            if cand != answer:
                wrong.add(cand)
        choices = [answer, *sorted(wrong)]
        rng.shuffle(choices)
        lines.append(json.dumps({"question": ex.messages[0][1], "choices": [str(c) for c in choices],
                                 "answer": choices.index(answer)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--humaneval-limit", type=int, default=10)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--workdir", default="runs/bench/eval_suite")
    parser.add_argument("--moe", default="runs/bench/train_policies/moe25",
                        help="the carved MoE to evaluate (carved here if the folder does not exist)")
    parser.add_argument("--trained",
                        default="runs/bench/train_policies/steps200-bs4-seq256-lr0.0003-k4/full-kd0.0-seed0/model",
                        help="a trained MoE to add to the table (skipped if the folder does not exist)")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    moe = Path(args.moe)
    if not (moe / "config.json").is_file():
        carve(CarveConfig(scan=str(smollm2_scan()), experts=14, top_k=2, shared=0.125, calib_tokens=16384,
                          calib_steps=500, calib_refine="adam", eval_tokens=0, plots=False, device="cpu", out=str(moe)))
    mc = arithmetic_mc(work / "arithmetic_mc.jsonl")
    out = work / "eval"
    models = ["smollm2", str(moe)] + ([args.trained] if (Path(args.trained) / "config.json").is_file() else [])
    cfg = EvalConfig(model=models, tasks=f"ppl,probe,speed,curve,humaneval,mc:{mc}",
                     allow_code_execution=True, humaneval_limit=args.humaneval_limit, eval_tokens=args.eval_tokens,
                     device="cpu", out=str(out))
    evaluate(cfg)
    report = json.loads((out / "eval.json").read_text())
    shutil.copy(out / "sparsity_quality.png", RESULTS / "sparsity_quality.png")
    write_result("eval_suite", {"table_markdown": (out / "eval.md").read_text(), "models": report["models"],
                                "mc_task": "arithmetic word problems, MMLU format, 4 choices, 100 held-out items",
                                "humaneval_problems": args.humaneval_limit})


if __name__ == "__main__":
    main()
