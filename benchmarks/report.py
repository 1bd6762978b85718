"""Render the README's result tables from benchmarks/results/*.json (so every number there comes from a result file).

    python benchmarks/report.py            # rewrite the marked sections of README.md
    python benchmarks/report.py --print    # print them instead

A section is everything between `<!-- results:NAME -->` and `<!-- /results:NAME -->`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from tiny_onn.eval.facts import wilson_interval

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def scan_overhead(d: dict) -> str:
    m, tps = d["median_seconds"], d["tokens_per_second"]
    return "\n".join([
        f"SmolLM2-135M fp32, batch {d['batch'][0]}×{d['batch'][1]}, {d['repeats']} interleaved repeats, median, "
        f"{d['machine']['cpu_count']} CPU cores (`{d['command']}`):",
        "",
        "| step | median s | tokens/s |",
        "|---|---|---|",
        f"| forward + backward to activations, no hooks (plain) | {m['plain']:.2f} | {tps['plain']:.0f} |",
        f"| the same with the scanner's hooks and statistics (scan) | {m['scan']:.2f} | {tps['scan']:.0f} |",
        f"| a standard HF training step (all logits, weight gradients), for reference | {m['hf_training_step']:.2f} | "
        f"{tps['hf_training_step']:.0f} |",
        "",
        f"**scan ÷ plain = {d['ratio_scan_over_plain']:.3f}** (target ≤ {d['target_ratio_scan_over_plain']}).",
    ])


def _moe_speed_prefill_only(d: dict) -> str:
    """The first moe_speed format (prefill and one FFN block only), kept so an older result file still renders."""
    lines = [
        f"SmolLM2-135M fp32, batch {d['batch'][0]}×{d['batch'][1]}, {d['repeats']} interleaved repeats, median "
        f"(`{d['command']}`), measured on the MoE block as it was before the dispatch paths below. Prefill = the whole "
        f"model's forward with logits for the last position only; MLP = one FFN block (layer {d['mlp_layer']}) on the "
        "same input, router and dispatch included.",
        "",
        "| layout | active FFN neurons | prefill tokens/s dense → MoE | prefill speed-up (target ≥ 1.5) | "
        "MoE MLP ÷ dense MLP time (target ≤ 0.35) |",
        "|---|---|---|---|---|",
    ]
    for name, r in d["layouts"].items():
        t = r["prefill_tokens_per_second"]
        lines.append(f"| {name} | {r['active_fraction']:.1%} | {t['dense']:.0f} → {t['moe']:.0f} | "
                     f"{r['prefill_speedup_moe_over_dense']:.2f}× | {r['mlp_time_ratio_moe_over_dense']:.3f} |")
    return "\n".join(lines)


def _decode_limits(r: dict) -> tuple[float, float, float] | None:
    """From a moe_speed layout's medians: the decode speed-ups if the MoE's FFNs took exactly their active fraction of
    the dense FFNs' one-token time, and if they took no time at all (nothing else changed), and the FFNs' share of the
    dense source's time per token."""
    wall = r["median_seconds"]["inference"]["wall"]
    if "dense_ffn_sweep_1_token" not in wall or "active_fraction" not in r:
        return None
    per_token = (wall["dense_generate_64"] - wall["dense_generate_1"]) / 63
    ffn = wall["dense_ffn_sweep_1_token"]
    return per_token / (per_token - (1 - r["active_fraction"]) * ffn), per_token / (per_token - ffn), ffn / per_token


def _ffn_calls(d: dict) -> str:
    """How a speed run called the MoE blocks in its FFN measures (runs before the field: with routing outputs)."""
    if d.get("ffn_calls", "").startswith("inference"):
        return "called as generation calls it (no routing outputs)"
    return "called with its routing outputs (router log-probabilities and selection, which generation skips)"


def moe_speed(d: dict) -> str:
    if "threads" not in d:
        return _moe_speed_prefill_only(d)
    b = d["batch"]
    kernel = [r["median_seconds"]["inference"]["wall"] for r in d["layouts"].values()
              if "dense_kernel_ffn_sweep_1_token" in r["median_seconds"]["inference"]["wall"]]
    kernel = [w["dense_ffn_sweep_1_token"] / w["dense_kernel_ffn_sweep_1_token"] for w in kernel]
    kernel_note = (f" (here the dense FFNs on one token ran at {min(kernel):.1f}–{max(kernel):.1f}× their speed as shipped "
                   "on it)" if kernel else "")
    lines = [
        f"SmolLM2-135M fp32 on {d['machine']['cpu_count']} CPU cores ({d['threads']} threads; shared with other jobs, "
        f"so absolute speeds vary and only the side-by-side ratios count), {d['repeats']} interleaved repeats, median "
        f"(`{d['command']}`). Prefill: batch {b['prefill'][0]}×{b['prefill'][1]}, logits for the last position only. "
        f"Decode: batch 1, {b['decode_new_tokens']} greedy tokens with the KV cache; the MoE's FFNs run its decode "
        "kernel (embedding_bag over cached transposed weights, written because it beat MKL's matrix-vector product "
        f"on the AMD EPYC of the first runs{kernel_note}), so the column \"vs dense on the decode kernel\" decodes the dense source with its FFNs on that "
        "kernel too: the part of the speed-up that sparsity alone earns. MLP: one FFN block (layer "
        f"{d['mlp_layer']}) on the prefill's input, router and dispatch included, {_ffn_calls(d)}. Train step: batch "
        f"{b['train'][0]}×{b['train'][1]}, forward + backward + AdamW over the FFN parameters (what `tiny-onn train` "
        "trains), the MoE's step ÷ the dense model's. Decode, FFN-proportional · FFN-free: the dense source's measured "
        "time per token t and its 30 FFNs' time on one token f give the decode speed-up if the MoE's FFNs took exactly "
        "their active fraction a of f, t ÷ (t − (1 − a) f), and if they took no time at all, t ÷ (t − f): the ceiling of "
        "any speed-up that comes from the FFNs alone (f ÷ t: their share of the dense decode).",
        "",
        "| layout (25 % of FFN neurons active) | prefill tok/s dense → MoE | prefill speed-up | decode tok/s dense → MoE | "
        "decode speed-up | decode, FFN-proportional · FFN-free (FFN share) | decode speed-up vs dense on the decode kernel | "
        "MoE MLP ÷ dense MLP | train step MoE ÷ dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in d["layouts"].items():
        p, t = r["prefill_tokens_per_second"], r["decode_tokens_per_second"]
        control = r.get("decode_speedup_vs_dense_on_decode_kernel")
        limit = _decode_limits(r)
        lines.append(f"| {name} | {p['dense']:.0f} → {p['moe']:.0f} | {r['prefill_speedup']:.2f}× | "
                     f"{t['dense']:.1f} → {t['moe']:.1f} | {r['decode_speedup']:.2f}× | "
                     f"{'–' if limit is None else f'{limit[0]:.2f}× · {limit[1]:.2f}× ({limit[2]:.0%})'} | "
                     f"{'–' if control is None else f'{control:.2f}×'} | {r['mlp_time_ratio']:.3f} | "
                     f"{r['train_step_time_ratio']:.2f} |")
    tg = d["targets"]
    lines += ["", f"Targets: shared + 14×96 decode ≥ {tg['decode_speedup shared+14x96']}×, prefill ≥ "
              f"{tg['prefill_speedup shared+14x96']}×, MLP ratio ≤ {tg['mlp_time_ratio shared+14x96']}; 64×24 prefill ≥ "
              f"{tg['prefill_speedup 64x24']}×, decode ≥ {tg['decode_speedup 64x24']}×; train step E = 128 ÷ E = 16 ≤ "
              f"{tg['train_step E=128 / E=16']}."]
    if d.get("train_step_ratio_e128_over_e16") is not None:
        lines[-1] += f" Measured E = 128 ÷ E = 16: **{d['train_step_ratio_e128_over_e16']:.2f}**."
    lines += ["", "Time of each dispatch path ÷ the dense FFN's (bold: the path `auto` picks; prefill = one block on "
              "2048 tokens, decode = the 30 blocks on one token, training = one block's forward + backward; before = "
              "the MoE block before the dispatch paths):", "",
              "| layout | stage | " + " | ".join(_PATH_NAMES) + " | before |", "|---|---|" + "---|" * (len(_PATH_NAMES) + 1)]
    for name, r in d["layouts"].items():
        paths = r["paths_time_ratio_vs_dense"]
        picks = paths.get("auto", {})
        for stage, ratios in paths.items():
            if stage == "auto":
                continue
            before = next((v for p, v in ratios.items() if p.startswith("before")), None)
            cells = [("**{:.2f}**" if p == picks.get(stage) else "{:.2f}").format(ratios[p]) if p in ratios else "–"
                     for p in _PATH_NAMES]
            lines.append(f"| {name} | {stage} | " + " | ".join(cells) + f" | {'–' if before is None else f'{before:.2f}'} |")
    return "\n".join(lines)


def moe_paths(d: dict) -> str:
    paths = ("dense", "loop", "sorted", "gather", "bag", "padded")
    lines = [f"One MoE block (layer {d['layer']}) of SmolLM2 carved at 25 % active, on N held-out tokens from different "
             f"sequences; time of each path ÷ the dense FFN block on the same tokens (median of {d['repeats']} "
             "interleaved repeats; bold: the path `auto` picks; gather is not timed beyond 64 tokens, its weight copies "
             "grow with N·k). `python benchmarks/moe_paths.py`", "",
             "| layout | N | dense FFN ms | " + " | ".join(paths) + " | auto ÷ fastest |", "|---|---|---|" + "---|" * (len(paths) + 1)]
    for name, rows in d["layouts"].items():
        for n, r in rows.items():
            ratios, pick = r["time_ratio_vs_dense_ffn"], r["auto_picks"]
            cells = [("**{:.2f}**" if p == pick else "{:.2f}").format(ratios[p]) if p in ratios else "–" for p in paths]
            lines.append(f"| {name} | {n} | {r['dense_ffn_seconds'] * 1e3:.2f} | " + " | ".join(cells)
                         + f" | {ratios['auto'] / ratios[r['fastest']]:.2f} |")
    return "\n".join(lines)


def fused_breakdown(d: dict) -> str:
    layouts = d["layouts"]
    names = list(layouts)
    lines = [f"SmolLM2 layer {d['layer']}'s FFN split into experts of random neurons, {d['tokens']} held-out tokens, each "
             "token's top-k experts by Σ|h|·‖d‖; one forward + backward of the `fused` path, each phase timed alone "
             f"(milliseconds, median of {d['repeats']} interleaved repeats, {d['threads']} threads; the phases need not "
             "sum to the whole). Row moves: the per-expert gathers and scatter-adds of D-wide rows, one per (token, "
             "expert) pair.", "",
             "| phase | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for phase in d["phases"]:
        lines.append(f"| {phase} | " + " | ".join(f"{layouts[n]['milliseconds'][phase]:.1f}" for n in names) + " |")
    totals = [("(token, expert) pairs", lambda r: f"{r['pairs']:,}"),
              ("busiest expert ÷ mean", lambda r: f"{r['busiest_over_mean_expert']:.2f}"),
              ("**row moves** (gathers + scatter-adds)", lambda r: f"**{r['moves_ms']:.1f}**"),
              ("**GEMMs**", lambda r: f"**{r['gemms_ms']:.1f}**"),
              ("**fused forward + backward**", lambda r: f"**{r['milliseconds']['fused forward + backward']:.1f}**"),
              ("dense FFN forward + backward (same neurons)",
               lambda r: f"{r['milliseconds']['dense FFN forward + backward']:.1f}")]
    for label, cell in totals:
        lines.append(f"| {label} | " + " | ".join(cell(layouts[n]) for n in names) + " |")
    return "\n".join(lines)


def train_step_scaling(d: dict) -> str:
    moes = list(d["layouts"])
    lines = [f"SmolLM2-135M fp32, one training step (batch {'×'.join(map(str, d['runs'][0]['batch']))}, forward + "
             "backward + AdamW over the FFN parameters, expert statistics tracked) of MoEs at 25 % of FFN neurons "
             "active (and in one setting of the dense source too), the models of a setting run in turn round after "
             "round; "
             f"{d['processes']} fresh processes per setting, the settings alternating, {d['repeats']} rounds each, "
             f"{d['threads']} threads (`{d['command']}`). Step seconds are each process's medians; the ratio is the "
             "process's median E = 128 step ÷ its median E = 16 step, the range its rounds' ratios.", "",
             "| setting | process | dense s | " + " | ".join(f"{n} s" for n in moes)
             + " | E = 128 ÷ E = 16 | rounds' range | minor page faults per step, E = 16 → E = 128 | CPU s stolen |",
             "|---|---|---|" + "---|" * len(moes) + "---|---|---|---|"]
    key = "128x12, top-32 / 16x96, top-4"
    for setting in d["e128_over_e16"]:
        runs = [r for r in d["runs"] if r["setting"] == setting]
        for i, run in enumerate(runs, 1):
            med, r = run["step_seconds_median"], run["ratios"][key]
            faults = run["minor_page_faults_per_step_median"]
            stolen = "–" if run["stolen_cpu_seconds"] is None else f"{run['stolen_cpu_seconds']:.1f}"
            dense = f"{med['dense']:.2f}" if "dense" in med else "–"
            lines.append(f"| {setting} | {i} | {dense} | " + " | ".join(f"{med[n]:.2f}" if n in med else "–" for n in moes)
                         + f" | **{r['ratio_of_medians']:.2f}** | {r['per_round_min']:.2f}–{r['per_round_max']:.2f} | "
                         f"{faults[moes[0]]:,.0f} → {faults[moes[-1]]:,.0f} | {stolen} |")
    lines.append("")
    for setting, s in d["e128_over_e16"].items():
        lines.append(f"- {setting}: E = 128 ÷ E = 16 median **{s['median']:.2f}**, {s['min']:.2f}–{s['max']:.2f} over "
                     f"the processes; {s['processes_within_target']} of {len(s['per_process'])} within the target "
                     f"{d['target_e128_over_e16']}.")
    return "\n".join(lines)


_PATH_NAMES = ("dense", "fused", "loop", "loop-dense-down", "sorted", "gather", "bag", "padded", "padded-dense-down")


def calibration_speed(d: dict) -> str:
    s, c, r = d["seconds_per_layer_median"], d["cpu_seconds_per_layer_median"], d["ppl_ratio"]
    cur = d.get("current_refinement", {"calib_refine": "adam", "calib_steps": d["adam_steps"]})
    labels = {"baseline": f"before ({d['baseline']}), {d['adam_steps']} Adam steps",
              "current, adam": f"now, {d['adam_steps']} Adam steps",
              "current": f"now, {cur['calib_steps']} {'L-BFGS iterations' if cur['calib_refine'] == 'lbfgs' else 'Adam steps'}"
                         " (default)"}
    return "\n".join([
        f"{d['layout']}, {d['calibration_tokens']} calibration tokens; every layer calibrated by each variant, "
        f"interleaved, on {d['machine']['cpu_count']} CPU cores (`{d['command']}`). Held-out perplexity on "
        f"{d['heldout_tokens_scored']} response tokens, dense {d['dense_ppl']:.2f}.",
        "",
        "| router calibration | s per layer (median) | CPU s per layer (median) | all layers, s | held-out ppl ÷ dense | "
        "top-k overlap with oracle |",
        "|---|---|---|---|---|---|",
        *[f"| {labels.get(n, n)} | {s[n]:.1f} | {c[n]:.1f} | "
          f"{d['seconds_total'][n]:.0f} | {r[n]:.3f} | {d['top_k_overlap_with_oracle_mean'][n]:.3f} |" for n in s],
        "",
        f"Default against before: **{d['speedup']:.1f}× faster** in wall-clock time, {d['cpu_speedup']:.1f}× in CPU time "
        f"(target ≥ 3×). The collected FFN inputs take {d['ffn_inputs_bytes'] / 2**30:.2f} GiB here; a Qwen3-4B source "
        f"in bf16 at the same token count would need {d['ffn_inputs_bytes_qwen3_4b_bf16'] / 2**30:.1f} GiB (arithmetic).",
    ])


def carve_quality(d: dict) -> str:
    lines = [
        f"Held-out perplexity (response tokens, {d['heldout_tokens_scored']} scored) of the carved MoE ÷ the dense "
        f"source ({d['dense']['ppl']:.2f}), **no training**; routers calibrated on {d['calibration']['tokens']} tokens "
        f"({d['calibration']['adam_steps']} Adam steps after least squares); scan of {d['scan_tokens']} tokens "
        f"({' + '.join(f'`{c}`' for c in d.get('commands', [d['command']]))}). "
        "Oracle = the router replaced by each token's true expert gains.",
        "",
        "| layout | method | 25 % active | 50 % active |",
        "|---|---|---|---|",
    ]
    if not d.get("complete", True):
        lines[0] += " **Incomplete run: only the rows below were measured.**"
    rows = d["rows"]
    keys = []
    for r in rows:
        if (r["layout"], r["method"]) not in keys:
            keys.append((r["layout"], r["method"]))
    order = ["dsc", "dsc without ΔSC", "dsc, seed S_p shared", "actgrad", "coact", "random"]
    layouts = list(dict.fromkeys(k[0] for k in keys))
    keys.sort(key=lambda k: (layouts.index(k[0]), order.index(k[1]) if k[1] in order else len(order)))
    for layout, method in keys:
        cells = []
        for budget in ("25%", "50%"):
            r = next((x for x in rows if x["layout"] == layout and x["method"] == method and x["budget"] == budget), None)
            if r is None:
                cells.append("–")
                continue
            cell = f"{r['ratio']:.2f}"
            if "oracle_ratio" in r:
                cell += f" (oracle {r['oracle_ratio']:.2f})"
            cells.append(cell)
        lines.append(f"| {layout} | {method} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def lossless(d: dict) -> str:
    lines = [
        f"{d['model']}; {d['tokens'][0]}×{d['tokens'][1]} held-out tokens, largest logit {d['max_abs_logit']:.1f} "
        f"(`{d['command']}`). The dense model's own fp32 rounding error (its fp32 logits against float64): "
        f"{d['dense_fp32_vs_float64']:.2g}.",
        "",
        "| layout | max \\|MoE − dense\\| logit (both fp32) | relative to the largest logit | max \\|MoE − float64 dense\\| |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {r['max_abs_logit_difference']:.2g} | {r['relative_to_max_logit']:.1g} | "
              f"{r['moe_vs_float64_dense']:.2g} |" for name, r in d["layouts"].items()]
    return "\n".join(lines)


def score_validity(d: dict) -> str:
    lines = [
        f"Held-out perplexity after zeroing {d['fraction_zeroed_per_layer']:.0%} of every layer's FFN neurons, chosen by "
        f"each score (`{d['command']}`):",
        "",
        "| neurons zeroed | perplexity | ÷ dense |",
        "|---|---|---|",
    ]
    lines += [f"| {r['zeroed']} | {r['ppl']:.2f} | {r['ratio']:.3f} |" for r in d["rows"]]
    return "\n".join(lines)


def train_policies(d: dict) -> str:
    lines = [f"{d['model']}. Perplexity ratio vs dense ({d['dense_ppl']:.2f}) on held-out response tokens; every run "
             "starts from the same carved model. One table per protocol (command, steps × tokens, learning rate)."]
    for p in d["protocols"]:
        lines += [
            "",
            f"{' + '.join(f'`{c}`' for c in p['commands'])}: {p['steps']} steps × {p['batch_size']}×{p['seq_len']} tokens = {p['tokens_per_run']} "
            f"training tokens per run, expert lr {p['lr']:g}, k = {p['k']}.",
            "",
            "| policy | KD | seed | ratio before | ratio after | median step s | emergent shared experts |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [f"| {r['policy']} | {r['kd']} | {r['seed']} | {r['ratio_before']:.2f} | {r['ratio_after']:.2f} | "
                  f"{r['step_seconds_median']:.2f} | {r['emergent_shared_experts']} |" for r in p["runs"]]
        if p.get("step_time_ratio_smk2_over_full") is not None:
            lines += ["", f"Step time smk2 ÷ full (same KD, median over seeds): "
                      f"**{p['step_time_ratio_smk2_over_full']:.3f}** (target ≤ {d['targets']['step_time_ratio']})."]
    within = d["targets"]["within_tokens"]
    best = min((r["ratio_after"], p["tokens_per_run"], r["policy"], r["kd"], p["lr"]) for p in d["protocols"]
               for r in p["runs"] if p["tokens_per_run"] <= within)
    lines += ["", f"Best ratio within {within:,} training tokens: **{best[0]:.2f}** ({best[2]}, KD {best[3]}, lr "
              f"{best[4]:g}, {best[1]:,} tokens; target ≤ {d['targets']['ppl_ratio']})."]
    return "\n".join(lines)


def _eval_model_label(spec: str) -> str:
    """A readable name for an eval_suite model: the knowledge benchmark's carved start or trained run, else the spec."""
    if spec == "smollm2":
        return "SmolLM2-135M-Instruct (dense source)"
    parts = Path(spec).parts
    if len(parts) >= 2 and parts[-2] == "start":
        return f"`{parts[-1]}` carved, untrained"
    run = re.fullmatch(r"(\w+)-(.+)-(\w+)-(\d+)", parts[-2]) if len(parts) >= 3 and parts[-1] == "model" else None
    if run:
        return f"`{run[1]}` trained ({run[2]}, {run[3]}, seed {run[4]}; protocol {parts[-3]})"
    return f"`{spec}`"


def eval_suite(d: dict) -> str:
    header = f"`{d['command']}` ({d['mc_task']}; HumanEval: first {d['humaneval_problems']} problems of its evaluation part"
    if "facts_limit" not in d:  # a result file from before the fact benchmark: its own table
        return header + "):\n\n" + d["table_markdown"]
    rows = d["models"]
    dense = next(r for r in rows if r["kind"] == "dense")
    lines = [header + f"; {d['facts_limit']} evaluation facts, {d['general_tokens']:,} news tokens, "
             f"{d['eval_tokens']:,} held-out mix tokens; speeds: 2 threads, median of 3, each model timed in its turn, "
             "not interleaved):", "",
             "| model | active params | GFLOPs/token | fact retention (kept/known; 95 % CI) | fact acc | "
             "general-text ppl (÷ dense) | mix ppl (÷ dense) | prefill tok/s (× dense) | decode tok/s (× dense) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["facts"]
        lo, hi = f["retention_ci95"]
        ppl = {k: (r[k]["ppl"], r[k]["ppl"] / dense[k]["ppl"]) for k in ("general", "perplexity")}
        speed = {k: (r[k], r[k] / dense[k]) for k in ("prefill_tokens_per_second", "decode_tokens_per_second")}
        lines.append(
            f"| {_eval_model_label(r['model'])} | {r['params']['active_per_token'] / 1e6:.1f}M | "
            f"{r['flops_per_token'] / 1e9:.3f} | **{f['retention']:.3f}** ({f['retained']}/{f['known']}; "
            f"{lo:.2f}–{hi:.2f}) | {f['accuracy']:.3f} | **{ppl['general'][0]:.2f}** ({ppl['general'][1]:.2f}×) | "
            f"{ppl['perplexity'][0]:.2f} ({ppl['perplexity'][1]:.2f}×) | "
            f"{speed['prefill_tokens_per_second'][0]:.0f} ({speed['prefill_tokens_per_second'][1]:.2f}×) | "
            f"{speed['decode_tokens_per_second'][0]:.1f} ({speed['decode_tokens_per_second'][1]:.2f}×) |")
    lines += ["", "| model | task | score | items |", "|---|---|---|---|"]
    for r in rows:
        for sc in r.get("mc", {}).values():
            lines.append(f"| {_eval_model_label(r['model'])} | arithmetic multiple choice | acc {sc['acc']:.3f} | {sc['n']} |")
        if "humaneval" in r:
            lines.append(f"| {_eval_model_label(r['model'])} | HumanEval | pass@1 {r['humaneval']['pass@1']:.3f} | "
                         f"{r['humaneval']['n']} |")
    return "\n".join(lines)


def interpret_nmi(d: dict) -> str:
    names = list(d["models"])
    layers = len(next(iter(d["models"].values()))["nmi_per_layer"])
    lines = [f"NMI between each held-out token's top-1 expert and its category ({d['tokens']} tokens, {d['layout']}; "
             f"`{d['command']}`):", "", "| layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for li in range(layers):
        lines.append(f"| {li} | " + " | ".join(f"{d['models'][n]['nmi_per_layer'][li]:.3f}" for n in names) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{d['models'][n]['nmi_mean']:.3f}**" for n in names) + " |")
    lines.append("| mean expert specificity | " + " | ".join(f"{d['models'][n]['specificity_mean']:.3f}" for n in names)
                 + " |")
    return "\n".join(lines)


def gguf_weighting(d: dict) -> str:
    pr = d["protocol"]
    lines = [f"Same carve plan, data and seed; each trained {pr['steps']} steps × {pr['batch_size']}×{pr['seq_len']} tokens "
             f"({pr['tokens_per_run']:,}), policy {pr['policy']}, lr {pr['lr']}. Held-out perplexity (mix held-out "
             f"responses, {pr['eval_tokens']} tokens); dense SmolLM2: {d['dense_ppl']:.2f}.", "",
             "| weighting | llama.cpp can run it | carved ppl (× dense) | trained ppl (× dense) |", "|---|---|---|---|"]
    for r in d["rows"]:
        runs = "yes (deepseek)" if r["weighting"] == "probs" else "no"
        lines.append(f"| {r['weighting']} | {runs} | {r['ppl_carved']:.1f} ({r['ratio_carved']:.1f}×) | "
                     f"{r['ppl_trained']:.2f} ({r['ratio_trained']:.2f}×) |")
    return "\n".join(lines)


def gguf_speed(d: dict) -> str:
    rows = d["rows"]
    lines = [f"llama-cpp-python {d['llama_cpp_python']}, {d['threads']} thread(s), prompt {d['prompt_tokens']} tokens, "
             f"decode {d['new_tokens']} tokens at batch 1, median of {d['repeats']} interleaved rounds "
             "(shared 2-core machine: compare within the table)"
             + {True: ", extra weight buffers on.", False: ", extra weight buffers off (AMX build).",
                None: "."}[d.get("llama_cpp_extra_buffers")], "",
             "| model | runtime | file MiB | prompt tok/s | decode tok/s | held-out ppl |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        size = f"{r['file_mib']:.0f}" if "file_mib" in r else "–"
        lines.append(f"| {name} | {r['runtime']} | {size} | {r['prompt_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{r['heldout_ppl']:.2f} |")
    lines += ["", "| same quantisation | MoE decode ÷ dense | MoE prompt ÷ dense | MoE ppl ÷ dense |", "|---|---|---|---|"]
    for q, x in d["moe_vs_dense_same_quant"].items():
        lines.append(f"| {q} | {x['decode']:.2f}× | {x['prompt']:.2f}× | {x['ppl_ratio']:.2f}× |")
    return "\n".join(lines)


def _retention(r: dict) -> str:
    """Retention, kept/known and its 95 % Wilson interval (from the counts, so older result files render too)."""
    lo, hi = wilson_interval(r["facts_retained"], r["facts_known"])
    return f"**{r['fact_retention']:.3f}** ({r['facts_retained']}/{r['facts_known']}; {lo:.2f}–{hi:.2f})"


def _knowledge_row(label: str, r: dict, cats: list[str], extra: str = "") -> str:
    ratio = r.get("ratios") or {"mix_ppl": 1.0, "general_ppl": 1.0, "mix_ppl_by_category": dict.fromkeys(cats, 1.0)}
    per_cat = " | ".join(f"{ratio['mix_ppl_by_category'].get(c, float('nan')):.2f}" for c in cats)
    return (f"| {label} | {extra}{r.get('training_tokens', 0):,} | {r['active_params'] / 1e6:.1f}M | "
            f"{_retention(r)} | {r['fact_accuracy']:.3f} | "
            f"**{ratio['general_ppl']:.2f}** | {ratio['mix_ppl']:.2f} | {per_cat} |")


def knowledge_recovery(d: dict) -> str:
    out = []
    names = {"moe25": "MoE 25 %", "moe50": "MoE 50 %", "moe25k": "MoE 25 %, knowledge-aware scan",
             "moe50k": "MoE 50 %, knowledge-aware scan", "moe25c": "MoE 25 %, routers on carved inputs",
             "moe50c": "MoE 50 %, routers on carved inputs", "moe25f": "MoE 25 %, 56×24 experts",
             "moe25n": "MoE 25 %, 1,344 one-neuron experts, rank-64 router",
             "moe50n": "MoE 50 %, 1,344 one-neuron experts, rank-64 router",
             "moe25n128": "MoE 25 %, 1,344 one-neuron experts, rank-128 router",
             "moe50n128": "MoE 50 %, 1,344 one-neuron experts, rank-128 router",
             "moe25g": "MoE 25 %, 1,344 one-neuron experts, gate router (every gate computed)",
             "moe50g": "MoE 50 %, 1,344 one-neuron experts, gate router (every gate computed)",
             "moe25g64": "MoE 25 %, 1,344 one-neuron experts, gate router + rank-64 up",
             "moe50g64": "MoE 50 %, 1,344 one-neuron experts, gate router + rank-64 up",
             "moe25gc2": "MoE 25 %, 1,344 one-neuron experts, two-stage gate router (2 × k candidates' up computed)",
             "moe25gc3": "MoE 25 %, 1,344 one-neuron experts, two-stage gate router (3 × k candidates' up computed)",
             "moe50gc2": "MoE 50 %, 1,344 one-neuron experts, two-stage gate router (2 × k candidates' up computed)",
             "moe25gc2s0": "MoE 25 %, no shared expert, 1,536 one-neuron experts, two-stage gate router (2 × k "
                           "candidates' up computed: as many up rows as moe25gc3)",
             "moe25gc4s0": "MoE 25 %, no shared expert, 1,536 one-neuron experts, exact per-token top-k (every gate "
                           "and up computed: the neuron oracle as a layout)",
             "moe50gc2s0": "MoE 50 %, no shared expert, 1,536 one-neuron experts, exact per-token top-k (every gate "
                           "and up computed: the neuron oracle as a layout)",
             "moe25gc2s0b": "MoE 25 %, no shared expert, 1,536 one-neuron experts, two-stage gate router (2 × k "
                            "candidates' up computed), output bias (the mean of what the neurons left out add)",
             "moe25gc4s0b": "MoE 25 %, no shared expert, 1,536 one-neuron experts, exact per-token top-k (the neuron "
                            "oracle as a layout), output bias (the mean of what the neurons left out add)",
             "moe50gc2s0b": "MoE 50 %, no shared expert, 1,536 one-neuron experts, exact per-token top-k (the neuron "
                            "oracle as a layout), output bias (the mean of what the neurons left out add)",
             "moe50f": "MoE 50 %, 56×24 experts", "width25": "width-pruned dense 25 %",
             "width50": "width-pruned dense 50 %",
             "width67": "width-pruned dense 67 %", "dense": "dense source"}
    # the protocols in a fixed order, whichever a run wrote last: by training tokens, corpus size, learning rate
    order = sorted(d["protocols"], key=lambda e: (e["protocol"]["tokens_per_run"], e["protocol"].get("corpus_prompts", 0),
                                                  -e["protocol"]["lr"]))
    for entry in order:
        p, dense = entry["protocol"], entry["start"]["dense"]
        cats = sorted(dense["mix_ppl_by_category"])
        out += [
            f"Protocol: {p['steps']} steps × {p['batch_size']}×{p['seq_len']} tokens = {p['tokens_per_run']:,} training "
            f"tokens per run, lr {p['lr']:g}, KD temperature {p['kd_temperature']:g}, teacher-written corpus of "
            f"{p['corpus_prompts']:,} prompts; scored on {dense['facts_n']} "
            f"evaluation facts ({dense['facts_known']} known by the dense source), {p['general_tokens']:,} tokens of "
            f"news and {p['eval_tokens']:,} held-out mix tokens. Dense source: fact accuracy "
            f"{dense['fact_accuracy']:.3f}, general-text ppl {dense['general_ppl']:.2f}, mix ppl {dense['mix_ppl']:.2f}. "
            "Commands: " + "; ".join(f"`{c}`" for c in entry.get("commands", [])),
            "",
            "| model | recipe | policy | seed | training tokens | active params | fact retention (kept/known; 95 % CI) | "
            "fact acc | "
            "general-text ppl ÷ dense | mix ppl ÷ dense | " + " | ".join(f"{c} ÷ dense" for c in cats) + " |",
            "|" + "---|" * (10 + len(cats)),
        ]
        for name, r in entry["start"].items():
            if name != "dense":
                out.append(_knowledge_row(names.get(name, name), r, cats, "before training | – | – | "))
        for r in sorted(entry["runs"].values(), key=lambda r: (list(names).index(r["model"]), r["recipe"], r["policy"],
                                                                 r["seed"])):
            out.append(_knowledge_row(names.get(r["model"], r["model"]), r, cats,
                                      f"{r['recipe']} | {r['policy']} | {r['seed']} | "))
        for base_key, f in entry.get("forgetting", {}).items():
            before = f["before"]
            out += ["", f"Forgetting: starting from `{base_key}`, {f['steps']} steps of plain CE on `{f['category']}` "
                    "only, under each update policy (ratios after ÷ before; retention before → after):", "",
                    "| policy | " + " | ".join(f"{c} ppl" for c in cats) + " | general-text ppl | fact retention |",
                    "|" + "---|" * (3 + len(cats))]
            for pol, r in f["after"].items():
                per_cat = " | ".join(f"{r['mix_ppl_by_category'][c] / before['mix_ppl_by_category'][c]:.2f}" for c in cats)
                out.append(f"| {pol} | {per_cat} | {r['general_ppl'] / before['general_ppl']:.2f} | "
                           f"{before['fact_retention']:.3f} → {r['fact_retention']:.3f} |")
        out.append("")
    return "\n".join(out).rstrip()


SEED_ROWS = {  # row -> (mechanism, what it changes)
    "baseline": ("none (baseline)", "policy full"),
    "gaussian-router": ("Gaussian router", "routers score experts by a diagonal Gaussian each"),
    "router-distill": ("router distillation", "KL(teacher's expert gains ‖ router), weight {router_distill:g}"),
    "specificity": ("specificity loss", "experts' routing entropy across categories, weight {specificity:g}"),
    "input-embedding": ("router input: embedding", "routers read the token embedding"),
    "input-context": ("router input: context", "routers read the running mean of the embeddings"),
    "smk2": ("none (smk2 baseline)", "policy smk2, k = {k}"),
    "smk2-pi-schedule": ("PI schedule", "smk2; lr × (0.1 + 0.9·(1 − PI)), k = round(act_k·(1 − PI))"),
}
PERPETUAL_ROWS = {"full": "full", "smk2": "smk2 (k = {k})", "min1": "min_k = 1", "min1-replay": "min_k = 1 + replay",
                  "min1-ewc": "min_k = 1 + EWC", "min1-both": "min_k = 1 + replay + EWC"}


def _seed_row(label: str, what: str, r: dict, step_base: float | None) -> str:
    ratio = r["ratios"]
    step = "–"
    if r.get("step_seconds_median"):
        step = f"{r['step_seconds_median']:.1f}"
        if step_base:
            step += f" ({r['step_seconds_median'] / step_base:.2f}×)"
    return (f"| {label} | {what} | {_retention(r)} | "
            f"{r['fact_accuracy']:.3f} | **{ratio['general_ppl']:.2f}** | {ratio['mix_ppl']:.2f} | "
            f"{r['nmi']['mean']:.3f} | {step} |")


def seed_mechanisms(d: dict) -> str:
    p, dense = d["protocol"], d["dense"]
    lines = [
        f"SmolLM2 carved at 25 % active (shared 12.5 % + 14 experts, top-2), recipe `{p['recipe']}`, {p['steps']} steps × "
        f"{p['batch_size']}×{p['seq_len']} = {p['tokens_per_run']:,} training tokens per run (the same tokens in every "
        f"row), lr {p['lr']:g}, one seed; scored on {dense['facts_n']} evaluation facts ({dense['facts_known']} known by "
        f"the dense source), {p['general_tokens']:,} news tokens, {p['eval_tokens']:,} held-out mix tokens; NMI between "
        f"each of {p['nmi_tokens']:,} held-out mix tokens' top-1 expert and its category (chat/code/math), mean over "
        f"layers. Step time: median seconds per step on a shared 2-core CPU (÷ the baseline of the same policy). "
        "Commands: " + "; ".join(f"`{c}`" for c in d.get("commands", [])),
        "",
        "| mechanism | what changes | fact retention (kept/known; 95 % CI) | fact acc | general-text ppl ÷ dense | mix ppl ÷ dense | "
        "NMI | step s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, r in d["start"].items():
        lines.append(_seed_row(f"before training: {variant}", "carved, calibrated, untrained", r, None))
    for name, r in d["runs"].items():
        label, what = SEED_ROWS.get(name, (name, ""))
        base = d["runs"].get("smk2" if name.startswith("smk2") else "baseline", {}).get("step_seconds_median")
        lines.append(_seed_row(label, what.format(**p), r, base))
    perpetual = d.get("perpetual")
    if perpetual and perpetual.get("after"):
        before = d["runs"][perpetual["start"]]
        cats = sorted(before["mix_ppl_by_category"])
        s = perpetual["settings"]
        lines += [
            "",
            f"Perpetual training: from the baseline's trained model, {s['forget_steps']} steps × {p['batch_size']}×"
            f"{p['seq_len']} tokens of plain CE on `{s['forget_category']}` only, lr {p['lr']:g}. Replay: "
            f"{s['replay_ratio']:.0%} of each batch from a buffer of {s['replay_size']} sequences of the recipe's data; "
            f"EWC: λ = {s['ewc']:g}, empirical Fisher on {s['ewc_samples']} sequences of the recipe's data. Columns: "
            "perplexity after ÷ before per category (the learned one is the gain, the others the forgetting), "
            "general-text perplexity after ÷ before, fact retention before → after.",
            "",
            "| policy | " + " | ".join(f"{c} ppl" for c in cats) + " | general-text ppl | fact retention | "
            "experts updated per layer and step | step s |",
            "|" + "---|" * (5 + len(cats)),
        ]
        for name, r in perpetual["after"].items():
            per_cat = " | ".join(f"{r['mix_ppl_by_category'][c] / before['mix_ppl_by_category'][c]:.2f}" for c in cats)
            lines.append(f"| {PERPETUAL_ROWS.get(name, name).format(**p)} | {per_cat} | "
                         f"{r['general_ppl'] / before['general_ppl']:.2f} | {before['fact_retention']:.3f} → "
                         f"**{r['fact_retention']:.3f}** | {r['experts_updated_mean']:.1f} | "
                         f"{r['step_seconds_median']:.1f} |")
    return "\n".join(lines)


def knowledge_ceiling(d: dict) -> str:
    p, dense = d["protocol"], d["dense"]
    lines = [
        f"SmolLM2, scored as the knowledge table scores (protocol `{d['knowledge_recovery_protocol']}`): "
        f"{dense['facts_n']} evaluation facts ({dense['facts_known']} known by the dense source), {p['general_tokens']:,} "
        f"news tokens, {p['eval_tokens']:,} held-out mix tokens. Oracles compute every neuron, so they bound quality, not "
        f"speed. Commands: " + "; ".join(f"`{c}`" for c in d.get("commands") or [d["command"]]),
        "",
        "| model | selection | fact retention (kept/known; 95 % CI) | fact acc | general-text ppl ÷ dense | mix ppl ÷ dense |",
        "|---|---|---|---|---|---|",
    ]
    names = {"moe25": "MoE 25 % (shared 12.5 % + 14×96, top-2), before training",
             "moe50": "MoE 50 % (shared 12.5 % + 14×96, top-6), before training",
             "moe25f": "MoE 25 % (shared 12.5 % + 56×24, top-8), before training",
             "moe25n": "MoE 25 % (shared 12.5 % + 1,344×1, top-192, rank-64 router), before training",
             "moe50n": "MoE 50 % (shared 12.5 % + 1,344×1, top-576, rank-64 router), before training",
             "moe50f": "MoE 50 % (shared 12.5 % + 56×24, top-24), before training"}
    for key, r in d["rows"].items():
        label, _, _ = key.rpartition(" ")
        if label.count(":") == 3:  # a trained run of the knowledge table: MODEL:RECIPE:POLICY:SEED
            model, recipe, policy, seed = label.split(":")
            label = f"{model} trained ({recipe}, {policy}, seed {seed})"
        label = names.get(label, label)
        selection = {"neuron oracle": "each token's top neurons by \\|h\\|·‖d‖ (no experts)",
                     "router": "the model's router" + (" (row of the knowledge table)" if r.get("copied_from") else ""),
                     "expert oracle": "each token's top-k experts by true gain",
                     "low-rank predictor": f"each token's top neurons by a rank-{r.get('rank')} prediction of \\|h\\|·‖d‖",
                     "exact-gate predictor": "each token's top neurons by \\|act(gate)\\|·‖d‖ times "
                     + (f"a rank-{r.get('rank')} prediction of \\|up\\|" if r.get("rank") else "the up's RMS")
                     + " (every gate computed)",
                     "two-stage exact-gate predictor": f"the {r.get('candidate_factor', 0):g} × k neurons of largest "
                     "\\|act(gate)\\|·RMS(up)·‖d‖, then the top k of them by their true \\|h\\|·‖d‖ (every gate and "
                     "those candidates' up computed; predictor fitted on `" + str(r.get("predictor_data")) + "`)",
                     "neuron oracle (allocated)": "each token's top neurons by \\|h\\|·‖d‖, per FFN its own "
                     "fraction (equal relative gain of the next neuron, fitted on `" + str(r.get("predictor_data"))
                     + "`)",
                     "neuron threshold oracle (layer)": "each token's neurons whose \\|h\\|·‖d‖ reaches its FFN's "
                     "threshold (fitted on `" + str(r.get("predictor_data")) + "`), so the count varies per token",
                     "neuron threshold oracle (global)": "each token's neurons whose \\|h\\|·‖d‖ reaches one threshold "
                     "for all FFNs (fitted on `" + str(r.get("predictor_data")) + "`): the count varies per token and "
                     "per layer",
                     "neuron oracle (Taylor importance)": "each token's top neurons by \\|h\\| times the scan's mean "
                     "\\|∂L/∂h\\| (first-order Taylor importance; scan of "
                     f"{r.get('scan_tokens', 0):,} tokens of `{r.get('scan_data')}`)",
                     }[r["kind"]]
        if r["kind"] in ("neuron oracle", "neuron oracle (Taylor importance)", "low-rank predictor",
                         "exact-gate predictor", "two-stage exact-gate predictor"):
            label = f"dense, {100 * r['active_ffn_fraction']:g}% of FFN neurons per token"
        elif r["kind"] == "neuron oracle (allocated)":
            by_layer = r["fractions_by_layer"]
            label = (f"dense, {r['active_ffn_fraction']:.0%} of FFN neurons on average (per layer "
                     f"{min(by_layer):.0%}–{max(by_layer):.0%})")
        elif r["kind"].startswith("neuron threshold oracle"):
            by_layer = r["measured_active_by_layer"]
            label = (f"dense, {r['active_ffn_fraction']:.0%} of FFN neurons on average (measured here: "
                     f"{r['measured_active_fraction']:.1%}; per layer {min(by_layer):.0%}–{max(by_layer):.0%})")
        lines.append(f"| {label} | {selection} | {_retention(r)} | {r['fact_accuracy']:.3f} | "
                     f"**{r['ratios']['general_ppl']:.2f}** | {r['ratios']['mix_ppl']:.2f} |")
    return "\n".join(lines)


def layer_error(d: dict) -> str:
    layers = [str(i) for i in d["layers"]]
    lines = [
        f"Relative error ‖y − y_dense‖ / ‖y_dense‖ of the FFN output, mean over {d['tokens']} held-out tokens of "
        f"`{d['data']}` (the dense source's own FFN inputs), {d['active_fraction']:.0%} of the FFN neurons active, "
        f"predictors fitted on {d['fit_tokens']:,} training tokens (`{d['command']}`):",
        "",
        "| selection | " + " | ".join(f"layer {i}" for i in layers) + " |",
        "|---|" + "---|" * len(layers),
    ]
    for name, row in d["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[i]:.2f}" for i in layers) + " |")
    return "\n".join(lines)


def neuron_moe_speed(d: dict) -> str:
    lines = [
        f"SmolLM2 fp32, {d['threads']} threads, {d['repeats']} interleaved repeats, median (`{d['command']}`): prefill "
        f"{d['batch']['prefill'][0]}×{d['batch']['prefill'][1]}, decode {d['batch']['decode_new_tokens']} greedy tokens "
        f"with the KV cache, FFN block {d['mlp_layer']} on 2,048 tokens and the 30 FFN blocks on one token (MoE blocks "
        f"{_ffn_calls(d)}), one training "
        f"step {d['batch']['train'][0]}×{d['batch']['train'][1]} (forward + backward + AdamW over the FFN parameters).",
        "",
        "| model | total params | prefill tok/s | decode tok/s | FFN block s | 30 FFNs on 1 token, ms | train step s |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"dense": "dense source", **d["models"]}
    def ratio(r: dict, key: str) -> str:
        return f" ({r['vs_dense'][key]:.2f}×)" if "vs_dense" in r else ""

    for key, r in d["rows"].items():
        lines.append(
            f"| {names[key]} | {r['params']['total'] / 1e6:.1f}M | {r['prefill_tokens_per_second']:.0f}"
            f"{ratio(r, 'prefill_speedup')} | {r['decode_tokens_per_second']:.1f}{ratio(r, 'decode_speedup')} | "
            f"{r['mlp_seconds']:.3f}{ratio(r, 'mlp_time_ratio')} | {r['ffn_sweep_seconds'] * 1e3:.1f}"
            f"{ratio(r, 'ffn_sweep_time_ratio')} | {r['train_step_seconds']:.2f}{ratio(r, 'train_step_time_ratio')} |")
    lines += ["", "(×: speed-up over dense for tok/s, time ÷ dense for seconds.)"]
    return "\n".join(lines)


RENDERERS = {"scan_overhead": scan_overhead, "moe_speed": moe_speed,
             "moe_paths": moe_paths, "calibration_speed": calibration_speed,
             "carve_quality": carve_quality, "score_validity": score_validity, "train_policies": train_policies,
             "eval_suite": eval_suite, "interpret_nmi": interpret_nmi, "lossless": lossless,
             "gguf_weighting": gguf_weighting, "gguf_speed": gguf_speed, "knowledge_recovery": knowledge_recovery,
             "seed_mechanisms": seed_mechanisms, "knowledge_ceiling": knowledge_ceiling,
             "layer_error": layer_error, "neuron_moe_speed": neuron_moe_speed,
             "fused_breakdown": fused_breakdown, "train_step_scaling": train_step_scaling}


# benchmarks whose runs on other machines get files of their own (`--result <name>-<machine>`)
PER_MACHINE = ("moe_speed", "fused_breakdown", "train_step_scaling")


def renderers() -> dict:
    """Every result file's table renderer: RENDERERS, plus each other machine's run of a PER_MACHINE benchmark
    (e.g. `moe_speed.py --result moe_speed-<machine>`), rendered like its benchmark into its own README markers."""
    machines = {p.stem: RENDERERS[base] for base in PER_MACHINE for p in sorted(RESULTS.glob(f"{base}-*.json"))}
    return {**RENDERERS, **machines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true")
    args = parser.parse_args()
    readme = (ROOT / "README.md").read_text()
    for name, render in renderers().items():
        data = _load(name)
        if data is None:
            continue
        table = render(data)
        if args.print:
            print(f"## {name}\n{table}\n")
            continue
        pattern = re.compile(rf"(<!-- results:{re.escape(name)} -->\n)(?:.*?\n)?(<!-- /results:{re.escape(name)} -->)",
                             re.S)
        if not pattern.search(readme):
            print(f"README.md has no <!-- results:{name} --> markers: {name}.json not rendered", file=sys.stderr)
        readme = pattern.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), readme)
    if not args.print:
        (ROOT / "README.md").write_text(readme)


if __name__ == "__main__":
    main()
