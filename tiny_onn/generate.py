"""`tiny-onn generate`: chat with any model folder (dense source or TinyOnn MoE), optionally overriding the MoE routing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiny_onn.errors import TinyOnnError
from tiny_onn.sources import SourceArgs, load_source


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


def run(cfg: GenerateConfig) -> str:
    source = load_source(cfg, dense_only=False)
    conf = source.model.config
    if cfg.top_k or cfg.top_p >= 0:
        if getattr(conf, "model_type", "") != "tiny_onn":
            raise TinyOnnError("--top-k/--top-p set the MoE routing; this model is dense")
        if cfg.top_k:
            if not 1 <= cfg.top_k <= conf.num_experts:
                raise TinyOnnError(f"top_k must be between 1 and the model's {conf.num_experts} experts")
            conf.num_experts_per_tok = cfg.top_k
        if cfg.top_p >= 0:
            conf.router_top_p = cfg.top_p
    tok = source.tokenizer
    chat = [{"role": "user", "content": cfg.prompt}]
    if tok.chat_template:
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    else:
        ids = tok(cfg.prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(next(source.model.parameters()).device)
    with torch.no_grad():
        out = source.model.generate(ids, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


