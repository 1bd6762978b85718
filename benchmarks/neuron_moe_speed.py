"""What a user feels of the single-neuron MoE (the knowledge table's `moe25n`): prefill, decode and one training step
beside the dense source and the 14 x 96 carve (`moe25`), all at 25 % of the FFN neurons active, on SmolLM2.

    python benchmarks/neuron_moe_speed.py [--repeats 5] [--threads 2]

Models are the knowledge benchmark's start folders (`runs/bench/knowledge/start/moe25`, `.../moe25n`, carved there when
missing): shared 12.5 % + 14 experts of 96, top-2, linear routers; shared 12.5 % + 1,344 experts of one neuron,
top-192, rank-64 `lowrank` routers; the same with `gate` routers (`moe25g`: every routed neuron's gate computed), and
with two-stage gate routers (`moe25gc3`: also the up rows of each token's 3 × 192 candidates), and the knowledge
table's best 25 % layout (`moe25gc2s0`: no shared expert, 384 of 1,536 neurons among 768 candidates), once more with
its two-stage fast path off (`moe25gc2s0-general`, the general MoE path it replaced in inference).
The measures are moe_speed.py's (interleaved repeats, median wall clock):
prefill 8 x 256 (last position's logits), decode 64 greedy tokens after a 32-token prompt with the KV cache, one FFN
block on 2,048 tokens, all 30 FFN blocks on one token, and a training step (4 x 256, forward + backward + AdamW over
the FFN parameters). Writes benchmarks/results/neuron_moe_speed.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import smollm2_scan, write_result  # noqa: E402
from knowledge_recovery import SOURCE, ensure_start_model  # noqa: E402
from moe_speed import FFN_CALLS, MLP_LAYER, Inputs, interleaved, medians, train_params, training_step  # noqa: E402

from tiny_onn.data import DataArgs, build_dataset  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source  # noqa: E402

MODELS = ("moe25", "moe25n", "moe25g", "moe25gc3", "moe25gc2s0")
GENERAL_PATH = "moe25gc2s0-general"  # the same model with the two-stage fast path off: what it replaced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workdir", default="runs/bench/knowledge")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    smollm2_scan()
    source = load_source(SourceArgs(model=SOURCE, device="cpu"))
    batch = next(build_dataset(source.tokenizer, DataArgs(seq_len=256), "heldout", max_tokens=8 * 256).batches(8))
    inp = Inputs(source.model.eval(), batch["input_ids"], batch["attention_mask"])
    models = {"dense": inp.dense}
    for name in MODELS:
        folder = ensure_start_model(name, Path(args.workdir), "")
        models[name] = load_source(SourceArgs(model=str(folder), device="cpu"), dense_only=False).model.eval()
    general = load_source(SourceArgs(model=str(ensure_start_model("moe25gc2s0", Path(args.workdir), "")), device="cpu"),
                          dense_only=False).model.eval()
    for block in general.moe_blocks():
        block.two_stage_fast_path = False
    models[GENERAL_PATH] = general
    variants = {}
    for name, model in models.items():
        block = model.model.layers[MLP_LAYER].mlp
        variants |= {f"{name} prefill": lambda m=model: inp.prefill(m),
                     f"{name} generate 64": lambda m=model: inp.generate(m, 64),
                     f"{name} generate 1": lambda m=model: inp.generate(m, 1),
                     f"{name} mlp": lambda b=block: inp.block(b),
                     f"{name} ffn sweep": lambda m=model: inp.ffn_sweep(m)}
    inf = medians(interleaved(variants, args.repeats))["wall"]
    steps = {}
    for name, model in models.items():
        model.train()
        steps[f"{name} train step"] = training_step(model, inp.train_ids, torch.optim.AdamW(
            train_params(model), lr=1e-6, foreach=False))
    train = medians(interleaved(steps, args.repeats))["wall"]
    tokens = inp.ids.numel()
    rows = {}
    for name in models:
        per_token = (inf[f"{name} generate 64"] - inf[f"{name} generate 1"]) / 63
        rows[name] = {"prefill_tokens_per_second": tokens / inf[f"{name} prefill"],
                      "decode_tokens_per_second": 1 / per_token, "decode_seconds_per_token": per_token,
                      "mlp_seconds": inf[f"{name} mlp"], "ffn_sweep_seconds": inf[f"{name} ffn sweep"],
                      "train_step_seconds": train[f"{name} train step"],
                      "params": {"total": sum(p.numel() for p in models[name].parameters())}}
    dense = rows["dense"]
    for name in (*MODELS, GENERAL_PATH):
        r = rows[name]
        r["vs_dense"] = {"prefill_speedup": r["prefill_tokens_per_second"] / dense["prefill_tokens_per_second"],
                         "decode_speedup": r["decode_tokens_per_second"] / dense["decode_tokens_per_second"],
                         "mlp_time_ratio": r["mlp_seconds"] / dense["mlp_seconds"],
                         "ffn_sweep_time_ratio": r["ffn_sweep_seconds"] / dense["ffn_sweep_seconds"],
                         "train_step_time_ratio": r["train_step_seconds"] / dense["train_step_seconds"]}
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["vs_dense"].items()), flush=True)
    write_result("neuron_moe_speed", {
        "model": "smollm2 (SmolLM2-135M-Instruct, fp32)", "repeats": args.repeats, "threads": args.threads,
        "batch": {"prefill": list(inp.ids.shape), "decode_prompt": list(inp.prompt.shape), "decode_new_tokens": 64,
                  "train": list(inp.train_ids.shape)},
        "mlp_layer": MLP_LAYER, "ffn_calls": FFN_CALLS, "models": {"moe25": "shared 12.5 % + 14x96, top-2, linear routers",
                                           "moe25n": "shared 12.5 % + 1344x1, top-192, rank-64 lowrank routers",
                                           "moe25g": "shared 12.5 % + 1344x1, top-192, gate routers (rank 0)",
                                           "moe25gc3": "shared 12.5 % + 1344x1, top-192, two-stage gate routers "
                                                       "(576 candidates' up computed)",
                                           "moe25gc2s0": "no shared expert, 1536x1, top-384, two-stage gate routers "
                                                         "(768 candidates' up computed; the knowledge table's best "
                                                         "25 % layout)",
                                           GENERAL_PATH: "the same, on the general MoE path (two-stage fast path "
                                                         "off)"},
        "rows": rows,
    })


if __name__ == "__main__":
    main()
