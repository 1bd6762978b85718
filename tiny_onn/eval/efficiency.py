"""Parameters, analytic FLOPs per token, measured prefill/decode speed and memory."""

from __future__ import annotations

import statistics
import time

import psutil
import torch

from tiny_onn.generate import plain_decoding


def _is_moe(model) -> bool:
    return getattr(model.config, "model_type", "") == "tiny_onn"


def parameter_counts(model, experts_per_token: float | None = None) -> dict:
    """Total parameters, and those used per token: a MoE uses only `experts_per_token` of its routed experts per layer."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    active = total
    if _is_moe(model):
        c = model.config
        k = experts_per_token if experts_per_token is not None else c.num_experts_per_tok
        per_expert = 3 * c.hidden_size * c.moe_intermediate_size
        active = total - c.num_hidden_layers * (c.num_experts - k) * per_expert
        if getattr(c, "router_score", "linear") == "gate":  # its router computes every routed neuron's gate
            active += c.num_hidden_layers * (c.num_experts - k) * c.hidden_size * c.moe_intermediate_size
            # and, with a second stage, the up rows of each token's candidates
            candidates = max(getattr(c, "router_candidates", 0), k)
            active += c.num_hidden_layers * (candidates - k) * c.hidden_size * c.moe_intermediate_size
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    )
    # matmul parameters per token: everything but the embedding lookup (the LM head is a matmul even when tied)
    matmul = active - embed + (embed if tied else 0)
    return {"total": total, "active_per_token": int(active), "matmul_params_per_token": int(matmul)}


def flops_per_token(model, context: int, experts_per_token: float | None = None) -> float:
    """Forward FLOPs per token at `context` tokens: 2 per matmul parameter + causal attention scores and values."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attn = 2 * 2 * c.num_hidden_layers * c.num_attention_heads * head_dim * (context / 2)
    return 2 * parameter_counts(model, experts_per_token)["matmul_params_per_token"] + attn


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def prefill_tokens_per_second(model, input_ids: torch.Tensor, repeats: int = 3) -> float:
    """Forward over a batch of prompts with logits for the last position only (generate's prefill); median of repeats."""
    model(input_ids=input_ids, use_cache=False, logits_to_keep=1)  # warm-up
    times = []
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        _sync()
        times.append(time.perf_counter() - t)
    return input_ids.numel() / statistics.median(times)


@torch.no_grad()
def decode_tokens_per_second(model, prompt: torch.Tensor, new_tokens: int = 32, repeats: int = 3) -> float:
    """Greedy generation with the KV cache, batch 1: new tokens per second (prefill time subtracted); median."""
    def gen(n: int) -> float:
        _sync()
        t = time.perf_counter()
        with plain_decoding(model):
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        _sync()
        return time.perf_counter() - t

    gen(2)
    rates = []
    for _ in range(repeats):
        rates.append((new_tokens - 1) / max(gen(new_tokens) - gen(1), 1e-9))
    return statistics.median(rates)


def memory(model) -> dict:
    """Weight bytes, and the process's resident memory (CPU) or peak allocated memory (CUDA)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"weights_bytes": weights, "process_rss_bytes": psutil.Process().memory_info().rss}
    if torch.cuda.is_available():
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out
