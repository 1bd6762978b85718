"""`tiny-onn generate`: chat with any model folder (dense source or TinyOnn MoE), optionally overriding the MoE routing."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from tiny_onn.data.encoding import prompt_ids
from tiny_onn.errors import TinyOnnError
from tiny_onn.sources import SourceArgs, load_source
from tiny_onn.sources.loading import warn_if_beyond_positions

log = logging.getLogger(__name__)


@dataclass
class GenerateConfig(SourceArgs):
    """Generate a reply from a model folder, a GGUF or 'smollm2'."""

    prompt: str = "What is 12 + 7?"
    """The user message (the model's chat template is applied)."""
    max_new_tokens: int = 64
    """Tokens to generate (greedy)."""
    top_k: int = 0
    """MoE only: experts per token (0 = the model's own setting)."""
    top_p: float = -1.0
    """MoE only: dynamic routing threshold (negative = the model's own setting, 0 = fixed top-k)."""

    def __post_init__(self) -> None:
        SourceArgs.__post_init__(self)
        if self.max_new_tokens < 1:
            raise TinyOnnError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.top_p > 1.0:
            raise TinyOnnError(f"top_p must be in [0, 1] (or negative for the model's own setting), got {self.top_p}")
        if self.top_k < 0:
            raise TinyOnnError(f"top_k must be 0 (the model's own setting) or positive, got {self.top_k}")
        if not self.prompt.strip():
            raise TinyOnnError("the prompt is empty: give the user message with --prompt")


def run(cfg: GenerateConfig) -> str:
    source = load_source(cfg, dense_only=False)
    conf = source.model.config
    if cfg.top_k or cfg.top_p >= 0:
        if getattr(conf, "model_type", "") != "tiny_onn":
            raise TinyOnnError("--top-k/--top-p set the MoE routing; this model is dense")
        if cfg.top_k:
            if not 1 <= cfg.top_k <= conf.num_experts:
                raise TinyOnnError(f"top_k must be between 1 and the model's {conf.num_experts} experts")
            candidates = getattr(conf, "router_candidates", 0)
            if candidates and cfg.top_k > candidates:
                raise TinyOnnError(f"top_k {cfg.top_k} is above the {candidates} candidates this model's two-stage "
                                   "router ranks per token, so the experts beyond them would never run; give at most "
                                   f"{candidates}")
            model_top_p = source.model.moe_blocks()[0].routing.top_p
            if cfg.top_p < 0 and model_top_p > 0:  # top-p decides whenever it is set: --top-k alone means fixed top-k
                log.info("this MoE routes by top-p %g; --top-k %d alone routes by a fixed top-k (add --top-p to keep "
                         "top-p)", model_top_p, cfg.top_k)
            if cfg.top_p > 0:
                log.warning("--top-p %g decides how many experts each token runs, so --top-k %d changes nothing; give "
                            "--top-p 0 to route by a fixed top-k", cfg.top_p, cfg.top_k)
            source.model.set_routing(top_k=cfg.top_k, **({"top_p": 0.0} if cfg.top_p < 0 else {}))
        if cfg.top_p >= 0:
            source.model.set_routing(top_p=cfg.top_p)
    tok = source.tokenizer
    chat = [{"role": "user", "content": cfg.prompt}]
    # the conversation format train, eval and distil-data use (the fallback template for a tokenizer without one)
    ids = torch.tensor([prompt_ids(tok, chat)], device=next(source.model.parameters()).device)
    warn_if_beyond_positions(conf, ids.shape[1] + cfg.max_new_tokens, "the prompt plus --max-new-tokens")
    with torch.no_grad(), plain_decoding(source.model):
        out = source.model.generate(ids, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id, suppress_tokens=rows_without_token(source.model, tok))
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)




@contextmanager
def plain_decoding(model) -> Iterator[None]:
    """Within the block, `model.generate` decodes with only the settings each call gives: the model's own
    generation_config.json (a repetition penalty, an n-gram ban, a sampling default that an instruct model may ship) is
    set aside, so that a dense source and a MoE carved from it are scored by the same decoding, whatever each folder
    holds. Its special token ids are kept."""
    saved = getattr(model, "generation_config", None)
    if saved is None:  # not a transformers model (a stand-in): nothing to set aside
        yield
        return
    model.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id)
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def rows_without_token(model, tokenizer) -> list[int] | None:
    """Output rows past the tokenizer's vocabulary (embeddings padded to a round size, as Qwen's are): ids no text can
    hold, so generation must never pick them (None when there are none)."""
    rows = model.get_output_embeddings().weight.shape[0]
    return list(range(len(tokenizer), rows)) or None


def generate_batched(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    desc: str | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (cut after the first end-of-sequence token), generated in left-padded batches with
    the KV cache. temperature 0 = greedy; otherwise sampling, with the RNG seeded per batch from `seed` so a batch's
    output depends only on its prompts and its index."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    starts = range(0, len(prompts), batch_size)
    for b, start in enumerate(tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None)):
        chunk = [list(p) for p in prompts[start : start + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)  # [B, width], left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {
            "do_sample": False}
        if temperature > 0:
            torch.manual_seed(seed * 1_000_003 + b)
        with plain_decoding(model):
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=eos, suppress_tokens=rows_without_token(model, tokenizer), **sampling)
        for row in gen[:, width:].tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out
