"""How far each way of keeping 25 % of SmolLM2's FFN neurons lands from the dense FFN, layer by layer: the relative error
‖y − y_dense‖ / ‖y_dense‖ of the FFN output on the dense source's own FFN inputs (held-out mix + corpus tokens).

    python benchmarks/layer_error.py [--tokens 512] [--ranks 64 128]

Rows: the neuron oracle (each token's top 25 % neurons by |h|·‖d‖), low-rank neuron predictors (the same selection
by predicted |h|·‖d‖, `tiny_onn.carve.neuron_predictor`, fitted on 16k training tokens), the knowledge benchmark's
start models (`moe25`: shared 12.5 % + 14×96 top-2; `moe25f`: + 56×24 top-8; `moe25n`: + 1,344×1 top-192 with
rank-64 lowrank routers; `width25`: the static top 25 % neurons), and the `moe25`/`moe25f` experts chosen by summing a
rank-r predictor's neuron scores per expert instead of their linear router (does a better expert scorer help?).
Writes benchmarks/results/layer_error.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402
from knowledge_recovery import SOURCE, ensure_start_model  # noqa: E402

from tiny_onn.carve.calibrate import collect_ffn_inputs  # noqa: E402
from tiny_onn.carve.neuron_predictor import (  # noqa: E402
    fit_neuron_predictors,
    input_second_moments,
    low_rank_factors,
    sqrt_psd,
)
from tiny_onn.data import DataArgs, build_dataset  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source, swiglu_mlps  # noqa: E402

LAYERS = (0, 5, 10, 15, 20, 25, 29)
FRACTION = 0.25


def relative_error(y_ND: torch.Tensor, ref_ND: torch.Tensor) -> float:
    return ((y_ND - ref_ND).norm(dim=-1) / ref_ND.norm(dim=-1)).mean().item()


def masked_output(mlp, x_ND: torch.Tensor, score_NF: torch.Tensor, keep: int) -> torch.Tensor:
    h = mlp.act_fn(mlp.gate_proj(x_ND)) * mlp.up_proj(x_ND)  # [N, F]
    mask = torch.zeros_like(h).scatter_(-1, score_NF.topk(keep, dim=-1).indices, 1.0)
    return mlp.down_proj(h * mask)


def predictor_routed_output(block, x_ND: torch.Tensor, sqrt_c: torch.Tensor, rank: int) -> torch.Tensor:
    """The MoE block with each token's top-k experts chosen by the summed predicted |h|·‖d‖ of their neurons."""
    ex = block.experts
    E, I2, D = ex.gate_up_proj.shape
    inter = I2 // 2
    w = ex.gate_up_proj.detach()
    (gi, go), (ui, uo) = (low_rank_factors(w[:, sl].reshape(E * inter, D), sqrt_c, rank)
                          for sl in (slice(0, inter), slice(inter, I2)))
    h_hat = ex.act_fn(x_ND @ gi @ go) * (x_ND @ ui @ uo)  # [N, E·I]
    score_NE = (h_hat.abs() * ex.down_proj.detach().norm(dim=1).reshape(-1)).view(-1, E, inter).sum(-1)
    idx = score_NE.topk(block.routing.top_k, dim=-1).indices
    shared = block.shared_expert(x_ND) if block.shared_expert is not None else None
    return ex(x_ND, idx, None, None, out_ND=shared)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512, help="held-out tokens scored per layer")
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 128])
    p.add_argument("--fit-tokens", type=int, default=16384)
    p.add_argument("--data", default="default,runs/corpus-smollm2")
    p.add_argument("--workdir", default="runs/bench/knowledge")
    args = p.parse_args()
    torch.manual_seed(0)
    source = load_source(SourceArgs(model=SOURCE, device="cpu"))
    dense = source.model.eval()
    data_args = DataArgs(data=args.data, seq_len=256)
    fit = build_dataset(source.tokenizer, data_args, "train", max_tokens=args.fit_tokens)
    held = build_dataset(source.tokenizer, data_args, "heldout", max_tokens=max(args.tokens, 256) * 2)
    xs = [x[: args.tokens] for x in collect_ffn_inputs(dense, held)]
    mlps = [m.module for m in swiglu_mlps(dense)]
    refs = {i: mlps[i](xs[i]) for i in LAYERS}
    keep = round(FRACTION * mlps[0].gate_proj.weight.shape[0])
    rows: dict[str, dict[str, float]] = {}

    def record(name: str, outputs: dict[int, torch.Tensor]) -> None:
        rows[name] = {str(i): relative_error(outputs[i], refs[i]) for i in LAYERS}
        print(name, " ".join(f"{v:.2f}" for v in rows[name].values()), flush=True)

    norms = {i: mlps[i].down_proj.weight.norm(dim=0) for i in LAYERS}
    record("neuron oracle", {i: masked_output(mlps[i], xs[i], (mlps[i].act_fn(mlps[i].gate_proj(xs[i]))
                                                                * mlps[i].up_proj(xs[i])).abs() * norms[i], keep)
                             for i in LAYERS})
    for r in args.ranks:
        predictors = fit_neuron_predictors(dense, fit, rank=r)
        record(f"predictor rank {r}", {i: masked_output(mlps[i], xs[i], predictors[i].scores(xs[i], mlps[i].act_fn),
                                                        keep) for i in LAYERS})
    sqrt_c = {i: sqrt_psd(c) for i, c in enumerate(input_second_moments(dense, fit)) if i in LAYERS}
    for name in ("moe25", "moe25f", "moe25n", "width25"):
        model = load_source(SourceArgs(model=str(ensure_start_model(name, Path(args.workdir), "")), device="cpu"),
                            dense_only=False).model.eval()
        blocks = {i: model.model.layers[i].mlp for i in LAYERS}
        outputs = {}
        for i, block in blocks.items():
            out = block(xs[i][None])
            outputs[i] = (out[0] if isinstance(out, tuple) else out)[0]
        record(f"{name} (its own router)" if name.startswith("moe") else name, outputs)
        if name in ("moe25", "moe25f"):
            for r in args.ranks:
                record(f"{name}, experts by rank-{r} predictor",
                       {i: predictor_routed_output(b, xs[i], sqrt_c[i], r) for i, b in blocks.items()})
    write_result("layer_error", {"source": SOURCE, "active_fraction": FRACTION, "tokens": args.tokens,
                                 "fit_tokens": fit.num_tokens, "data": args.data, "layers": list(LAYERS), "rows": rows})


if __name__ == "__main__":
    main()
