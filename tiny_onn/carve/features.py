"""Neuron features for clustering: co-activation fingerprints, weight rows, category profiles."""

from __future__ import annotations

import numpy as np
import torch

from tiny_onn.carve.cluster import standardized_pca
from tiny_onn.carve.select import category_profile
from tiny_onn.scan import ScanResult
from tiny_onn.sources import SwiGluMlp
from tiny_onn.sources.quantized import dense_weight


def _unit_rows(x: torch.Tensor) -> np.ndarray:
    x = x.double()
    return (x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()


def neuron_features(
    scan: ScanResult, mlp: SwiGluMlp, neurons: torch.Tensor, method: str, weight_share: float, dims: int, seed: int
) -> np.ndarray:
    """[n, F] features of the given neurons.

    dsc / actgrad: PCA of the signed activation fingerprint (which tokens a neuron fires on, and with which sign), PCA of
    the neuron's weights (gate row, up row, down column), and (dsc) its category profile; coact: |h| fingerprint only.
    """
    fp = scan.stat(mlp.layer, "fingerprint")[neurons]  # [n, R]
    if method == "coact":
        return standardized_pca(_unit_rows(fp.abs()), dims, seed)
    blocks = [standardized_pca(_unit_rows(fp), dims, seed)]
    if weight_share > 0:
        with torch.no_grad():
            w = torch.cat(
                [dense_weight(mlp.gate_proj)[neurons], dense_weight(mlp.up_proj)[neurons],
                 dense_weight(mlp.down_proj)[:, neurons].T], dim=1
            ).float().cpu()
        blocks.append(weight_share * standardized_pca(_unit_rows(w), dims, seed))
    if method == "dsc":
        prof = category_profile(scan, mlp.layer)[neurons]
        if prof.shape[1]:
            blocks.append(0.5 * prof.numpy() / max(float(np.sqrt((prof.numpy() ** 2).sum(1).mean())), 1e-12))
    return np.concatenate(blocks, axis=1)
