"""Expert profiles: how often each expert is chosen per category, its routing weight, the tokens it prefers (log-odds
against the layer's base rate), an automatic label, example snippets, and the specialisation (NMI) of each layer.

Legend: L layers, E experts, C categories, V vocabulary, N tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score

from tiny_onn.data import PackedData


@dataclass
class RoutingRecord:
    """Per layer: expert selection counts per category [L, E, C], routing-probability sums [L, E, C], token counts
    [C], token-by-expert counts [L, E, W] over the W distinct token ids seen (`vocab` [W], ascending; not the whole
    vocabulary, so that thousands of fine-grained experts fit in memory), each token's top-1 expert [L, N], and the
    strongest activations per expert."""

    selected: torch.Tensor
    prob_sum: torch.Tensor
    tokens_per_category: torch.Tensor
    token_expert: torch.Tensor
    vocab: torch.Tensor
    top1: torch.Tensor
    categories_of_tokens: torch.Tensor
    best: list[list[list[tuple[float, int]]]]  # [layer][expert] -> (prob, flat token index), strongest first
    token_ids: torch.Tensor  # [N] the tokens seen, flat
    categories: list[str]


@torch.no_grad()
def record_routing(model, data: PackedData, batch_size: int = 4, max_tokens: int | None = None,
                   keep_best: int = 5) -> RoutingRecord:
    """Run the MoE over `data` (non-padding tokens only) and record how it routes: the first `max_tokens` of them
    (the model reads whole batches; tokens past the budget are left out of the record)."""
    device = next(model.parameters()).device
    c = model.config
    L, E, C = c.num_hidden_layers, c.num_experts, len(data.category_names)
    selected = torch.zeros(L, E, C)
    prob_sum = torch.zeros(L, E, C)
    selections: list[list[torch.Tensor]] = [[] for _ in range(L)]  # per layer, per batch: [N, E] bool
    tokens_per_cat = torch.zeros(C)
    top1, cats_all, ids_all = [], [], []
    best: list[list[list[tuple[float, int]]]] = [[[] for _ in range(E)] for _ in range(L)]
    seen = 0
    for batch in data.batches(batch_size):
        mask = batch["attention_mask"].reshape(-1).bool()
        if max_tokens is not None:
            mask &= mask.cumsum(0) <= max_tokens - seen  # only the budget's first tokens are recorded
        ids = batch["input_ids"].reshape(-1)[mask]
        cats = batch["category"].reshape(-1)[mask]
        out = model.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                          use_cache=False)
        onehot_NC = torch.nn.functional.one_hot(cats, C).float()  # [N, C]
        tokens_per_cat += onehot_NC.sum(0)
        layer_top1 = []
        for li, (logp, sel) in enumerate(zip(out.router_logits, out.expert_selections, strict=True)):
            sel_NE = sel[mask.to(sel.device)].float().cpu()
            p_NE = logp[mask.to(logp.device)].exp().float().cpu()
            selected[li] += sel_NE.T @ onehot_NC
            prob_sum[li] += p_NE.T @ onehot_NC
            selections[li].append(sel_NE.bool())
            layer_top1.append(p_NE.argmax(-1))
            top_p, top_i = p_NE.topk(min(keep_best, p_NE.shape[0]), dim=0)  # strongest tokens per expert
            for e in range(E):
                cand = best[li][e] + [(float(p), seen + int(i)) for p, i in zip(top_p[:, e], top_i[:, e], strict=True)]
                best[li][e] = sorted(cand, reverse=True)[:keep_best]
        top1.append(torch.stack(layer_top1))
        cats_all.append(cats)
        ids_all.append(ids)
        seen += int(mask.sum())
        if max_tokens is not None and seen >= max_tokens:
            break
    token_ids = torch.cat(ids_all)
    vocab, compact_N = torch.unique(token_ids, return_inverse=True)  # [W], [N]
    onehot_NW = torch.nn.functional.one_hot(compact_N, vocab.numel()).float()
    token_expert = torch.stack([torch.cat(sel).float().T @ onehot_NW for sel in selections])  # [L, E, W]
    return RoutingRecord(selected, prob_sum, tokens_per_cat, token_expert, vocab, torch.cat(top1, dim=1),
                         torch.cat(cats_all), best, token_ids, list(data.category_names))


def selection_rate(rec: RoutingRecord) -> torch.Tensor:
    """[L, E, C]: the fraction of a category's tokens routed to each expert."""
    return rec.selected / rec.tokens_per_category.clamp_min(1)[None, None, :]


def mean_routing_weight(rec: RoutingRecord) -> torch.Tensor:
    """[L, E, C]: mean router probability of each expert on a category's tokens."""
    return rec.prob_sum / rec.tokens_per_category.clamp_min(1)[None, None, :]


def token_log_odds(rec: RoutingRecord, layer: int, expert: int, top: int = 10, min_count: int = 3,
                   alpha: float = 0.5) -> list[tuple[int, float, int]]:
    """Tokens most over-represented among those routed to `expert`, vs the layer's base rate: (token id, log-odds, count)."""
    n_we = rec.token_expert[layer, expert]  # [W] times token vocab[w] went to e
    n_w = torch.bincount(torch.searchsorted(rec.vocab, rec.token_ids), minlength=n_we.numel()).float()  # [W] seen
    routed, total = float(n_we.sum()), float(n_w.sum())
    lo = torch.log((n_we + alpha) / (routed - n_we + alpha)) - torch.log((n_w + alpha) / (total - n_w + alpha))
    lo[n_we < min_count] = -math.inf
    vals, idx = lo.topk(min(top, int((lo > -math.inf).sum())))
    return [(int(rec.vocab[i]), float(v), int(n_we[i])) for v, i in zip(vals, idx, strict=True)]


NEVER_SELECTED = "(never selected)"


def auto_label(rec: RoutingRecord, layer: int, expert: int, decode) -> dict:
    """Dominant category (by selection rate relative to the layer's average expert), top tokens, and a specificity in
    [0, 1]: 1 − normalised entropy of the expert's category distribution (0 = uniform, 1 = one category only). An
    expert no token selected has no distribution: specificity 0, dominant category and label `NEVER_SELECTED`."""
    rate_C = selection_rate(rec)[layer, expert]  # [C]
    C = rate_C.numel()
    if not C or float(rate_C.sum()) <= 0:
        return {"label": NEVER_SELECTED, "dominant_category": NEVER_SELECTED, "specificity": 0.0,
                "category_share": [0.0] * C}
    share = rate_C / rate_C.sum()
    entropy = float(-(share * share.clamp_min(1e-12).log()).sum())
    specificity = min(1.0, max(0.0, 1.0 - entropy / math.log(C))) if C > 1 else 0.0  # rounding can leave [0, 1]
    dominant = rec.categories[int(share.argmax())] if C else "?"
    tokens = [decode(t).strip() or repr(decode(t)) for t, _, _ in token_log_odds(rec, layer, expert, top=3)]
    label = f"{dominant}: " + ", ".join(tokens) if tokens else dominant
    return {"label": label, "dominant_category": dominant, "specificity": specificity,
            "category_share": share.tolist()}


def layer_nmi(rec: RoutingRecord) -> list[float | None]:
    """Normalised mutual information between each token's top-1 expert and its category, per layer; None for every
    layer when the tokens come from fewer than two categories (there is no category information to share)."""
    cats = rec.categories_of_tokens.numpy()
    if len(np.unique(cats)) < 2:
        return [None] * rec.top1.shape[0]
    return [float(normalized_mutual_info_score(cats, rec.top1[li].numpy())) for li in range(rec.top1.shape[0])]


def snippets(rec: RoutingRecord, layer: int, expert: int, decode_ids, width: int = 8) -> list[dict]:
    """Text around the tokens on which the expert's routing probability was highest: `left`, `token` and `right`, and
    `text`, the three joined with the token in [[ ]] (for reading the JSON; the page marks the token from the parts,
    so text that holds "[[" itself is not mistaken for the mark)."""
    out = []
    for prob, idx in rec.best[layer][expert]:
        left = decode_ids(rec.token_ids[max(0, idx - width) : idx].tolist())
        right = decode_ids(rec.token_ids[idx + 1 : idx + 1 + width // 2].tolist())
        token = decode_ids(rec.token_ids[idx : idx + 1].tolist())
        out.append({"prob": prob, "left": left, "token": token, "right": right,
                    "text": left + "[[" + token + "]]" + right})
    return out
