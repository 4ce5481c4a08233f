"""Sparsity metrics of the activation-sparsity literature, computed from SiteStats.

Definitions follow ``shared/specs/methods.md``; each function is tested against a
brute-force numpy computation on small tensors.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from actsparse.measure.accumulators import SiteStats


def _total(st: SiteStats) -> int:
    return int(st.count.sum())


def _safe_div(a: float, b: float) -> float:
    return a / b if b else math.nan


def zero_sparsity(st: SiteStats) -> float:
    """Fraction of entries exactly 0 (Lazy Neuron)."""
    return 1.0 - _safe_div(float(st.nonzero.sum()), _total(st))


def threshold_sparsity(st: SiteStats, eps: float) -> float:
    """Fraction of entries with ``|v| <= eps`` (CATS, TEAL). Exact for an eps the capture
    counted; otherwise estimated from the |v| histogram."""
    for i, e in enumerate(st.eps):
        if math.isclose(e, eps, rel_tol=1e-9):
            return _safe_div(float(st.le_eps[i].sum()), _total(st))
    return st.frac_abs_le(eps)


def nonzero_per_token(st: SiteStats) -> float:
    """Per token, nonzeros / width, averaged over tokens (Lazy Neuron's % nonzero).
    With a fixed width this equals the nonzero fraction over all (finite) entries."""
    return _safe_div(float(st.nonzero.sum()), _total(st))


def dynamic_dead_rate(st: SiteStats) -> float:
    """Dynamic dead-neuron rate (AP): mean over inputs of the fraction of a layer's
    outputs that are 0. With a fixed width this is the zero fraction over all entries."""
    return 1.0 - nonzero_per_token(st)


def static_dead_neurons(st: SiteStats, eps: float | None = None) -> torch.Tensor:
    """Neurons that never fire over everything captured: ``v <= 0`` always (ReLU sense)
    when ``eps`` is None, else ``|v| <= eps`` always. Bool tensor of length width."""
    seen = st.count > 0
    if eps is None:
        return (st.positive == 0) & seen
    for i, e in enumerate(st.eps):
        if math.isclose(e, eps, rel_tol=1e-9):
            return (st.le_eps[i] == st.count) & seen
    raise ValueError(f"eps {eps} was not counted; captured eps: {st.eps}")


def neuron_mean_abs(st: SiteStats) -> torch.Tensor:
    return st.abs_sum / st.count.clamp_min(1).double()


def dormant_scores(st: SiteStats) -> torch.Tensor:
    """ReDo score ``s_i = E|v_i| / mean_k E|v_k|`` (divided by the layer mean, as the
    released ReDo code does)."""
    m = neuron_mean_abs(st)
    mean = m.mean()
    if mean == 0:
        return torch.zeros_like(m)
    return m / mean


def dormant_mask(st: SiteStats, tau: float = 0.1) -> torch.Tensor:
    return dormant_scores(st) <= tau


def dormant_ratio(stats: SiteStats | Mapping[str, SiteStats], tau: float = 0.1) -> float:
    """Dormant neurons / all neurons over the given sites (tau = 0.1 ReDo, 0.025 DrM)."""
    if isinstance(stats, SiteStats):
        stats = {"site": stats}
    dormant = sum(int(dormant_mask(st, tau).sum()) for st in stats.values())
    total = sum(st.width for st in stats.values())
    return _safe_div(dormant, total)


def temporal_sparsity(st: SiteStats, eps: float | None = None) -> float:
    """Fraction of entries whose change between consecutive tokens is 0 (or ``<= eps``)
    (Delta Activation Layer)."""
    denom = st.pairs * st.width
    if eps is None:
        return _safe_div(float(st.delta_zero.sum()), denom)
    for i, e in enumerate(st.eps):
        if math.isclose(e, eps, rel_tol=1e-9):
            return _safe_div(float(st.delta_le_eps[i].sum()), denom)
    raise ValueError(f"eps {eps} was not counted; captured eps: {st.eps}")


def activation_flow(st: SiteStats, *, shared_run: float = 4.0, specialised_run: float = 1.5) -> dict:
    """Activation flow (MoHD): per dimension, the share of its active tokens that continue
    a run from the previous token (``persistence``) and the mean run length. Dimensions
    with mean run >= ``shared_run`` are "shared", those with mean run < ``specialised_run``
    are "specialised" (mostly active for single tokens)."""
    active = st.flow_active.double()
    starts = st.run_starts.double()
    mean_run = torch.where(starts > 0, active / starts.clamp_min(1), torch.zeros_like(active))
    persistence = torch.where(active > 0, 1 - starts / active.clamp_min(1), torch.zeros_like(active))
    ever = active > 0
    shared = ever & (mean_run >= shared_run)
    specialised = ever & (mean_run < specialised_run)
    n = st.width
    return {
        "mean_run_length": float(mean_run[ever].mean()) if ever.any() else math.nan,
        "persistence": float(persistence[ever].mean()) if ever.any() else math.nan,
        "shared_frac": float(shared.sum()) / n,
        "specialised_frac": float(specialised.sum()) / n,
        "never_active_frac": float((~ever).sum()) / n,
        "per_neuron_mean_run": mean_run,
    }


def relu_balance(st: SiteStats) -> dict:
    """ReLU-state balance of a pre-activation site: ratios of the mean magnitude and the
    variance of the active (z > 0) and inactive (z < 0) pre-activations, each folded to
    ``min(r, 1/r)`` (1 = balanced)."""
    n_pos = float(st.positive.sum())
    n_neg = float((st.nonzero - st.positive).sum())
    if n_pos == 0 or n_neg == 0:
        return {"r_mean": 0.0, "r_var": 0.0, "active_frac": _safe_div(n_pos, _total(st))}
    pos_sum = float(st.pos_sum.sum())
    neg_sum = float((st.sum - st.pos_sum).sum())
    m_pos, m_neg = pos_sum / n_pos, neg_sum / n_neg
    v_pos = max(float(st.pos_sq_sum.sum()) / n_pos - m_pos**2, 0.0)
    v_neg = max(float((st.sq_sum - st.pos_sq_sum).sum()) / n_neg - m_neg**2, 0.0)

    def fold(a: float, b: float) -> float:
        if a == 0 or b == 0:
            return 0.0
        r = a / b
        return min(r, 1 / r)

    return {"r_mean": fold(m_pos, abs(m_neg)), "r_var": fold(v_pos, v_neg),
            "active_frac": n_pos / _total(st)}


def site_summary(st: SiteStats) -> dict:
    """All scalar metrics of one site, for reports and JSON."""
    out = {
        "width": st.width,
        "tokens": st.rows,
        "nonfinite": st.nonfinite,
        "zero_sparsity": zero_sparsity(st),
        "nonzero_per_token": nonzero_per_token(st),
        "threshold_sparsity": {str(e): threshold_sparsity(st, e) for e in st.eps},
        "static_dead": int(static_dead_neurons(st).sum()),
        "static_dead_eps": {str(e): int(static_dead_neurons(st, e).sum()) for e in st.eps},
        "dormant_ratio_0.1": dormant_ratio(st, 0.1),
        "dormant_ratio_0.025": dormant_ratio(st, 0.025),
        "mean_abs": float(st.abs_sum.sum() / max(_total(st), 1)),
    }
    if st.pairs:
        out["temporal_sparsity"] = temporal_sparsity(st)
        out["temporal_sparsity_eps"] = {str(e): temporal_sparsity(st, e) for e in st.eps}
        flow = activation_flow(st)
        flow.pop("per_neuron_mean_run")
        out["activation_flow"] = flow
    if int((st.nonzero - st.positive).sum()) > 0:
        out["relu_balance"] = relu_balance(st)
    return out
