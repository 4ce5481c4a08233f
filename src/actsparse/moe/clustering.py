"""Balanced k-means: each layer's neurons into E experts of equal size, and the permutation
that makes every expert a contiguous block of rows (gate / up) and columns (down).

Each neuron is described by its co-activation profile (its row of the correlation matrix of
:meth:`~actsparse.measure.coactivation.Coactivation.correlation`, unit length): neurons that
fire on the same tokens have similar profiles. Lloyd iterations with a capacity-constrained
assignment: neurons, most decided first (the largest gap between their best and second-best
centroid), take their most similar centroid that still has room. Deterministic for a seed.
"""
from __future__ import annotations

import numpy as np
import torch

from actsparse.errors import ConfigError


def check_experts(width: int, experts: int, top_k: int | None = None) -> int:
    """The expert size ``width / experts``; refuses a split into unequal experts or a bad top-k."""
    if experts < 1 or width % experts:
        raise ConfigError(f"{width} neurons do not split into {experts} equal experts: choose a number of experts "
                          f"that divides {width} (e.g. {', '.join(str(e) for e in (8, 16, 32) if width % e == 0)})")
    if top_k is not None and not 1 <= top_k <= experts:
        raise ConfigError(f"top_k must be in [1, experts={experts}], got {top_k}")
    return width // experts


def _balanced_assign(sim: np.ndarray, size: int) -> np.ndarray:
    n, experts = sim.shape
    order_pref = np.argsort(-sim, axis=1, kind="stable")
    best2 = np.take_along_axis(sim, order_pref[:, :2], 1) if experts > 1 else np.concatenate(
        [sim, sim - 1.0], axis=1)
    order = np.argsort(-(best2[:, 0] - best2[:, 1]), kind="stable")
    room = np.full(experts, size)
    labels = np.empty(n, dtype=np.int64)
    for i in order:
        for e in order_pref[i]:
            if room[e]:
                room[e] -= 1
                labels[i] = e
                break
    return labels


def balanced_kmeans(features: torch.Tensor, experts: int, *, seed: int = 0, iters: int = 30) -> torch.Tensor:
    """Labels (n,) in [0, experts), every label used exactly ``n / experts`` times, maximising
    the cosine similarity of each row of ``features`` (n, dim) to its cluster's mean."""
    x = features.detach().to(torch.float64).cpu().numpy()
    n = x.shape[0]
    size = check_experts(n, experts)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    # k-means++ seeding on cosine distance
    centres = [x[rng.integers(n)]]
    for _ in range(1, experts):
        d = np.clip(1.0 - np.max(x @ np.stack(centres).T, axis=1), 0.0, None)
        p = d / d.sum() if d.sum() > 0 else np.full(n, 1.0 / n)
        centres.append(x[rng.choice(n, p=p)])
    c = np.stack(centres)
    best, best_score, labels = None, -np.inf, None
    for _ in range(iters):
        sim = x @ c.T
        new = _balanced_assign(sim, size)
        score = float(sim[np.arange(n), new].sum())
        if score > best_score + 1e-12:
            best, best_score = new, score
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        c = np.stack([x[labels == e].mean(0) for e in range(experts)])
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return torch.from_numpy(best)


def expert_permutation(labels: torch.Tensor, experts: int) -> torch.Tensor:
    """The permutation (new position -> old neuron) that puts expert 0's neurons first, then
    expert 1's, ...; within an expert, neurons keep their original order."""
    labels = labels.to(torch.int64)
    counts = torch.bincount(labels, minlength=experts)
    if counts.numel() != experts or bool((counts != counts[0]).any()):
        raise ConfigError(f"expert labels must use each of {experts} experts equally often, got sizes "
                          f"{counts.tolist()}")
    return torch.argsort(labels * labels.numel() + torch.arange(labels.numel()))
