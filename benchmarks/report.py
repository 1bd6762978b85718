"""Render the README's result tables from benchmarks/results/*.json (so every number there comes from a result file).

    python benchmarks/report.py            # rewrite the marked sections of README.md
    python benchmarks/report.py --print    # print them instead

A section is everything between `<!-- results:NAME -->` and `<!-- /results:NAME -->`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

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


def moe_speed(d: dict) -> str:
    b = d["batch"]
    lines = [
        f"SmolLM2-135M fp32 on {d['machine']['cpu_count']} CPU cores ({d['threads']} threads; shared with other jobs, "
        f"so absolute speeds vary and only the side-by-side ratios count), {d['repeats']} interleaved repeats, median "
        f"(`{d['command']}`). Prefill: batch {b['prefill'][0]}×{b['prefill'][1]}, logits for the last position only. "
        f"Decode: batch 1, {b['decode_new_tokens']} greedy tokens with the KV cache. MLP: one FFN block (layer "
        f"{d['mlp_layer']}) on the prefill's input, router and dispatch included. Train step: batch "
        f"{b['train'][0]}×{b['train'][1]}, forward + backward + AdamW over the FFN parameters (what `tiny-onn train` "
        "trains), the MoE's step ÷ the dense model's.",
        "",
        "| layout (25 % of FFN neurons active) | prefill tok/s dense → MoE | prefill speed-up | decode tok/s dense → MoE | "
        "decode speed-up | MoE MLP ÷ dense MLP | train step MoE ÷ dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in d["layouts"].items():
        p, t = r["prefill_tokens_per_second"], r["decode_tokens_per_second"]
        lines.append(f"| {name} | {p['dense']:.0f} → {p['moe']:.0f} | {r['prefill_speedup']:.2f}× | "
                     f"{t['dense']:.1f} → {t['moe']:.1f} | {r['decode_speedup']:.2f}× | {r['mlp_time_ratio']:.3f} | "
                     f"{r['train_step_time_ratio']:.2f} |")
    tg = d["targets"]
    lines += ["", f"Targets: shared + 14×96 decode ≥ {tg['decode_speedup shared+14x96']}×, prefill ≥ "
              f"{tg['prefill_speedup shared+14x96']}×, MLP ratio ≤ {tg['mlp_time_ratio shared+14x96']}; 64×24 prefill ≥ "
              f"{tg['prefill_speedup 64x24']}×, decode ≥ {tg['decode_speedup 64x24']}×; train step E = 128 ÷ E = 16 ≤ "
              f"{tg['train_step E=128 / E=16']}."]
    if d.get("train_step_ratio_e128_over_e16") is not None:
        lines[-1] += f" Measured E = 128 ÷ E = 16: **{d['train_step_ratio_e128_over_e16']:.2f}**."
    lines += ["", "Time of each dispatch path ÷ the dense FFN's (bold: the one `auto` picks; prefill = one block on "
              "2048 tokens, decode = the 30 blocks on one token, training = one block's forward + backward):", "",
              "| layout | stage | " + " | ".join(_PATH_NAMES) + " |", "|---|---|" + "---|" * len(_PATH_NAMES)]
    for name, r in d["layouts"].items():
        for stage, ratios in r["paths_time_ratio_vs_dense"].items():
            best = min(ratios, key=ratios.get)
            cells = [("**" if p == best else "") + f"{ratios[p]:.2f}" + ("**" if p == best else "") if p in ratios
                     else "–" for p in _PATH_NAMES]
            lines.append(f"| {name} | {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_PATH_NAMES = ("dense", "loop", "loop-dense-down", "gather", "padded", "padded-dense-down")


def calibration_speed(d: dict) -> str:
    s, c, r = d["seconds_per_layer_median"], d["cpu_seconds_per_layer_median"], d["ppl_ratio"]
    return "\n".join([
        f"{d['layout']}, {d['calibration_tokens']} calibration tokens, {d['adam_steps']} Adam steps; every layer "
        f"calibrated by both, interleaved, on {d['machine']['cpu_count']} CPU cores shared with other jobs "
        f"(`{d['command']}`). Held-out perplexity on {d['heldout_tokens_scored']} response tokens, dense "
        f"{d['dense_ppl']:.2f}.",
        "",
        "| router calibration | s per layer (median) | CPU s per layer (median) | all layers, s | held-out ppl ÷ dense | "
        "top-k overlap with oracle |",
        "|---|---|---|---|---|---|",
        *[f"| {'before (' + d['baseline'] + ')' if n == 'baseline' else 'now'} | {s[n]:.1f} | {c[n]:.1f} | "
          f"{d['seconds_total'][n]:.0f} | {r[n]:.3f} | {d['top_k_overlap_with_oracle_mean'][n]:.3f} |" for n in s],
        "",
        f"**{d['speedup']:.1f}× faster** in wall-clock time, {d['cpu_speedup']:.1f}× in CPU time (target ≥ 3×). The "
        f"collected FFN inputs take {d['ffn_inputs_bytes'] / 2**30:.2f} GiB here; a Qwen3-4B source in bf16 at the same "
        f"token count would need {d['ffn_inputs_bytes_qwen3_4b_bf16'] / 2**30:.1f} GiB (arithmetic).",
    ])


def carve_quality(d: dict) -> str:
    lines = [
        f"Held-out perplexity (response tokens, {d['heldout_tokens_scored']} scored) of the carved MoE ÷ the dense "
        f"source ({d['dense']['ppl']:.2f}), **no training**; routers calibrated on {d['calibration']['tokens']} tokens "
        f"({d['calibration']['adam_steps']} Adam steps after least squares); scan of {d['scan_tokens']} tokens "
        f"(`{d['command']}`). Oracle = the router replaced by each token's true expert gains.",
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
    order = ["dsc", "dsc, seed S_p shared", "actgrad", "coact", "random"]
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


def eval_suite(d: dict) -> str:
    return f"`{d['command']}` ({d['mc_task']}; HumanEval: first {d['humaneval_problems']} problems):\n\n" + d["table_markdown"]


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


RENDERERS = {"scan_overhead": scan_overhead, "moe_speed": moe_speed, "calibration_speed": calibration_speed,
             "carve_quality": carve_quality, "score_validity": score_validity, "train_policies": train_policies,
             "eval_suite": eval_suite, "interpret_nmi": interpret_nmi}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true")
    args = parser.parse_args()
    readme = (ROOT / "README.md").read_text()
    for name, render in RENDERERS.items():
        data = _load(name)
        if data is None:
            continue
        table = render(data)
        if args.print:
            print(f"## {name}\n{table}\n")
            continue
        pattern = re.compile(rf"(<!-- results:{name} -->\n)(?:.*?\n)?(<!-- /results:{name} -->)", re.S)
        readme = pattern.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), readme)
    if not args.print:
        (ROOT / "README.md").write_text(readme)


if __name__ == "__main__":
    main()
