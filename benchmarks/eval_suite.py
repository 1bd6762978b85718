"""The evaluation table on SmolLM2: the dense source (its weights are the Q4_1 GGUF's, dequantized) against carved
25 %-active MoEs, before and after training, side by side in one run, with each MoE's sparsity–quality curve.

    python benchmarks/eval_suite.py

Models: the dense source; the knowledge benchmark's carved layouts named by --carved (`moe25`: shared 12.5 % + 14
experts of 96, top-2, the fast layout; `moe25gc2s0`: 1,536 one-neuron experts, top-384 of 768 candidates, the best
25 % row for knowledge), carved into runs/bench/knowledge/start/ as `knowledge_recovery.py` carves them when missing;
and the trained MoE folders of --trained (skipped, with a note, when a folder does not exist: train them with the
knowledge benchmark's command). Tasks: fact accuracy and retention (the knowledge benchmark's 240 evaluation facts),
general-text (news) perplexity, held-out mix perplexity, a multiple-choice arithmetic task generated from held-out word
problems (MMLU format, 4 choices), HumanEval pass@1 on the first --humaneval-limit problems of its evaluation part
(sandboxed), parameters, FLOPs/token, prefill and decode tokens/s, memory. Writes benchmarks/results/eval_suite.json
and benchmarks/results/sparsity_quality.png.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402
from knowledge_recovery import SOURCE, ensure_start_model  # noqa: E402

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


BEST_TRAINED = "runs/bench/knowledge/390x4x256-lr0.0003/moe25gc2s0-kd-both-full-0/model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--carved", nargs="*", default=["moe25", "moe25gc2s0"],
                        help="carved layouts of the knowledge benchmark (carved here when missing)")
    parser.add_argument("--trained", nargs="*", default=[BEST_TRAINED],
                        help="trained MoE folders to add to the table (skipped when a folder does not exist)")
    parser.add_argument("--humaneval-limit", type=int, default=5)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out mix tokens")
    parser.add_argument("--general-tokens", type=int, default=4096)
    parser.add_argument("--facts-limit", type=int, default=240, help="evaluation facts scored per model (fixed subset)")
    parser.add_argument("--corpus", default="runs/corpus-smollm2",
                        help="the knowledge benchmark's teacher corpus (only a knowledge-aware carve reads it)")
    parser.add_argument("--workdir", default="runs/bench/eval_suite")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    carved = [str(ensure_start_model(name, Path("runs/bench/knowledge"), args.corpus)) for name in args.carved]
    trained = [t for t in args.trained if (Path(t) / "config.json").is_file()]
    for t in sorted(set(args.trained) - set(trained)):
        print(f"note: {t} is not a model folder; its row is left out (train it with benchmarks/knowledge_recovery.py)")
    mc = arithmetic_mc(work / "arithmetic_mc.jsonl")
    out = work / "eval"
    cfg = EvalConfig(model=[SOURCE, *carved, *trained],
                     tasks=f"facts,general,ppl,speed,curve,humaneval,mc:{mc}", allow_code_execution=True,
                     humaneval_limit=args.humaneval_limit, eval_tokens=args.eval_tokens,
                     general_tokens=args.general_tokens, facts_limit=args.facts_limit, facts_source=SOURCE,
                     device="cpu", out=str(out))
    evaluate(cfg)
    report = json.loads((out / "eval.json").read_text())
    shutil.copy(out / "sparsity_quality.png", RESULTS / "sparsity_quality.png")
    for row in report["models"]:
        row.get("facts", {}).pop("answers", None)  # every reply: in the run folder's eval.json, not the result file
    write_result("eval_suite", {"table_markdown": (out / "eval.md").read_text(), "models": report["models"],
                                "mc_task": "arithmetic word problems, MMLU format, 4 choices, 100 held-out items",
                                "humaneval_problems": args.humaneval_limit, "facts_limit": args.facts_limit,
                                "general_tokens": args.general_tokens, "eval_tokens": args.eval_tokens})


if __name__ == "__main__":
    main()
