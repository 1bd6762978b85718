"""The carved MoE in llama.cpp vs the dense GGUF users already have: prompt and decode speed, file size, perplexity.

    python benchmarks/gguf_speed.py                 # needs the `gguf` extra (make gguf) and benchmarks/gguf_weighting.py's model
    python benchmarks/gguf_speed.py --repeats 3 --threads 2

Dense: the bundled SmolLM2-135M-Instruct Q4_1 GGUF as shipped, and llama.cpp's own requantisation of it to Q8_0 and F16
(their weights are the Q4_1 values, so only their speed is new). MoE: the 25 %-active model trained with the exportable
weighting (runs/bench/gguf/train-probs/model), exported by `tiny-onn export` at Q4_1, Q8_0 and F16. Every file runs in
the same llama.cpp build with the same threads; prompt processing (128 tokens) and greedy decoding (batch 1, 128 tokens)
are timed by the wall clock around llama.cpp's calls, each file once per round, rounds interleaved, median. Perplexity is computed from
llama.cpp's logits on the held-out response tokens (quantisation loss included). HF eager fp32 rows of the same two
models are for reference. Writes benchmarks/results/gguf_speed.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402
from gguf_weighting import trained_folder  # noqa: E402

from tiny_onn.data import DataArgs, build_dataset  # noqa: E402
from tiny_onn.eval import perplexity  # noqa: E402
from tiny_onn.eval.efficiency import decode_tokens_per_second, prefill_tokens_per_second  # noqa: E402
from tiny_onn.export import export_gguf, llamacpp  # noqa: E402
from tiny_onn.sources import SourceArgs, load_source  # noqa: E402
from tiny_onn.sources.loading import smollm2_gguf_path  # noqa: E402

WORK = Path("runs/bench/gguf/files")


@contextlib.contextmanager
def quiet(log: Path):
    """llama.cpp's quantizer prints every tensor from C: send file descriptors 1 and 2 to a log while it runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with log.open("a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            for fd, old in zip((1, 2), saved, strict=True):
                os.dup2(old, fd)
                os.close(old)


def make_files(moe: Path, quants: list[str]) -> dict[str, Path]:
    """name -> GGUF path: dense as shipped and requantised by llama.cpp, MoE exported by tiny-onn."""
    WORK.mkdir(parents=True, exist_ok=True)
    files = {"dense q4_1 (shipped)": smollm2_gguf_path()}
    for q in quants:
        if q != "q4_1":
            path = WORK / f"dense-{q}.gguf"
            if not path.is_file():
                with quiet(WORK / "quantize.log"):
                    llamacpp.requantize(smollm2_gguf_path(), path, q)
            files[f"dense {q}"] = path
    for q in quants:
        path = WORK / f"moe-{q}.gguf"
        export_gguf(moe, path, q)  # always re-exported: the model folder may have been retrained
        files[f"moe {q}"] = path
    return files


def prompt_ids(tokenizer, n: int) -> list[int]:
    """A real chat prompt, its tokens repeated to exactly n."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Explain why the sky is blue, then list three "
                                           "everyday examples of light scattering and how to observe them."}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return (ids * (n // len(ids) + 1))[:n]


def llama_cpp_rows(files: dict[str, Path], ids: list[int], new_tokens: int, repeats: int, threads: int, held) -> dict:
    models = {name: llamacpp.load(path, n_ctx=len(ids) + new_tokens + 8, threads=threads) for name, path in files.items()}
    runs: dict[str, list[dict]] = {name: [] for name in files}
    for llm in models.values():  # warm-up
        llamacpp.speed(llm, ids[:16], 4)
    for r in range(repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            runs[name].append(llamacpp.speed(models[name], ids, new_tokens))
        print(f"round {r + 1}/{repeats}: " + ", ".join(f"{n} {runs[n][-1]['decode_tok_s']:.0f}" for n in files), flush=True)
    rows = {}
    for name, llm in models.items():
        llm.close()
        ppl_llm = llamacpp.load(files[name], n_ctx=held.input_ids.shape[1], threads=threads, logits_all=True)
        t = time.perf_counter()
        ppl = llamacpp.perplexity(ppl_llm, held)
        ppl_llm.close()
        rows[name] = {
            "runtime": "llama.cpp", "file": str(files[name]), "file_mib": files[name].stat().st_size / 2**20,
            **{k: statistics.median(x[k] for x in runs[name]) for k in runs[name][0]},
            "decode_tok_s_runs": [x["decode_tok_s"] for x in runs[name]],
            "heldout_ppl": ppl["ppl"], "ppl_tokens": ppl["tokens"], "ppl_seconds": time.perf_counter() - t,
        }
    return rows


def hf_rows(moe: Path, ids: list[int], new_tokens: int, held) -> dict:
    rows = {}
    for name, spec in (("dense fp32 (HF eager)", "smollm2"), ("moe fp32 (HF eager)", str(moe))):
        model = load_source(SourceArgs(model=spec, device="cpu"), dense_only=False).model
        prompt = torch.tensor([ids])
        rows[name] = {"runtime": "transformers eager fp32",
                      "prompt_tok_s": prefill_tokens_per_second(model, prompt, repeats=3),
                      "decode_tok_s": decode_tokens_per_second(model, prompt, new_tokens=new_tokens, repeats=3),
                      "heldout_ppl": perplexity(model, held)["ppl"]}
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe", default=str(trained_folder("probs")), help="the exportable MoE folder")
    parser.add_argument("--quants", nargs="+", default=["q4_1", "q8_0", "f16"])
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp and torch threads (1: steadier on a shared CPU)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--no-hf", action="store_true", help="skip the HF eager reference rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    moe = Path(args.moe)
    source = load_source(SourceArgs(model="smollm2", device="cpu"))
    held = build_dataset(source.tokenizer, DataArgs(seq_len=256), "heldout", max_tokens=args.eval_tokens)
    ids = prompt_ids(source.tokenizer, args.prompt_tokens)
    del source
    rows = llama_cpp_rows(make_files(moe, args.quants), ids, args.new_tokens, args.repeats, args.threads, held)
    if not args.no_hf:
        rows.update(hf_rows(moe, ids, args.new_tokens, held))
    speedups = {}
    for q in args.quants:
        dense = rows["dense q4_1 (shipped)" if q == "q4_1" else f"dense {q}"]
        m = rows[f"moe {q}"]
        speedups[q] = {"decode": m["decode_tok_s"] / dense["decode_tok_s"],
                       "prompt": m["prompt_tok_s"] / dense["prompt_tok_s"],
                       "ppl_ratio": m["heldout_ppl"] / dense["heldout_ppl"]}
        print(f"{q}: MoE decode {speedups[q]['decode']:.2f}x dense, prompt {speedups[q]['prompt']:.2f}x, "
              f"perplexity {speedups[q]['ppl_ratio']:.2f}x", flush=True)
    import llama_cpp

    write_result("gguf_speed", {
        "models": {"dense": "SmolLM2-135M-Instruct (bundled Q4_1 GGUF; q8_0/f16 requantised from it by llama.cpp)",
                   "moe": f"{moe}: shared 12.5% + 14 experts of 96, top-2 (25% of FFN neurons active), "
                          "expert_weighting=probs, exported by tiny-onn export (llama.cpp architecture deepseek)"},
        "llama_cpp_python": llama_cpp.__version__, "llama_cpp_system": llama_cpp.llama_print_system_info().decode(),
        "llama_cpp_extra_buffers": not llamacpp.build_uses_amx(),  # what llamacpp.load chose (off on AMX builds)
        "threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "eval_tokens": args.eval_tokens,
        "rows": rows, "moe_vs_dense_same_quant": speedups, "target_decode_speedup": 1.5,
        "note": "the machine's 2 cores were shared with other jobs: speeds are medians of interleaved rounds, compare "
                "ratios within this file",
    })


if __name__ == "__main__":
    main()
