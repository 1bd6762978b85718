"""Do the scan's scores find the neurons that matter? Zero 10 % of every layer's FFN neurons, chosen by each score, and
measure held-out perplexity on SmolLM2.

    python benchmarks/score_validity.py

Scores: S_p, ΔSC, activation×gradient (LLaMA-MoE importance), structured Wanda (‖d_j‖₂ · mean|h_j|: the down_proj
column norm times its input's activation), each taking the top and the bottom 10 %, and a random 10 %.
Writes benchmarks/results/score_validity.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import smollm2_scan, write_result  # noqa: E402

from tiny_onn.data import DataArgs, build_dataset  # noqa: E402
from tiny_onn.eval import perplexity  # noqa: E402
from tiny_onn.scan import ScanResult  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source, swiglu_mlps  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()
    source = load_source(SourceArgs(model="smollm2", device="cpu"))
    scan = ScanResult.load(smollm2_scan())
    held = build_dataset(source.tokenizer, DataArgs(seq_len=256), "heldout", max_tokens=args.eval_tokens)
    mlps = swiglu_mlps(source.model)
    gen = torch.Generator().manual_seed(0)

    def score(name: str, layer: int) -> torch.Tensor:
        act, grad = scan.stat(layer, "act"), scan.stat(layer, "grad")
        return {
            "S_p": lambda: scan.stat(layer, "s_p"),
            "ΔSC": lambda: scan.stat(layer, "delta_sc"),
            "act×grad": lambda: act * grad,
            "Wanda": lambda: mlps[layer].down_proj.weight.detach().norm(dim=0) * act,
            "random": lambda: torch.rand(act.shape, generator=gen),
        }[name]()

    dense = perplexity(source.model, held)
    rows = [{"zeroed": "none (dense)", "ppl": dense["ppl"], "ratio": 1.0}]
    print(f"dense: {dense['ppl']:.3f}", flush=True)
    choices = [(s, end) for s in ("S_p", "ΔSC", "act×grad", "Wanda") for end in ("top", "bottom")] + [("random", "")]
    for name, end in choices:
        saved = []
        for m in mlps:
            n = round(args.fraction * m.num_neurons)
            s = score(name, m.layer)
            idx = s.topk(n, largest=(end != "bottom")).indices
            saved.append((m, idx, m.down_proj.weight[:, idx].clone()))
            with torch.no_grad():
                m.down_proj.weight[:, idx] = 0.0  # the neuron's whole contribution h_j * d_j is gone
        ppl = perplexity(source.model, held)
        for m, idx, w in saved:
            with torch.no_grad():
                m.down_proj.weight[:, idx] = w
        label = f"{end} 10 % by {name}".strip() if end else "random 10 %"
        rows.append({"zeroed": label, "score": name, "end": end, "ppl": ppl["ppl"], "ratio": ppl["ppl"] / dense["ppl"],
                     "by_category": ppl["by_category"]})
        print(f"{label}: {ppl['ppl']:.3f} (x{ppl['ppl'] / dense['ppl']:.3f})", flush=True)
    write_result("score_validity", {
        "model": "smollm2 (SmolLM2-135M-Instruct, fp32)",
        "fraction_zeroed_per_layer": args.fraction,
        "scan_tokens": scan.meta["tokens_fed"],
        "heldout_tokens_scored": dense["tokens"],
        "rows": rows,
    })


if __name__ == "__main__":
    main()
