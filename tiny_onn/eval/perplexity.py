"""Held-out perplexity on response tokens, overall and per data category."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from tiny_onn.data import PackedData, scored_positions


@torch.no_grad()
def perplexity(model: PreTrainedModel, data: PackedData, batch_size: int = 8) -> dict:
    """exp(mean next-token NLL) over response tokens; also per category. Returns {'ppl', 'nll', 'tokens', 'by_category'}."""
    device = next(model.parameters()).device
    model.eval()
    C = len(data.category_names)
    nll_sum = torch.zeros(C + 1, dtype=torch.float64)
    count = torch.zeros(C + 1, dtype=torch.float64)
    for batch in data.batches(batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        targets, scored = scored_positions(batch["labels"])  # [B, T-1]
        nll = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="none").double().cpu()
        cats = batch["category"][:, 1:][scored].cpu()
        nll_sum[0] += nll.sum()
        count[0] += nll.numel()
        for c in range(C):
            nll_sum[c + 1] += nll[cats == c].sum()
            count[c + 1] += int((cats == c).sum())

    def ppl(i: int) -> float:
        return math.exp(nll_sum[i] / count[i]) if count[i] else float("nan")

    return {
        "ppl": ppl(0),
        "nll": float(nll_sum[0] / count[0].clamp_min(1)),
        "tokens": int(count[0]),
        "by_category": {name: ppl(c + 1) for c, name in enumerate(data.category_names)},
    }
