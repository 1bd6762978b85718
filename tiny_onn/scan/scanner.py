"""The neuron scanner: hooks on every FFN's down_proj input h, running sums, one forward + one backward per batch.

Legend: B batch, T sequence positions, S counted tokens, N FFN neurons of a layer, K = 1 + number of categories (row 0 = all tokens),
R fingerprint reservoir tokens.

Surprise s is taken from activation gradients ∂L/∂h (a tensor hook on h), so it works with frozen or 4-bit weights.
L is the *summed* cross-entropy of the scored tokens, so ∂L/∂h_t is each token's own gradient, independent of batch size
and of how batches are split across ranks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from tiny_onn import distributed
from tiny_onn.artifacts import atomic_dir, check_replaceable, versions, write_json
from tiny_onn.config import config_to_dict
from tiny_onn.data import DataArgs, PackedData, build_dataset, scored_positions
from tiny_onn.errors import TinyOnnError
from tiny_onn.scan.scores import delta_sc, s_p
from tiny_onn.sources import SourceArgs, load_source, swiglu_mlps
from tiny_onn.sources.loading import absolute_model_path, warn_if_beyond_positions

log = logging.getLogger(__name__)
POSITIONS = ("scored", "all")


@dataclass
class ScanConfig(SourceArgs, DataArgs):
    """Scan a dense source on instruction data and write per-neuron statistics."""

    tokens: int = 20000
    """How many tokens of the training split to scan (fewer if the data runs out)."""
    batch_size: int = 8
    """Sequences per forward/backward pass."""
    positions: str = "scored"
    """Which tokens the statistics average over: 'scored' (positions whose next token is a response token, i.e. the loss mask) or 'all' (every non-padding token)."""
    fingerprint_tokens: int = 256
    """Size of the calibration reservoir whose per-token h forms each neuron's activation fingerprint."""
    w_act: float = 1.0
    """S_p weight of z(activation)."""
    w_inv_grad: float = 1.0
    """S_p weight of z(1/surprise)."""
    w_freq: float = 1.0
    """S_p weight of z(frequency)."""
    out: str = "runs/demo/scan"
    """Output folder (written atomically)."""

    def __post_init__(self) -> None:
        SourceArgs.__post_init__(self)
        DataArgs.__post_init__(self)
        if self.tokens < 1:
            raise TinyOnnError(f"tokens must be positive, got {self.tokens}")
        if self.batch_size < 1:
            raise TinyOnnError(f"batch_size must be positive, got {self.batch_size}")
        if self.positions not in POSITIONS:
            raise TinyOnnError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.fingerprint_tokens < 1:
            raise TinyOnnError(f"fingerprint_tokens must be positive, got {self.fingerprint_tokens}")
        weights = {"--w-act": self.w_act, "--w-inv-grad": self.w_inv_grad, "--w-freq": self.w_freq}
        if not all(math.isfinite(w) for w in weights.values()) or not any(weights.values()):
            raise TinyOnnError(f"the S_p weights must be finite numbers, not all 0 (S_p would be 0 for every neuron and "
                               f"selection by it arbitrary), got {', '.join(f'{k} {v}' for k, v in weights.items())}")


class LayerStats:
    """Running float64 sums for one layer's N neurons, for all tokens (row 0) and each category (rows 1..)."""

    def __init__(self, num_neurons: int, num_rows: int, device: torch.device):
        self.act = torch.zeros(num_rows, num_neurons, dtype=torch.float64, device=device)  # [K, N]
        self.grad = torch.zeros_like(self.act)
        self.freq = torch.zeros_like(self.act)

    @torch.no_grad()
    def add_forward(self, h_SN: torch.Tensor, w_KS: torch.Tensor) -> None:
        a_SN = h_SN.float().abs()
        # sign(|h| - mean) is +1 where a neuron is more active than the layer's mean neuron, -1 below (ties have measure 0);
        # summing it and shifting is cheaper than materialising a float 0/1 mask
        sign_SN = (a_SN - a_SN.mean(dim=-1, keepdim=True)).sign_()
        self.act += w_KS @ a_SN
        self.freq += (w_KS @ sign_SN + w_KS.sum(dim=-1, keepdim=True)) / 2

    @torch.no_grad()
    def add_backward(self, g_SN: torch.Tensor, w_KS: torch.Tensor) -> None:
        self.grad += w_KS @ g_SN.float().abs()

    def tensors(self) -> list[torch.Tensor]:
        return [self.act, self.grad, self.freq]


class NeuronScanner:
    """Hooks every FFN of `model`; between `begin_batch` and the batch's backward it accumulates statistics."""

    def __init__(self, model: PreTrainedModel, num_categories: int):
        self.model = model
        self.mlps = swiglu_mlps(model)
        device = next(model.parameters()).device
        rows = 1 + num_categories
        self.stats = [LayerStats(m.num_neurons, rows, device) for m in self.mlps]
        self.token_counts = torch.zeros(rows, dtype=torch.float64, device=device)  # [K]
        self._counted: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows [S] into B*T, weights [K, S])
        self._fingerprint_index: torch.Tensor | None = None
        self.fingerprints: list[torch.Tensor] = []
        self._handles: list = []
        self.attach()

    def attach(self) -> None:
        """Hook every FFN's down_proj input (done on construction; again after `remove`)."""
        if not self._handles:
            self._handles = [m.down_proj.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.mlps)]

    def _hook(self, layer: int):
        def pre_hook(module, args):
            h = args[0]
            h_TN = h.reshape(-1, h.shape[-1])  # [B*T, N]
            if self._fingerprint_index is not None:
                self.fingerprints.append(h_TN.detach()[self._fingerprint_index].float().T.cpu())  # [N, R]
            if self._counted is None:
                return
            rows_S, w_KS = self._counted
            stats = self.stats[layer]
            stats.add_forward(h_TN.detach().index_select(0, rows_S), w_KS)  # only counted tokens: less work
            if h.requires_grad:
                h.register_hook(lambda g: stats.add_backward(g.reshape(-1, g.shape[-1]).index_select(0, rows_S), w_KS))

        return pre_hook

    def remove(self) -> None:
        """Detach the hooks; the statistics gathered so far are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def collecting(self, rows_S: torch.Tensor, w_KS: torch.Tensor) -> Iterator[None]:
        """Accumulate statistics of the flat token positions `rows_S` for the forward and backward run inside this block."""
        self._counted = (rows_S, w_KS)
        try:
            yield
        finally:
            self._counted = None
        self.token_counts += w_KS.sum(dim=-1).double()

    @torch.no_grad()
    def collect_fingerprints(self, batch: dict[str, torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
        """h of every neuron at the flat token positions `index` of `batch`: one [N, R] tensor per layer."""
        self.fingerprints, self._fingerprint_index = [], index
        try:
            self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        finally:
            self._fingerprint_index = None
        return self.fingerprints


def counted_tokens(batch: dict[str, torch.Tensor], num_categories: int, positions: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat positions [S] the statistics count, and [K, S] 0/1 weights: row 0 all of them, row 1+c category c."""
    labels = batch["labels"]
    if positions == "scored":
        counted_BT = torch.zeros_like(labels, dtype=torch.bool)
        counted_BT[:, :-1] = scored_positions(labels)[1]  # positions that predict a response token
    else:
        counted_BT = batch["attention_mask"].bool()
    rows_S = counted_BT.reshape(-1).nonzero().squeeze(-1)
    cats_S = batch["category"].reshape(-1)[rows_S]
    onehot_CS = cats_S[None, :] == torch.arange(num_categories, device=cats_S.device)[:, None]
    w_KS = torch.cat([torch.ones_like(cats_S, dtype=torch.bool)[None], onehot_CS]).float()  # [K, S]
    return rows_S, w_KS


def summed_response_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Summed next-token CE over response tokens; the LM head runs only on the scored positions. None if there are none."""
    targets_BT, scored_BT = scored_positions(batch["labels"])  # [B, T-1]
    if not scored_BT.any():
        return None
    hidden = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state  # [B, T, d]
    hidden_Sd = hidden[:, :-1][scored_BT]  # [S, d]
    logits_SV = model.get_output_embeddings()(hidden_Sd).float()
    return F.cross_entropy(logits_SV, targets_BT[scored_BT], reduction="sum")


@contextlib.contextmanager
def activation_gradients_only(model: PreTrainedModel) -> Iterator[None]:
    """Freeze every weight but let gradients flow to activations (the embeddings' output requires grad)."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    model.enable_input_require_grads()
    try:
        yield
    finally:
        model.disable_input_require_grads()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def scan_batch(scanner: NeuronScanner, batch: dict[str, torch.Tensor], positions: str = "scored") -> float:
    """One forward and one backward over `batch`, accumulating statistics; returns the summed loss (0 if nothing scored)."""
    rows_S, w_KS = counted_tokens(batch, scanner.token_counts.numel() - 1, positions)
    with scanner.collecting(rows_S, w_KS):
        loss = summed_response_loss(scanner.model, batch)
        if loss is None:
            # nothing to score: no gradient; forward statistics are still wanted for positions='all'
            if positions == "all":
                with torch.no_grad():
                    scanner.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            return 0.0
        loss.backward()
    return float(loss.detach())


def fingerprint_batch(data: PackedData, count: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A fixed calibration reservoir: `count` non-padding tokens spread evenly over sequences spread evenly over the data."""
    num_seq = min(len(data), max(1, math.ceil(4 * count / data.input_ids.shape[1])))
    rows = torch.linspace(0, len(data) - 1, num_seq).round().long().unique()
    batch = {k: getattr(data, k)[rows] for k in ("input_ids", "labels", "attention_mask", "category")}
    real = batch["attention_mask"].reshape(-1).nonzero().squeeze(-1)  # flat positions of real tokens
    pick = torch.linspace(0, real.numel() - 1, min(count, real.numel())).round().long().unique()
    return batch, real[pick]


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# more categories than this: the per-category statistics dominate the scan's memory and time, which the user hears of
MANY_CATEGORIES = 64


def warn_many_categories(data: str, categories: int, neurons: int) -> None:
    """A warning for data with many categories (a per-record id or URL given as 'category'): the scan keeps three
    float64 sums per neuron for every category and multiplies each batch by a [categories, tokens] matrix."""
    gib = 3 * (1 + categories) * neurons * 8 / 2**30
    log.warning("data %r has %d categories: the scan keeps every neuron's statistics per category (%.2f GiB for this "
                "model) and its time grows with their number; if 'category' holds an id per record, give records a "
                "coarser category (or select some with --categories)", data, categories, gib)


def run(cfg: ScanConfig) -> Path:
    """Scan `cfg.model` on `cfg.data` and write `scan.safetensors` + `scan.json` to `cfg.out`."""
    check_replaceable(cfg.out, "scan.json")
    rank, world_size = distributed.init_from_env()
    cfg.device = distributed.local_device(cfg.device)
    source = load_source(cfg)
    model = source.model
    warn_if_beyond_positions(model.config, cfg.seq_len, "--seq-len")
    device = next(model.parameters()).device
    data = build_dataset(source.tokenizer, cfg, split="train", max_tokens=cfg.tokens)
    if data.num_tokens < cfg.tokens and rank == 0:
        log.warning("data %r has only %d tokens in its training split; scanning those", cfg.data, data.num_tokens)
    num_cat = len(data.category_names)
    if num_cat > MANY_CATEGORIES and rank == 0:
        warn_many_categories(cfg.data, num_cat, sum(m.num_neurons for m in swiglu_mlps(model)))
    scanner = NeuronScanner(model, num_cat)
    fp_batch, fp_index = fingerprint_batch(data, cfg.fingerprint_tokens)
    fingerprints = scanner.collect_fingerprints(_to_device(fp_batch, device), fp_index.to(device))

    start = time.perf_counter()
    fed = 0
    bar = tqdm(total=data.num_tokens, unit="tok", desc="scan", disable=rank != 0, dynamic_ncols=True)
    with activation_gradients_only(model):
        for batch in data.batches(cfg.batch_size, rank, world_size):
            n = int(batch["attention_mask"].sum())
            scan_batch(scanner, _to_device(batch, device), cfg.positions)
            fed += n
            bar.update(n * world_size)  # ranks advance in step; show the global rate
    bar.close()
    scanner.remove()
    for stats in scanner.stats:
        for t in stats.tensors():
            distributed.all_reduce_sum(t)
    distributed.all_reduce_sum(scanner.token_counts)
    fed_t = distributed.all_reduce_sum(torch.tensor([fed], dtype=torch.float64, device=device))
    wall = time.perf_counter() - start
    if rank == 0:
        tensors = statistics_tensors(scanner, fingerprints, data.category_names, (cfg.w_act, cfg.w_inv_grad, cfg.w_freq))
        tensors["fingerprint.token_ids"] = fp_batch["input_ids"].reshape(-1)[fp_index].contiguous()
        tensors["fingerprint.category"] = fp_batch["category"].reshape(-1)[fp_index].contiguous()
        counts = scanner.token_counts.tolist()
        meta = {
            "format": "tiny_onn.scan/1",
            "model": cfg.model,
            "model_path": absolute_model_path(cfg.model),
            "origin": source.origin,
            "architecture": source.architecture,
            "weight_sample": source.weight_sample(),
            "layers": len(scanner.mlps),
            "neurons_per_layer": [m.num_neurons for m in scanner.mlps],
            "categories": data.category_names,
            "tokens_fed": int(fed_t.item()),
            "tokens_counted": int(counts[0]),
            "tokens_counted_per_category": {c: int(n) for c, n in zip(data.category_names, counts[1:], strict=True)},
            "positions": cfg.positions,
            "fingerprint_tokens": int(fp_index.numel()),
            "score_weights": {"act": cfg.w_act, "inv_grad": cfg.w_inv_grad, "freq": cfg.w_freq},
            "world_size": world_size,
            "wall_seconds": round(wall, 3),
            "tokens_per_second": round(fed_t.item() / max(wall, 1e-9), 2),
            "config": config_to_dict(cfg),
            "versions": versions(),
        }
        with atomic_dir(cfg.out, "scan.json") as tmp:
            save_file(tensors, tmp / "scan.safetensors", metadata={"format": "tiny_onn.scan/1"})
            write_json(tmp / "scan.json", meta)
    distributed.barrier()
    return Path(cfg.out)


def statistics_tensors(
    scanner: NeuronScanner, fingerprints: list[torch.Tensor], categories: list[str], weights: tuple[float, float, float]
) -> dict[str, torch.Tensor]:
    """Means from the running sums, the scores, and per-category statistics, keyed as in scan.safetensors."""
    counts = scanner.token_counts.clamp_min(1.0)[:, None]  # [K, 1]
    out: dict[str, torch.Tensor] = {}
    for i, stats in enumerate(scanner.stats):
        act, grad, freq = (t / counts for t in stats.tensors())  # [K, N] means
        p = f"layers.{i}."
        out[p + "act"], out[p + "grad"], out[p + "freq"] = act[0].float(), grad[0].float(), freq[0].float()
        out[p + "delta_sc"] = delta_sc(act[0], grad[0])
        out[p + "s_p"] = s_p(act[0], grad[0], freq[0], weights)
        out[p + "fingerprint"] = fingerprints[i].contiguous()
        for c, name in enumerate(categories, start=1):
            q = f"{p}by_category.{name}."
            out[q + "act"], out[q + "grad"], out[q + "freq"] = act[c].float(), grad[c].float(), freq[c].float()
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}
