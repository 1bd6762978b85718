"""Do carved experts specialise by data category? NMI(top-1 expert, category) per layer on held-out SmolLM2 tokens, for
the ΔSC carving, a random split at the same budget, and (if given) a trained model; plus one layer's heatmap.

    python benchmarks/interpret_nmi.py [--trained runs/bench/train_policies/steps30-bs2-seq256-lr0.0001-k4/smk2-kd0.5-seed0/model]

(--trained: a model folder of benchmarks/train_policies.py, one folder per protocol; the result records which.)

Writes benchmarks/results/interpret_nmi.json and benchmarks/results/heatmap_dsc.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, smollm2_scan, write_result  # noqa: E402

from tiny_onn.carve import CarveConfig  # noqa: E402
from tiny_onn.carve import run as carve  # noqa: E402
from tiny_onn.interpret import InterpretConfig  # noqa: E402
from tiny_onn.interpret import run as interpret  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", default="", help="a trained model folder (from train_policies.py) to add")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--workdir", default="runs/bench/interpret")
    parser.add_argument("--dsc-moe", default="runs/bench/train_policies/moe25",
                        help="the ΔSC-carved MoE (carved here if the folder does not exist)")
    args = parser.parse_args()
    work = Path(args.workdir)
    models = {}
    for method in ("dsc", "random"):
        folder = Path(args.dsc_moe) if method == "dsc" else work / f"moe-{method}"
        if not (folder / "config.json").is_file():
            carve(CarveConfig(scan=str(smollm2_scan()), method=method, experts=14, top_k=2, shared=0.125,
                              calib_tokens=8192, calib_steps=300, calib_refine="adam", eval_tokens=0, plots=False, device="cpu",
                              out=str(folder)))
        models[f"carved ({method} split)"] = folder
    if args.trained:
        models["trained (from dsc)"] = Path(args.trained)
    results = {}
    for name, folder in models.items():
        out = work / ("report-" + name.split()[0] + "-" + folder.name)
        interpret(InterpretConfig(model=str(folder), tokens=args.tokens, device="cpu", out=str(out)))
        import json

        rep = json.loads((out / "interpret.json").read_text())
        results[name] = {"model": str(folder), "nmi_per_layer": rep["nmi_per_layer"],
                         "nmi_mean": sum(rep["nmi_per_layer"]) / len(rep["nmi_per_layer"]),
                         "specificity_mean": sum(x["specificity"] for layer in rep["layers"] for x in layer["experts"])
                         / sum(len(layer["experts"]) for layer in rep["layers"]),
                         "labels_layer_15": [x["label"] for x in rep["layers"][15]["experts"]]}
        if "dsc" in name and "carved" in name:
            shutil.copy(out / "heatmap.png", RESULTS / "heatmap_dsc.png")
        print(f"{name}: mean NMI {results[name]['nmi_mean']:.4f}", flush=True)
    write_result("interpret_nmi", {"tokens": args.tokens, "layout": "shared 12.5% + 14 experts, top-2", "models": results})


if __name__ == "__main__":
    main()
