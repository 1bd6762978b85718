"""Balanced clustering: neurons into equal-size experts, experts into equal-size groups."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA


def standardized_pca(x: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """PCA to at most `dims` components, scaled so the block has unit total variance (blocks then weigh alike)."""
    x = x - x.mean(axis=0, keepdims=True)
    dims = max(1, min(dims, x.shape[0] - 1, x.shape[1]))
    z = PCA(n_components=dims, random_state=seed).fit_transform(x) if x.shape[1] > dims else x
    return z / max(float(np.sqrt((z**2).sum(axis=1).mean())), 1e-12)


def balanced_assignment(dist: np.ndarray, capacity: int) -> np.ndarray:
    """Assign each row to a column, at most `capacity` rows per column, greedily by smallest distance first."""
    n, k = dist.shape
    assert n <= capacity * k
    order = np.argsort(dist, axis=None, kind="stable")
    labels = np.full(n, -1)
    load = np.zeros(k, dtype=int)
    done = 0
    for flat in order:
        i, j = divmod(int(flat), k)
        if labels[i] < 0 and load[j] < capacity:
            labels[i] = j
            load[j] += 1
            done += 1
            if done == n:
                break
    return labels


def balanced_kmeans(features: np.ndarray, k: int, seed: int, iters: int = 10) -> np.ndarray:
    """k clusters of exactly len(features) / k members: k-means initialisation, then balanced reassignment rounds."""
    n = features.shape[0]
    assert n % k == 0, "balanced clusters need n divisible by k"
    if k == 1:
        return np.zeros(n, dtype=int)
    if k == n:  # one member each: nothing to cluster
        return np.arange(n)
    centers = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(features).cluster_centers_
    labels = np.zeros(n, dtype=int)
    for _ in range(iters):
        dist = ((features[:, None, :] - centers[None, :, :]) ** 2).sum(-1)  # [n, k]
        new = balanced_assignment(dist, n // k)
        if np.array_equal(new, labels):
            break
        labels = new
        centers = np.stack([features[labels == c].mean(axis=0) for c in range(k)])
    return labels


def random_split(n: int, k: int, generator: torch.Generator) -> np.ndarray:
    """The baseline every carving must beat: a random equal split."""
    return (torch.randperm(n, generator=generator) % k).numpy()
