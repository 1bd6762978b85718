"""Carve plots: UMAP of neurons coloured by expert for a few layers, and expert sizes per layer."""

from __future__ import annotations

import contextlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

from tiny_onn.carve.features import neuron_features  # noqa: E402
from tiny_onn.carve.plan import CarvePlan  # noqa: E402
from tiny_onn.scan import ScanResult  # noqa: E402
from tiny_onn.sources import swiglu_mlps  # noqa: E402


def _embed_2d(features: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """2-D coordinates of the neurons: UMAP when there are enough of them, t-SNE for a few, their index below that
    (UMAP's spectral start needs more points than dimensions; layers of a handful of routed neurons exist)."""
    n = features.shape[0]
    if n >= 8:
        # UMAP fails on degenerate inputs (too few distinct points): fall through to t-SNE then
        with contextlib.suppress(ImportError, ValueError, TypeError):
            import umap

            n_neighbors = max(2, min(15, n - 1))
            return umap.UMAP(n_neighbors=n_neighbors, random_state=seed, n_jobs=1).fit_transform(features), "UMAP"
    if n >= 4:
        from sklearn.manifold import TSNE

        return TSNE(random_state=seed, perplexity=max(1.0, min(30.0, (n - 1) / 3)),
                    init="random").fit_transform(features), "t-SNE"
    return np.stack([np.arange(n), np.zeros(n)], axis=1).astype(float), "index"


def write_carve_plots(scan: ScanResult, source: PreTrainedModel, plan: CarvePlan, cfg, folder: Path) -> list[Path]:
    mlps = swiglu_mlps(source)
    picks = sorted({0, len(mlps) // 2, len(mlps) - 1})
    fig, axes = plt.subplots(1, len(picks), figsize=(5 * len(picks), 4.5), squeeze=False)
    method = "dsc" if cfg.method == "random" else cfg.method  # random has no features of its own: show dsc's space
    for ax, layer in zip(axes[0], picks, strict=True):
        lp = plan.layers[layer]
        neurons = lp.experts.reshape(-1)
        labels = np.repeat(np.arange(lp.experts.shape[0]), lp.experts.shape[1])
        feats = neuron_features(scan, mlps[layer], neurons, method, cfg.weight_features, cfg.pca_dims, cfg.seed)
        xy, how = _embed_2d(feats, cfg.seed)
        ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab20", s=4)
        ax.set_title(f"layer {layer}: {lp.experts.shape[0]} experts ({how})")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"neurons coloured by expert, method {cfg.method}")
    fig.tight_layout()
    paths = [folder / "neurons_umap.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    layers = np.arange(len(plan.layers))
    routed = np.array([lp.experts.numel() for lp in plan.layers])
    shared = np.array([lp.shared.numel() for lp in plan.layers])
    ax.bar(layers, shared, label="shared expert")
    ax.bar(layers, routed, bottom=shared, label=f"{plan.num_experts} routed experts × {plan.expert_size}")
    ax.axhline(mlps[0].num_neurons, color="k", lw=0.8, ls="--", label="source FFN width")
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "expert_sizes.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
