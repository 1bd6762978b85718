"""Speed of carved MoEs against their dense source on SmolLM2: prefill, decode, FFN blocks, training steps, dispatch paths.

    python benchmarks/moe_speed.py [--repeats 5] [--threads 2]

Layouts at 25 % of FFN neurons active: shared 12.5 % + 14 experts of 96 (top-2), 16 x 96 (top-4), 64 x 24 (top-16),
128 x 12 (top-32). Experts are random splits of each FFN (the compute shapes of any carve), routers calibrated on 4096
tokens, so tokens spread over experts as in a carved model. Each measure runs the dense model and the MoE alternately
(interleaved repeats, median); wall-clock times give the ratios, CPU times of the process are recorded beside them.
- prefill: batch 8 x 256, logits for the last position only (generate's prefill);
- decode: batch 1, greedy, 64 new tokens after a 32-token prompt with the KV cache: (time(64) - time(1)) / 63 per token;
- FFN: one block (layer 15) on the prefill's [2048, 576] input, and all 30 blocks one after another on one token;
- training step: batch 4 x 256, loss (+ the router's load balance) forward and backward, AdamW step over the FFN
  parameters (experts, shared expert, routers: what `tiny-onn train` trains by default), expert statistics tracked;
- paths: the FFN block's time on every dispatch path (prefill, decode sweep, training forward + backward);
- decode kernel control: the MoE decodes through `bag_products` (embedding_bag over cached transposed weights), which on
  this CPU reads weights faster than MKL's matrix-vector product that the dense source's FFNs use. So the
  dense source is also decoded with its FFNs on that same kernel ("dense, decode kernel"): MoE ÷ that is the part of
  the decode speed-up that sparsity alone earns.
Writes benchmarks/results/moe_speed.json (`--result moe_speed-<machine>`: a file of its own for another machine).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_result_name, smollm2_scan, write_result  # noqa: E402

from tiny_onn.carve import CarveConfig, carve_model  # noqa: E402
from tiny_onn.carve.carver import active_fraction  # noqa: E402
from tiny_onn.data import DataArgs, build_dataset  # noqa: E402
from tiny_onn.model.modeling_tiny_onn import TinyOnnMLP, TinyOnnSparseMoeBlock  # noqa: E402
from tiny_onn.scan import ScanResult  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source  # noqa: E402

LAYOUTS = {
    "shared 12.5% + 14x96, top-2": dict(experts=14, top_k=2, shared=0.125),
    "16x96, top-4": dict(experts=16, top_k=4),
    "64x24, top-16": dict(experts=64, top_k=16),
    "128x12, top-32": dict(experts=128, top_k=32),
}
TARGETS = {"decode_speedup shared+14x96": 1.5, "prefill_speedup shared+14x96": 1.8, "mlp_time_ratio shared+14x96": 0.35,
           "prefill_speedup 64x24": 1.0, "decode_speedup 64x24": 1.4, "train_step E=128 / E=16": 1.3}
MLP_LAYER = 15
BASELINE_COMMIT = "79efbce"  # the MoE block before this benchmark's dispatch paths: the "before" column
ROOT = Path(__file__).resolve().parent.parent
BEFORE = f"before ({BASELINE_COMMIT})"
# prefill leaves out "gather": it copies every selected expert's weights per token (GiBs at 2048 tokens); moe_paths.py
# measures it where it is meant to run (few tokens)
PATHS = {"prefill": ("dense", "loop", "sorted", "padded"), "decode": ("dense", "loop", "gather", "bag", "padded"),
         "training": ("dense", "fused", "loop", "loop-dense-down", "sorted", "padded", "padded-dense-down")}


def baseline_blocks(moe) -> list[torch.nn.Module]:
    """Every layer's MoE block as implemented at BASELINE_COMMIT (read from git), holding the same weights."""
    src = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:tiny_onn/model/modeling_tiny_onn.py"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("tiny_onn.model.modeling_baseline")
    module.__package__ = "tiny_onn.model"  # its relative import of the configuration resolves as in the package
    sys.modules[module.__name__] = module  # transformers resolves the classes' annotations through sys.modules
    exec(compile(src, f"modeling_tiny_onn.py@{BASELINE_COMMIT}", "exec"), module.__dict__)
    blocks = []
    for layer in moe.model.layers:
        block = module.TinyOnnSparseMoeBlock(moe.config)
        block.load_state_dict(layer.mlp.state_dict())
        block.eval()  # a new module starts in training mode
        blocks.append(block)
    return blocks


START = time.perf_counter()


def log(message: str) -> None:
    rss = psutil.Process().memory_info().rss / 2**30
    print(f"[{time.perf_counter() - START:6.0f}s, {rss:.1f} GiB] {message}", flush=True)


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and process CPU seconds of each variant, `repeats` times, alternating the order (one warm-up each)."""
    for fn in variants.values():
        fn()
    out = {"wall": {n: [] for n in variants}, "cpu": {n: [] for n in variants}}
    for r in range(repeats):
        for name in list(variants) if r % 2 == 0 else list(reversed(variants)):
            wall, cpu = time.perf_counter(), time.process_time()
            variants[name]()
            out["wall"][name].append(time.perf_counter() - wall)
            out["cpu"][name].append(time.process_time() - cpu)
    return out


def medians(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {clock: {n: statistics.median(v) for n, v in per.items()} for clock, per in times.items()}


def set_path(model, path: str) -> None:
    """Force every MoE block onto one dispatch path ("X-dense-down": X with the dense down projection in training)."""
    for layer in model.model.layers:
        experts = layer.mlp.experts
        experts.path = path.removesuffix("-dense-down")
        experts.dense_down_max_inter = experts.down_proj.shape[-1] if path.endswith("-dense-down") else 0


def auto_path(model) -> None:
    for layer in model.model.layers:
        experts = layer.mlp.experts
        experts.path = "auto"
        experts.dense_down_max_inter = type(experts).dense_down_max_inter


def train_params(model) -> list[torch.nn.Parameter]:
    """The FFN parameters (experts, shared expert and routers in a MoE; the MLPs of the dense model), trainable."""
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp." in name)
        if p.requires_grad:
            params.append(p)
    return params


def training_step(model, ids: torch.Tensor, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    is_moe = model.config.model_type == "tiny_onn"

    def step() -> None:
        out = model(input_ids=ids, labels=ids, use_cache=False, **({"output_router_logits": True} if is_moe else {}))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def dense_on_decode_kernel(dense):
    """A copy of the dense model whose FFNs are TinyOnnMLPs holding the same weights: one-token steps run through the
    MoE's decode kernel, everything else as in the dense model."""
    model = copy.deepcopy(dense)
    for layer in model.model.layers:
        mlp = TinyOnnMLP(model.config, layer.mlp.gate_proj.weight.shape[0])
        mlp.load_state_dict(layer.mlp.state_dict())
        layer.mlp = mlp
    return model.eval()


# how the FFN measures (one block, the one-token sweep) call a MoE block: as generation and perplexity do, reading
# only its output (the router's log-probabilities and selection are skipped where the block can; see
# TinyOnnSparseMoeBlock.forward). Recorded in the result files; older files called it with routing outputs.
FFN_CALLS = "inference (MoE blocks called without routing outputs, as generation and perplexity call them)"


def inference_call(module, x: torch.Tensor):
    """An FFN on x as generation runs it: a MoE block without its routing outputs, any other module as it is."""
    return module(x, routing_outputs=False) if isinstance(module, TinyOnnSparseMoeBlock) else module(x)


class Inputs:
    """The dense model and every input the measures share (prefill batch, decode prompt, training batch, FFN inputs)."""

    def __init__(self, dense, ids: torch.Tensor, mask: torch.Tensor):
        self.dense, self.ids, self.mask = dense, ids, mask
        self.dense_kernel = dense_on_decode_kernel(dense)
        self.prompt, self.train_ids = ids[:1, :32], ids[:4]
        x_BTD = {}
        hook = dense.model.layers[MLP_LAYER].mlp.register_forward_pre_hook(lambda m, a: x_BTD.setdefault("x", a[0]))
        with torch.no_grad():
            dense(input_ids=ids, attention_mask=mask, use_cache=False)
        hook.remove()
        self.x_prefill = x_BTD["x"].reshape(-1, x_BTD["x"].shape[-1])  # [2048, 576]
        self.x_token = self.x_prefill[:1]

    @torch.no_grad()
    def prefill(self, model) -> None:
        model(input_ids=self.ids, attention_mask=self.mask, use_cache=False, logits_to_keep=1)

    @torch.no_grad()
    def generate(self, model, n: int) -> None:
        model.generate(self.prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    @torch.no_grad()
    def ffn_sweep(self, model) -> None:
        """Every layer's FFN on one token: the weights stream from memory as in decode."""
        for layer in model.model.layers:
            inference_call(layer.mlp, self.x_token)

    @torch.no_grad()
    def block(self, block) -> None:
        inference_call(block, self.x_prefill)

    def block_train(self, block) -> None:
        x = self.x_prefill.detach().requires_grad_(True)
        y = block(x)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(torch.ones_like(y))


def carve_layout(layout: dict, scan, source, calib):
    """(model, plan, carve config) of one layout: random experts (the compute shapes of any carve), routers calibrated
    on 4,096 tokens (Adam, as the committed results were measured)."""
    cfg = CarveConfig(method="random", calib_tokens=4096, calib_steps=100, calib_refine="adam", **layout)
    moe, plan, _ = carve_model(scan, source, cfg, calib)
    return moe, plan, cfg


def measure(name: str, layout: dict, inp: Inputs, scan, source, calib, repeats: int) -> dict:
    moe, plan, cfg = carve_layout(layout, scan, source, calib)
    log(f"{name}: carved")
    dense = inp.dense
    moe.eval()
    dense_block, moe_block = dense.model.layers[MLP_LAYER].mlp, moe.model.layers[MLP_LAYER].mlp
    experts = moe_block.experts
    n_prefill = inp.x_prefill.shape[0]
    auto = {"prefill": experts.pick_path(n_prefill, cfg.top_k, inp.x_prefill, grad=False),
            "decode": experts.pick_path(1, cfg.top_k, inp.x_token, grad=False)}
    train_path = experts.pick_path(n_prefill, cfg.top_k, inp.x_prefill, grad=True)
    auto["train"] = train_path + ("-dense-down" if experts.down_proj.shape[-1] <= experts.dense_down_max_inter
                                  and train_path in ("loop", "padded") else "")
    with torch.no_grad():
        idx_NK = moe_block.router.log_probs(inp.x_prefill).topk(cfg.top_k, dim=-1).indices
        counts = torch.bincount(idx_NK.reshape(-1), minlength=cfg.experts).float()
    inf = medians(interleaved({
        "dense_prefill": lambda: inp.prefill(dense), "moe_prefill": lambda: inp.prefill(moe),
        "dense_generate_64": lambda: inp.generate(dense, 64), "moe_generate_64": lambda: inp.generate(moe, 64),
        "dense_generate_1": lambda: inp.generate(dense, 1), "moe_generate_1": lambda: inp.generate(moe, 1),
        "dense_mlp": lambda: inp.block(dense_block), "moe_mlp": lambda: inp.block(moe_block),
        "dense_ffn_sweep_1_token": lambda: inp.ffn_sweep(dense), "moe_ffn_sweep_1_token": lambda: inp.ffn_sweep(moe),
        "dense_kernel_generate_64": lambda: inp.generate(inp.dense_kernel, 64),
        "dense_kernel_generate_1": lambda: inp.generate(inp.dense_kernel, 1),
        "dense_kernel_ffn_sweep_1_token": lambda: inp.ffn_sweep(inp.dense_kernel),
    }, repeats))
    log(f"{name}: inference measured")
    wall = inf["wall"]
    per_token = {k: (wall[f"{k}_generate_64"] - wall[f"{k}_generate_1"]) / 63 for k in ("dense", "moe", "dense_kernel")}
    # one training step of each model
    moe.train()
    dense.train()
    opt_dense = torch.optim.AdamW(train_params(dense), lr=1e-6, foreach=False)  # foreach=False: fewer temporaries
    opt_moe = torch.optim.AdamW(train_params(moe), lr=1e-6, foreach=False)
    for layer in moe.model.layers:
        layer.mlp.experts.track_stats = True
        layer.mlp.experts.reset_stats()
    train = medians(interleaved({"dense_train_step": training_step(dense, inp.train_ids, opt_dense),
                                 "moe_train_step": training_step(moe, inp.train_ids, opt_moe)}, repeats))
    del opt_dense, opt_moe
    log(f"{name}: training steps measured")
    # the dispatch paths of one block (training: forward + backward on the prefill input)
    def on_path(path: str, fn: Callable[[], None]) -> Callable[[], None]:
        return lambda: (set_path(moe, path), fn())

    # inference paths in inference mode, as `generate` runs them (training mode would add the z-loss and the statistics)
    moe.eval()
    for layer in moe.model.layers:
        layer.mlp.experts.track_stats = False
    before = baseline_blocks(moe)
    sweep_before = types.SimpleNamespace(model=types.SimpleNamespace(
        layers=[types.SimpleNamespace(mlp=b) for b in before]))
    paths_inf = medians(interleaved({
        **{f"prefill {p}": on_path(p, lambda: inp.block(moe_block)) for p in PATHS["prefill"]},
        f"prefill {BEFORE}": lambda: inp.block(before[MLP_LAYER]),
        **{f"decode sweep {p}": on_path(p, lambda: inp.ffn_sweep(moe)) for p in PATHS["decode"]},
        f"decode sweep {BEFORE}": lambda: inp.ffn_sweep(sweep_before),
    }, repeats))
    log(f"{name}: inference paths measured")
    moe.train()
    for layer in moe.model.layers:
        layer.mlp.experts.track_stats = True
    for b in before:
        b.train()
        b.experts.track_stats = True  # as the current blocks in training
    paths_train = medians(interleaved({
        "dense MLP": lambda: inp.block_train(dense_block),
        **{f"train {p}": on_path(p, lambda: inp.block_train(moe_block)) for p in PATHS["training"]},
        f"train {BEFORE}": lambda: inp.block_train(before[MLP_LAYER]),
    }, repeats))
    log(f"{name}: training paths measured")
    auto_path(moe)
    dense.eval()
    for p in dense.parameters():
        p.requires_grad_(True)
        p.grad = None
    tokens = inp.ids.numel()
    return {
        "layout": layout,
        "active_fraction": active_fraction(plan, cfg.top_k, 1536),
        "tokens_per_expert_max_over_mean_layer15": float(counts.max() / counts.mean()),
        "prefill_tokens_per_second": {"dense": tokens / wall["dense_prefill"], "moe": tokens / wall["moe_prefill"]},
        "prefill_speedup": wall["dense_prefill"] / wall["moe_prefill"],
        "decode_tokens_per_second": {k: 1 / v for k, v in per_token.items()},
        "decode_speedup": per_token["dense"] / per_token["moe"],
        # the control: the dense source with its FFNs on the MoE's decode kernel
        "decode_speedup_vs_dense_on_decode_kernel": per_token["dense_kernel"] / per_token["moe"],
        "ffn_decode_sweep_time_ratio_vs_dense_on_decode_kernel": (wall["moe_ffn_sweep_1_token"]
                                                                  / wall["dense_kernel_ffn_sweep_1_token"]),
        "mlp_time_ratio": wall["moe_mlp"] / wall["dense_mlp"],
        "ffn_decode_sweep_time_ratio": wall["moe_ffn_sweep_1_token"] / wall["dense_ffn_sweep_1_token"],
        "train_step_seconds": {"dense": train["wall"]["dense_train_step"], "moe": train["wall"]["moe_train_step"]},
        "train_step_time_ratio": train["wall"]["moe_train_step"] / train["wall"]["dense_train_step"],
        "cpu_time_ratios": {
            "prefill": inf["cpu"]["moe_prefill"] / inf["cpu"]["dense_prefill"],
            "mlp": inf["cpu"]["moe_mlp"] / inf["cpu"]["dense_mlp"],
            "ffn_decode_sweep": inf["cpu"]["moe_ffn_sweep_1_token"] / inf["cpu"]["dense_ffn_sweep_1_token"],
            "train_step": train["cpu"]["moe_train_step"] / train["cpu"]["dense_train_step"],
        },
        "paths_time_ratio_vs_dense": {
            "prefill block": {p: paths_inf["wall"][f"prefill {p}"] / wall["dense_mlp"]
                              for p in (*PATHS["prefill"], BEFORE)},
            "decode sweep": {p: paths_inf["wall"][f"decode sweep {p}"] / wall["dense_ffn_sweep_1_token"]
                             for p in (*PATHS["decode"], BEFORE)},
            "training block": {p: paths_train["wall"][f"train {p}"] / paths_train["wall"]["dense MLP"]
                               for p in (*PATHS["training"], BEFORE)},
            "auto": {"prefill block": auto["prefill"], "decode sweep": auto["decode"], "training block": auto["train"]},
        },
        "median_seconds": {"inference": inf, "training": train, "paths_inference": paths_inf,
                           "paths_training": paths_train},
    }


result_name = machine_result_name("moe_speed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--result", default="moe_speed", type=result_name,
                        help="name of the result file under benchmarks/results/ (without .json): a run on another "
                             "machine gets its own file instead of replacing moe_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source = load_source(SourceArgs(model="smollm2", device="cpu"))
    scan = ScanResult.load(smollm2_scan())
    data_args = DataArgs(seq_len=256)
    calib = build_dataset(source.tokenizer, data_args, "train", max_tokens=4096)
    batch = next(build_dataset(source.tokenizer, data_args, "heldout", max_tokens=8 * 256).batches(8))
    inp = Inputs(source.model.eval(), batch["input_ids"], batch["attention_mask"])
    results = {}
    for name in args.layouts:
        results[name] = r = measure(name, LAYOUTS[name], inp, scan, source, calib, args.repeats)
        gc.collect()
        print(f"{name}: prefill {r['prefill_speedup']:.2f}x, decode {r['decode_speedup']:.2f}x, MLP ratio "
              f"{r['mlp_time_ratio']:.3f}, train step ratio {r['train_step_time_ratio']:.2f}", flush=True)
    e16, e128 = results.get("16x96, top-4"), results.get("128x12, top-32")
    write_result(args.result, {
        "model": "smollm2 (SmolLM2-135M-Instruct, fp32)",
        "batch": {"prefill": list(inp.ids.shape), "decode_prompt": list(inp.prompt.shape), "decode_new_tokens": 64,
                  "train": list(inp.train_ids.shape)},
        "mlp_layer": MLP_LAYER,
        "ffn_calls": FFN_CALLS,
        "repeats": args.repeats,
        "threads": args.threads,
        "shared_machine": "2 CPU cores shared with other engineers' jobs: ratios come from interleaved repeats (median); "
                          "absolute tokens/s vary with the load",
        "targets": TARGETS,
        # each layout's step relative to the dense step timed beside it, so the load of other hours cancels
        "train_step_ratio_e128_over_e16": (e128["train_step_time_ratio"] / e16["train_step_time_ratio"]
                                           if e16 and e128 else None),
        "layouts": results,
    })


if __name__ == "__main__":
    main()
