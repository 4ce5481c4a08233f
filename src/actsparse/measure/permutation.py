"""Contrast statistics between two groups of prompts and their permutation test (pure math).

Input: ``values``, one row per prompt and one column per unit (a neuron or an expert), e.g.
each prompt's mean |activation| of every neuron, and ``in_a``, which prompts belong to set A.
The prompt is the unit of the test: labels are shuffled between whole prompts, never tokens
(tokens of one prompt are not independent).

Statistics (``kind``):

* ``"difference"``: mean over A prompts minus mean over B prompts (fTRI's firing-rate
  difference when the values are firing rates);
* ``"standardized"``: that difference over the pooled prompt-level standard deviation,
  ``(mean_A - mean_B) / sqrt((var_A + var_B) / 2)`` (Cohen's d, ``var`` with ddof 1). A unit
  with no spread in either group gets 0 when the means agree and +-inf when they differ.

Two-sided p-values: the fraction of label assignments whose ``|T|`` reaches the observed one
(within a relative 1e-9, so that assignments equal in exact arithmetic count as ties). With at
most ``permutations`` distinct assignments, all of them are enumerated (an exact test, the
observed one included); otherwise ``permutations`` random shuffles give
``(1 + hits) / (1 + permutations)``.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

KINDS = ("difference", "standardized")
TIE_RTOL = 1e-9
_CHUNK_BYTES = 64 << 20


def _statistic(sum_a, sq_a, n_a, total, total_sq, n, kind):
    """The statistic of every assignment row from A's sums (rows: assignments, cols: units)."""
    n_b = n - n_a
    mean_a = sum_a / n_a
    mean_b = (total - sum_a) / n_b
    diff = mean_a - mean_b
    if kind == "difference":
        return diff
    var_a = np.maximum(sq_a - n_a * mean_a ** 2, 0.0) / (n_a - 1)
    var_b = np.maximum((total_sq - sq_a) - n_b * mean_b ** 2, 0.0) / (n_b - 1)
    sd = np.sqrt((var_a + var_b) / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = diff / sd
    # no spread at all: equal means are no difference, unequal ones a perfect separation
    flat = sd <= 1e-7 * np.maximum(np.abs(mean_a) + np.abs(mean_b), 1e-300)
    return np.where(flat, np.where(np.abs(diff) <= 1e-7 * (np.abs(mean_a) + np.abs(mean_b)), 0.0,
                                   np.copysign(np.inf, diff)), d)


def statistic(values: np.ndarray, in_a: np.ndarray, kind: str = "standardized") -> np.ndarray:
    """The contrast statistic of every unit (column of ``values``) for the labels ``in_a``."""
    return _assignments_statistic(np.asarray(values, np.float64), np.asarray(in_a, bool)[None, :], kind)[0]


def _assignments_statistic(x: np.ndarray, labels: np.ndarray, kind: str) -> np.ndarray:
    n = x.shape[0]
    n_a = int(labels[0].sum())
    lab = labels.astype(np.float64)
    return _statistic(lab @ x, lab @ (x * x), n_a, x.sum(0), (x * x).sum(0), n, kind)


def _check(values: np.ndarray, in_a: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind not in KINDS:
        raise ValueError(f"contrast statistic must be one of {', '.join(KINDS)}, got {kind!r}")
    x = np.asarray(values, np.float64)
    lab = np.asarray(in_a, bool)
    if x.ndim != 2 or lab.shape != (x.shape[0],):
        raise ValueError(f"values must be (prompts, units) and in_a (prompts,), got {x.shape} and {lab.shape}")
    n_a, n_b = int(lab.sum()), int((~lab).sum())
    least = 2 if kind == "standardized" else 1
    if n_a < least or n_b < least:
        raise ValueError(f"the {kind!r} statistic needs at least {least} prompts in each set, got {n_a} and {n_b}")
    if not np.isfinite(x).all():
        raise ValueError("values hold NaN or inf")
    return x, lab


def assignment_count(n: int, n_a: int) -> int:
    """How many distinct ways ``n_a`` of ``n`` prompts can be labelled A."""
    return math.comb(n, n_a)


def permutation_test(values: np.ndarray, in_a: np.ndarray, *, kind: str = "standardized",
                     permutations: int = 1000, seed: int = 0) -> dict:
    """The statistic of every unit and its two-sided permutation p-value.

    Returns ``{"statistic", "p", "exact", "assignments"}``: ``exact`` is True when every
    assignment was enumerated (``assignments`` of them, the observed one included)."""
    x, lab = _check(values, in_a, kind)
    n, n_a = x.shape[0], int(lab.sum())
    observed = _assignments_statistic(x, lab[None, :], kind)[0]
    target = np.abs(observed) * (1 - TIE_RTOL)
    total = assignment_count(n, n_a)
    exact = total <= permutations
    chunk = max(1, _CHUNK_BYTES // (8 * max(x.shape[1], 1)))
    hits = np.zeros(x.shape[1], np.int64)
    if exact:
        combos = itertools.combinations(range(n), n_a)
        done = 0
        while done < total:
            block = list(itertools.islice(combos, chunk))
            labels = np.zeros((len(block), n), bool)
            labels[np.repeat(np.arange(len(block)), n_a), np.asarray(block).reshape(-1)] = True
            hits += (np.abs(_assignments_statistic(x, labels, kind)) >= target).sum(0)
            done += len(block)
        p = hits / total
    else:
        rng = np.random.default_rng(seed)
        for start in range(0, permutations, chunk):
            m = min(chunk, permutations - start)
            labels = np.stack([rng.permutation(lab) for _ in range(m)])
            hits += (np.abs(_assignments_statistic(x, labels, kind)) >= target).sum(0)
        p = (1 + hits) / (1 + permutations)
        total = permutations
    return {"statistic": observed, "p": p, "exact": exact, "assignments": int(total)}


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) of all entries of ``p`` together."""
    p = np.asarray(p, np.float64)
    flat = p.reshape(-1)
    m = flat.size
    if m == 0:
        return p.copy()
    order = np.argsort(flat, kind="stable")
    ranked = flat[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(ranked, 1.0)
    return q.reshape(p.shape)
