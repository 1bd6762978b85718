"""Run a GGUF in llama.cpp through llama-cpp-python (the optional extra `gguf`): logits, greedy decoding, perplexity.

Used by the export tests (the exported MoE must compute what the Hugging Face model computes) and by
benchmarks/gguf_speed.py (speed and quality as llama.cpp users see them).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import time
from pathlib import Path

import numpy as np

from tiny_onn.data import IGNORE_INDEX, PackedData
from tiny_onn.errors import TinyOnnError

INSTALL_HINT = "install the optional extra: pip install -e '.[gguf]' (or `make gguf`; builds llama.cpp, minutes)"


def require_llama_cpp():
    """The llama_cpp module, or one clear error saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise TinyOnnError(f"running a GGUF needs llama-cpp-python: {INSTALL_HINT} ({e})") from e
    return llama_cpp


def build_uses_amx() -> bool:
    """Whether this llama.cpp build runs quantised matmuls on Intel AMX tiles (its system info lists AMX_INT8 = 1)."""
    return "AMX_INT8 = 1" in require_llama_cpp().llama_print_system_info().decode(errors="replace")


@contextlib.contextmanager
def _model_params(llama_cpp, **fields):
    """Within the block, llama.cpp's default model parameters carry `fields` (llama_cpp.Llama builds its parameters
    from these defaults and has no argument for them)."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def patched():
        params = defaults()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    llama_cpp.llama_cpp.llama_model_default_params = patched
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def load(path: str | Path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = False,
         f32_kv_cache: bool = False, extra_buffers: bool | None = None):
    """A llama.cpp model + context for `path` (CPU, quiet). `logits_all` keeps every position's logits (perplexity);
    `f32_kv_cache` keeps keys and values in float32 instead of llama.cpp's default f16 (for exactness checks).

    `extra_buffers` lets llama.cpp move quantised weights into its extra CPU buffers (AMX tiles, interleaved repacking:
    llama-cli's default, `--no-repack` turns it off). None means on unless the build uses AMX: its AMX matmul crashes
    with a segmentation fault on some (virtualised) Sapphire Rapids machines, this project's CI among them
    (ggml-org/llama.cpp#20824), at the first evaluation of any Q4/Q8 file."""
    llama_cpp = require_llama_cpp()
    if not Path(path).is_file():
        raise TinyOnnError(f"GGUF file not found: {path}")
    if extra_buffers is None:
        extra_buffers = not build_uses_amx()
    threads = threads or os.cpu_count() or 1
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_kv_cache else {}
    with _model_params(llama_cpp, use_extra_bufts=extra_buffers):
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                               n_threads_batch=threads, logits_all=logits_all, verbose=False, seed=0, **kv)


def last_logits(llm) -> np.ndarray:
    """The logits [V] of the last evaluated position."""
    llama_cpp = require_llama_cpp()
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def all_logits(llm, ids: list[int]) -> np.ndarray:
    """Logits [T, V] at every position of `ids`, from a fresh context (the model must be loaded with logits_all)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of `ids` (argmax of llama.cpp's logits at every step), `new_tokens` long."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(new_tokens):
        out.append(int(last_logits(llm).argmax()))
        llm.eval(out[-1:])
    return out


def perplexity(llm, data: PackedData) -> dict:
    """exp(mean next-token NLL) over response tokens with llama.cpp's logits; the same tokens and labels as
    `tiny_onn.eval.perplexity` scores (padding only ever ends a row, so each row's unpadded prefix is evaluated)."""
    nll_sum, count = 0.0, 0
    for row in range(len(data)):
        n = int(data.attention_mask[row].sum())
        ids = data.input_ids[row, :n].tolist()
        targets = data.labels[row, 1:n].numpy()
        scored = targets != IGNORE_INDEX
        if n < 2 or not scored.any():
            continue
        logits = all_logits(llm, ids)[:-1].astype(np.float64)  # [n-1, V]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll = logz - logits[np.arange(n - 1), np.where(scored, targets, 0)]
        nll_sum += float(nll[scored].sum())
        count += int(scored.sum())
    if not count:
        raise TinyOnnError("no response tokens to score")
    return {"ppl": math.exp(nll_sum / count), "nll": nll_sum / count, "tokens": count}


def speed(llm, prompt_ids: list[int], new_tokens: int) -> dict:
    """Prompt processing and greedy decoding (batch 1) of one fresh sequence, in tokens per second, by the wall clock
    around the calls (the Python between decode calls is an argmax); llama.cpp's own decode timer beside it."""
    llama_cpp = require_llama_cpp()
    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(last_logits(llm).argmax())])
    t2 = time.perf_counter()
    perf = llama_cpp.llama_perf_context(llm.ctx)
    return {"prompt_tok_s": len(prompt_ids) / (t1 - t0), "decode_tok_s": new_tokens / (t2 - t1),
            "llama_timer_decode_tok_s": 1e3 * perf.n_eval / max(perf.t_eval_ms, 1e-9)}


def requantize(src: str | Path, dst: str | Path, quant: str, threads: int | None = None) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize) from one GGUF to another type ('q8_0', 'f16', ...)."""
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.allow_requantize = True
    params.nthread = threads or os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise TinyOnnError(f"llama.cpp could not quantize {src} to {quant}")
    return Path(dst)
