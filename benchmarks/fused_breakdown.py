"""Where the `fused` training path's time goes as experts get finer: its phases on SmolLM2's layer-15 FFN, E = 16, 64, 128.

    python benchmarks/fused_breakdown.py [--repeats 7] [--tokens 1024] [--result fused_breakdown-<machine>]

The training step of moe_speed.py costs more at E = 128 than at E = 16 with the same active neurons (its target:
within 1.3×). This splits one FFN block's forward and backward on the `fused` path (`ExpertGroupsFunction`) into its
phases and times each one alone: the per-expert gathers of input rows and of output gradients, the GEMMs, the
activation and its derivative, and the scatter-adds of outputs and of input gradients. Layouts as in moe_speed (25 %
of the 1,536 neurons per token: 16×96 top-4, 64×24 top-16, 128×12 top-32). Weights: the real FFN of layer 15 split
into E experts of random neurons (as the `random` carve does); inputs: the layer's FFN inputs of `--tokens` held-out
tokens (a training step's 4×256 by default); routing: each token's top-k experts by Σ|h_j|·‖d_j‖ over their neurons
(the dense FFN's own activations, so the load imbalance is a real one). Times are medians of interleaved repeats; a
phase alone runs on inputs prepared beforehand, so the phases need not sum to the whole. The whole path and the dense
FFN (forward + backward on the same tokens) are timed beside them.
Writes benchmarks/results/fused_breakdown.json (`--result fused_breakdown-<machine>`: a file of its own for another
machine).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from itertools import accumulate
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine_result_name, median, write_result  # noqa: E402
from moe_paths import LAYER, ffn_inputs  # noqa: E402

from tiny_onn.carve.assemble import expert_weights  # noqa: E402
from tiny_onn.model.modeling_tiny_onn import ExpertGroupsFunction  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source  # noqa: E402

LAYOUTS = {"16x96, top-4": (16, 4), "64x24, top-16": (64, 16), "128x12, top-32": (128, 32)}
# phase -> what it is (the README and the result file carry these words)
PHASES = {
    "gather inputs": "each expert's input rows copied out of x (index_select), forward",
    "gate/up GEMMs": "x_e · W_gate_up[e]ᵀ per expert",
    "activation": "act(gate) · up on every (token, expert) pair",
    "down GEMMs": "a_e · W_down[e]ᵀ per expert",
    "scatter-add outputs": "each expert's output rows added into y (index_add)",
    "gather output grads": "each expert's rows of dy copied out (index_select), backward",
    "down backward GEMMs": "da_e = dy_e · W_down[e] and dW_down[e] = a_eᵀ · dy_e",
    "activation backward": "the activation's derivative on every pair",
    "gather inputs again": "each expert's input rows copied out of x again, backward",
    "gate/up backward GEMMs": "dW_gate_up[e] = dh_eᵀ · x_e and dx_e = dh_e · W_gate_up[e]",
    "scatter-add input grads": "each expert's rows of dx added into dx (index_add)",
}
MOVES = ("gather inputs", "scatter-add outputs", "gather output grads", "gather inputs again", "scatter-add input grads")
GEMMS = ("gate/up GEMMs", "down GEMMs", "down backward GEMMs", "gate/up backward GEMMs")


def split_ffn(mlp, experts: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The FFN's neurons in `experts` groups of random neurons: gate_up [E, 2I, D] (gate rows, then up rows) and
    down [E, D, I], the layout `TinyOnnExperts` keeps."""
    gate, up, down = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()
    neurons = gate.shape[0]
    inter = neurons // experts
    perm = torch.randperm(neurons, generator=generator)[: experts * inter].view(experts, inter)  # [E, I]
    return expert_weights(gate, up, down, perm)


def oracle_selection(x_ND: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, k: int) -> torch.Tensor:
    """Each token's k experts of largest Σ_j |h_j|·‖d_j‖ (h: the neuron's SwiGLU activation) -> [N, k]."""
    E, I2, D = gate_up.shape
    inter = I2 // 2
    with torch.no_grad():
        h_NE2I = (x_ND @ gate_up.reshape(E * I2, D).T).view(-1, E, I2)
        a_NEI = F.silu(h_NE2I[..., :inter]) * h_NE2I[..., inter:]
        score_NE = (a_NEI.abs() * down.norm(dim=1)[None]).sum(-1)  # [N, E]
    return score_NE.topk(k, dim=-1).indices


def phase_timers(x_ND, gate_up, down, idx_NK) -> dict[str, Callable[[], object]]:
    """One callable per phase of the fused forward and backward (inputs of each prepared here), the whole path, and the
    dense FFN built from the same neurons."""
    N, D = x_ND.shape
    E, I2, _ = gate_up.shape
    inter = I2 // 2
    K = idx_NK.shape[1]
    token_P = torch.arange(N).repeat_interleave(K)
    order = torch.argsort(idx_NK.reshape(-1), stable=True)
    token_sorted = token_P[order]
    counts = torch.bincount(idx_NK.reshape(-1), minlength=E).tolist()
    spans = [(e, end - n, end) for e, (n, end) in enumerate(zip(counts, accumulate(counts), strict=True)) if n]
    scratch = x_ND.new_empty(max(counts), D)
    x_PD = x_ND[token_sorted]  # [P, D]: every pair's input row, gathered once, for the phases after the gather
    gen = torch.Generator().manual_seed(1)
    dy_ND = torch.randn(N, D, generator=gen) * x_ND.std()
    dy_PD = dy_ND[token_sorted]
    h_P2I = torch.cat([x_PD[s:t] @ gate_up[e].T for e, s, t in spans])  # [P, 2I]
    a_PI = F.silu(h_P2I[:, :inter]) * h_P2I[:, inter:]
    y_PD = torch.cat([a_PI[s:t] @ down[e].T for e, s, t in spans])  # [P, D]
    da_PI = torch.cat([dy_PD[s:t] @ down[e] for e, s, t in spans])
    hh = h_P2I.clone().requires_grad_(True)
    (dh_P2I,) = torch.autograd.grad(F.silu(hh[:, :inter]) * hh[:, inter:], hh, da_PI)
    dx_PD = torch.cat([dh_P2I[s:t] @ gate_up[e] for e, s, t in spans])
    out_P2I, out_PI = torch.empty_like(h_P2I), torch.empty_like(a_PI)
    g_down, g_gate_up = torch.empty(E, inter, D), torch.empty_like(gate_up)

    def gather(src):
        def run():
            for _, s, t in spans:
                torch.index_select(src, 0, token_sorted[s:t], out=scratch[: t - s])
        return run

    def scatter_add(rows_PD):
        def run():
            acc = torch.zeros(N, D)
            for _, s, t in spans:
                acc.index_add_(0, token_sorted[s:t], rows_PD[s:t])
        return run

    def gate_up_gemms():
        for e, s, t in spans:
            torch.mm(x_PD[s:t], gate_up[e].T, out=out_P2I[s:t])

    def activation():
        return F.silu(h_P2I[:, :inter]) * h_P2I[:, inter:]

    def down_gemms():
        for e, s, t in spans:
            torch.mm(a_PI[s:t], down[e].T, out=scratch[: t - s])

    def down_backward_gemms():
        for e, s, t in spans:
            torch.mm(dy_PD[s:t], down[e], out=out_PI[s:t])
            torch.mm(a_PI[s:t].T, dy_PD[s:t], out=g_down[e])

    def activation_backward():
        with torch.enable_grad():
            h = h_P2I.detach().requires_grad_(True)
            return torch.autograd.grad(F.silu(h[:, :inter]) * h[:, inter:], h, da_PI)

    def gate_up_backward_gemms():
        for e, s, t in spans:
            torch.mm(dh_P2I[s:t].T, x_PD[s:t], out=g_gate_up[e])
            torch.mm(dh_P2I[s:t], gate_up[e], out=scratch[: t - s])

    gate_up_p = gate_up.clone().requires_grad_(True)
    down_p = down.clone().requires_grad_(True)

    def whole():
        x = x_ND.clone().requires_grad_(True)
        y, _ = ExpertGroupsFunction.apply(x, gate_up_p, down_p, None, token_sorted, counts, F.silu)
        y.backward(dy_ND)
        gate_up_p.grad = down_p.grad = None

    w_gate = gate_up[:, :inter].reshape(E * inter, D).clone().requires_grad_(True)  # the same neurons as one dense FFN
    w_up = gate_up[:, inter:].reshape(E * inter, D).clone().requires_grad_(True)
    w_down = down.permute(1, 0, 2).reshape(D, E * inter).clone().requires_grad_(True)

    def dense():
        x = x_ND.clone().requires_grad_(True)
        y = F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
        y.backward(dy_ND)
        w_gate.grad = w_up.grad = w_down.grad = None

    return {
        "gather inputs": gather(x_ND), "gate/up GEMMs": gate_up_gemms, "activation": activation,
        "down GEMMs": down_gemms, "scatter-add outputs": scatter_add(y_PD),
        "gather output grads": gather(dy_ND), "down backward GEMMs": down_backward_gemms,
        "activation backward": activation_backward, "gather inputs again": gather(x_ND),
        "gate/up backward GEMMs": gate_up_backward_gemms, "scatter-add input grads": scatter_add(dx_PD),
        "fused forward + backward": whole, "dense FFN forward + backward": dense,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--result", default="fused_breakdown", type=machine_result_name("fused_breakdown"),
                        help="name of the result file under benchmarks/results/ (without .json): a run on another "
                             "machine gets its own file, e.g. fused_breakdown-amd-epyc")
    args = parser.parse_args()
    torch.manual_seed(0)
    source = load_source(SourceArgs(model="smollm2", device="cpu"))
    x_all = ffn_inputs(source)
    if args.tokens > x_all.shape[0]:
        raise SystemExit(f"--tokens {args.tokens}: only {x_all.shape[0]} held-out FFN inputs are gathered; pick fewer")
    x_ND = x_all[: args.tokens].contiguous()
    mlp = source.model.model.layers[LAYER].mlp
    rows = {}
    for name, (experts, k) in LAYOUTS.items():
        gate_up, down = split_ffn(mlp, experts, torch.Generator().manual_seed(0))
        idx_NK = oracle_selection(x_ND, gate_up, down, k)
        counts = torch.bincount(idx_NK.reshape(-1), minlength=experts).float()
        times = interleaved(phase_timers(x_ND, gate_up, down, idx_NK), args.repeats)
        ms = {phase: median(ts) * 1e3 for phase, ts in times.items()}
        rows[name] = {
            "experts": experts, "top_k": k, "neurons_per_expert": gate_up.shape[1] // 2,
            "pairs": int(idx_NK.numel()), "busiest_over_mean_expert": float(counts.max() / counts.mean()),
            "milliseconds": ms,
            "moves_ms": sum(ms[p] for p in MOVES), "gemms_ms": sum(ms[p] for p in GEMMS),
        }
        r = rows[name]
        print(f"{name}: fused {ms['fused forward + backward']:.1f} ms (dense FFN {ms['dense FFN forward + backward']:.1f}),"
              f" row moves {r['moves_ms']:.1f}, GEMMs {r['gemms_ms']:.1f}", flush=True)
    write_result(args.result, {
        "model": "smollm2 (SmolLM2-135M-Instruct, fp32)", "layer": LAYER, "tokens": args.tokens,
        "repeats": args.repeats, "threads": torch.get_num_threads(), "phases": PHASES,
        "row_moves": list(MOVES), "gemms": list(GEMMS), "layouts": rows,
    })


if __name__ == "__main__":
    main()
