"""Accumulators and metrics against brute-force numpy on small tensors."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.measure import metrics
from actsparse.measure.accumulators import SiteStats


def _random_acts(rng, b, t, w, zero_frac=0.4):
    x = rng.normal(size=(b, t, w)).astype(np.float32)
    x[rng.random(size=x.shape) < zero_frac] = 0.0
    return x


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 7), w=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_per_row_metrics_match_numpy(b, t, w, seed):
    rng = np.random.default_rng(seed)
    x = _random_acts(rng, b, t, w)
    valid = rng.random(size=(b, t)) < 0.8
    valid[0, 0] = True
    s = SiteStats(w)
    s.update_sequence(torch.from_numpy(x), torch.from_numpy(valid))
    rows = x[valid]
    assert s.rows == rows.shape[0]
    assert metrics.zero_sparsity(s) == pytest.approx(np.mean(rows == 0))
    for e in s.eps:
        assert metrics.threshold_sparsity(s, e) == pytest.approx(np.mean(np.abs(rows) <= e))
    assert metrics.nonzero_per_token(s) == pytest.approx(np.mean(np.mean(rows != 0, axis=1)))
    np.testing.assert_array_equal(metrics.static_dead_neurons(s).numpy(), np.all(rows <= 0, axis=0))
    np.testing.assert_allclose(s.abs_sum.numpy(), np.abs(rows).astype(np.float64).sum(0), rtol=1e-6)
    mean_abs = np.abs(rows).mean(0)
    score = mean_abs / mean_abs.mean() if mean_abs.mean() > 0 else np.zeros_like(mean_abs)
    assert metrics.dormant_ratio(s, 0.1) == pytest.approx(np.mean(score <= 0.1))


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 8), w=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_temporal_and_flow_match_numpy(b, t, w, seed):
    rng = np.random.default_rng(seed)
    x = _random_acts(rng, b, t, w, zero_frac=0.5)
    x[rng.random(size=x.shape) < 0.3] = 1.0  # repeated values give exact zero deltas
    valid = np.ones((b, t), dtype=bool)
    if t > 2:
        valid[:, -1] = False  # right padding
    s = SiteStats(w)
    s.update_sequence(torch.from_numpy(x), torch.from_numpy(valid))
    same, pairs = 0, 0
    starts = np.zeros(w)
    active_n = np.zeros(w)
    for bi in range(b):
        seq = x[bi][valid[bi]]
        act = seq != 0
        active_n += act.sum(0)
        for ti in range(seq.shape[0]):
            starts += act[ti] & ~(act[ti - 1] if ti > 0 else np.zeros(w, bool))
            if ti > 0:
                pairs += 1
                same += np.sum(seq[ti] == seq[ti - 1])
    assert s.pairs == pairs
    if pairs:
        assert metrics.temporal_sparsity(s) == pytest.approx(same / (pairs * w))
    np.testing.assert_array_equal(s.run_starts.numpy(), starts)
    np.testing.assert_array_equal(s.flow_active.numpy(), active_n)


def test_merge_is_exact_and_serialises():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(_random_acts(rng, 4, 16, 5))
    whole = SiteStats(5)
    whole.update_sequence(x)
    a, b = SiteStats(5), SiteStats(5)
    a.update_sequence(x[:1])
    b.update_sequence(x[1:])
    merged = a.copy().merge(b)
    for k, v in whole.to_tensors().items():
        torch.testing.assert_close(merged.to_tensors()[k], v, rtol=1e-6, atol=1e-6)
    back = SiteStats.from_tensors(merged.to_tensors())
    for k, v in merged.to_tensors().items():
        assert torch.equal(back.to_tensors()[k], v)


def test_memory_does_not_grow_with_tokens():
    s = SiteStats(32)
    before = sum(t.numel() for t in s.to_tensors().values())
    for _ in range(5):
        s.update_sequence(torch.randn(2, 64, 32))
    assert sum(t.numel() for t in s.to_tensors().values()) == before


def test_nonfinite_counted_not_crashing():
    x = torch.randn(1, 4, 3)
    x[0, 1, 2] = float("nan")
    x[0, 2, 0] = float("inf")
    s = SiteStats(3)
    s.update_sequence(x)
    assert s.nonfinite == 2
    assert int(s.count.sum()) == 10
    assert math.isfinite(metrics.zero_sparsity(s))


def test_histogram_quantile_close_to_exact():
    rng = np.random.default_rng(1)
    v = rng.standard_cauchy(size=(20000, 4)).astype(np.float32)
    s = SiteStats(4)
    s.update(torch.from_numpy(v))
    for q in (0.1, 0.5, 0.9):
        exact = np.quantile(np.abs(v), q)
        assert s.abs_quantile(q) == pytest.approx(exact, rel=0.02)
        assert s.frac_abs_le(exact) == pytest.approx(q, abs=0.005)


def test_relu_balance_matches_numpy():
    rng = np.random.default_rng(2)
    z = (rng.normal(size=(500, 6)) + 0.3).astype(np.float32)
    s = SiteStats(6)
    s.update(torch.from_numpy(z))
    pos, neg = z[z > 0].astype(np.float64), z[z < 0].astype(np.float64)
    rm = pos.mean() / abs(neg.mean())
    rv = pos.var() / neg.var()
    out = metrics.relu_balance(s)
    assert out["r_mean"] == pytest.approx(min(rm, 1 / rm), rel=1e-4)  # float32 per-batch sums
    assert out["r_var"] == pytest.approx(min(rv, 1 / rv), rel=1e-4)


@pytest.mark.skipif(not __import__("actsparse.measure.fused", fromlist=["x"]).numba_enabled(), reason="numba off")
@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 9), w=st.integers(1, 150), seed=st.integers(0, 10_000),
       bad=st.booleans(), thr=st.sampled_from([0.0, 0.1]))
def test_fused_numba_equals_torch_reference(b, t, w, seed, bad, thr):
    rng = np.random.default_rng(seed)
    x = _random_acts(rng, b, t, w)
    x[rng.random(size=x.shape) < 0.2] = 0.05  # values exactly at an eps
    if bad:
        x[rng.random(size=x.shape) < 0.05] = np.nan
        x[rng.random(size=x.shape) < 0.05] = -np.inf
    valid = torch.from_numpy(rng.random(size=(b, t)) < 0.7)
    ref, fast = SiteStats(w), SiteStats(w)
    ref.update_sequence(torch.from_numpy(x), valid, flow_threshold=thr, backend="torch")
    fast.update_sequence(torch.from_numpy(x), valid, flow_threshold=thr, backend="numba")
    ref.update(torch.from_numpy(x[0]), backend="torch")
    fast.update(torch.from_numpy(x[0]), backend="numba")
    for k, v in ref.to_tensors().items():
        got = fast.to_tensors()[k]
        if v.dtype == torch.float64:
            torch.testing.assert_close(got, v, rtol=1e-5, atol=1e-5, msg=k)
        else:
            assert torch.equal(got, v), k


@pytest.mark.parametrize("scaled", [False, True])
def test_light_update_numba_equals_torch_reference(scaled):
    """The fused light pass (calibration) reads the (batch, time, width) tensor in place; it must
    give the torch path's counts and histogram exactly, and its |v| sums to rounding."""
    from actsparse.numba_backend import numba_enabled

    if not numba_enabled():
        pytest.skip("numba disabled")
    g = torch.Generator().manual_seed(3)
    v = torch.randn(3, 50, 300, generator=g) * torch.rand(300, generator=g) * 4
    v[v.abs() < 0.3] = 0
    v[0, 3, 7], v[2, 10, 299], v[1, 0, 0] = float("nan"), float("inf"), -float("inf")
    valid = torch.rand(3, 50, generator=g) > 0.2
    scale = torch.rand(300, generator=g) * 3 if scaled else None
    a, b = SiteStats(300), SiteStats(300)
    a.update_light(v, valid, scale=scale, backend="numba")
    b.update_light(v, valid, scale=scale, backend="torch")
    for name in ("count", "nonzero", "hist"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.rows, a.nonfinite) == (b.rows, b.nonfinite) and a.nonfinite == 3
    torch.testing.assert_close(a.abs_sum, b.abs_sum, rtol=1e-6, atol=1e-9)
    assert a.abs_quantile(0.5) == b.abs_quantile(0.5)
