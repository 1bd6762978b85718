"""Which neurons to keep and which form the shared expert, for each carving method (a registry, not copies)."""

from __future__ import annotations

import torch

from tiny_onn.scan import ScanResult, zscore
from tiny_onn.scan.scores import delta_sc, s_p

METHODS = ("dsc", "random", "actgrad", "coact")


def keep_scores(scan: ScanResult, layer: int, method: str, generator: torch.Generator) -> torch.Tensor:
    """Per-neuron score; the highest `keep` fraction is kept. dsc: S_p; actgrad: a·s (LLaMA-MoE importance);
    coact: activation a alone; random: a random permutation."""
    act, grad = scan.stat(layer, "act"), scan.stat(layer, "grad")
    if method == "dsc":
        return scan.stat(layer, "s_p")
    if method == "actgrad":
        return act * grad
    if method == "coact":
        return act
    if method == "random":
        return torch.rand(act.shape, generator=generator)
    raise ValueError(method)


SHARED_SCORES = ("importance", "s_p")


def shared_scores(
    scan: ScanResult, layer: int, method: str, generator: torch.Generator, dsc_shared: str = "importance"
) -> torch.Tensor:
    """Per-neuron score for the always-on shared expert.

    dsc: the neuron's *worst* score over the data categories, so only neurons strong in every category qualify (a
    generalist). The score is `dsc_shared`: "importance" = z-scored a·s per category (default), or "s_p" = the seed's
    per-category S_p. S_p rewards a low gradient (its z(1/s) term), so its generalists are the neurons the loss depends
    on least; benchmarks/carve_quality.py measures both. actgrad: a·s; coact: firing frequency f; random: random.
    """
    if method == "dsc":
        cats = scan.categories
        if dsc_shared not in SHARED_SCORES:
            raise ValueError(dsc_shared)
        if not cats:
            act, grad = scan.stat(layer, "act"), scan.stat(layer, "grad")
            return scan.stat(layer, "s_p") if dsc_shared == "s_p" else act * grad
        if dsc_shared == "s_p":
            w = tuple(scan.meta["score_weights"][k] for k in ("act", "inv_grad", "freq"))
            per_cat = torch.stack([
                s_p(scan.stat(layer, "act", c), scan.stat(layer, "grad", c), scan.stat(layer, "freq", c), w)
                for c in cats
            ])  # [C, N]
        else:
            per_cat = torch.stack([
                zscore(scan.stat(layer, "act", c) * scan.stat(layer, "grad", c)) for c in cats
            ])  # [C, N]
        return per_cat.min(dim=0).values
    if method == "actgrad":
        return scan.stat(layer, "act") * scan.stat(layer, "grad")
    if method == "coact":
        return scan.stat(layer, "freq")
    if method == "random":
        return torch.rand(scan.stat(layer, "act").shape, generator=generator)
    raise ValueError(method)


def category_delta_sc(scan: ScanResult, layer: int) -> torch.Tensor:
    """[N, C] ΔSC within each data category, z(a_c) − z(s_c) across the layer's neurons: in which categories a neuron is
    highly active while the loss barely depends on it (high) or rarely active but relied on (low)."""
    if not scan.categories:
        return torch.zeros(scan.stat(layer, "act").numel(), 0)
    return torch.stack(
        [delta_sc(scan.stat(layer, "act", c), scan.stat(layer, "grad", c)) for c in scan.categories], dim=1
    )


def category_profile(scan: ScanResult, layer: int) -> torch.Tensor:
    """[N, C] z-scored activation per category (what each neuron responds to), an extra clustering feature for dsc."""
    if not scan.categories:
        return torch.zeros(scan.stat(layer, "act").numel(), 0)
    acts = torch.stack([scan.stat(layer, "act", c) for c in scan.categories], dim=1)  # [N, C]
    share = acts / acts.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return zscore(share.T).T
