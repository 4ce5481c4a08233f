"""Kernels vs the specification: the dense forward on the masked input.

Tolerances (stated once, used everywhere):
- accumulation: |y - y_ref| <= RTOL * sum_i |x_i w_ij| (the sum of |terms|, float64)
  + ATOL, RTOL = 1e-5 (fp32 accumulation of up to a few hundred terms);
- bf16 outputs additionally get half a bf16 ulp of the result (2^-8 relative);
- bf16 weights are compared against the reference on the same bf16 values
  widened to float64, so no weight rounding error enters the tolerance.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from actsparse.kernels import (
    backend,
    gated_mlp_step,
    numba_enabled,
    sparse_input_gemv,
    sparse_output_gemv,
    to_kernel_layout,
)
from actsparse.kernels import reference as ref

RTOL = 1e-5
ATOL = 1e-6
BF16_REL = 2.0**-8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

needs_numba = pytest.mark.skipif(not numba_enabled(), reason="numba kernels disabled or missing")
SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def threads():
    """Restore torch's thread count after a test changes it."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def _check(y, y64, bound, what=""):
    """|y - y64| <= bound (+ half a bf16 ulp when y is bf16), elementwise."""
    tol = bound + ATOL
    if y.dtype == torch.bfloat16:
        tol = tol + BF16_REL * y64.abs()
    err = (y.double() - y64).abs()
    bad = err > tol
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {y.numel()} outputs off; max err {float(err.max()):.3g}, "
        f"tol there {float(tol[err.argmax()]):.3g}"
    )


def _thresholds(draw, x, mode, per_channel):
    """A threshold giving the requested activity pattern for |x| (fp32 values)."""
    ax = x.float().abs()
    k = x.shape[0]
    if mode == "none":
        t = math.inf
    elif mode == "all":
        t = -1.0
    elif mode == "one":
        i = draw(st.integers(0, k - 1))
        if per_channel:
            t = torch.full((k,), math.inf)
            t[i] = -1.0
            return t
        s = torch.sort(ax, descending=True).values
        assume(k == 1 or float(s[0]) > float(s[1]))
        t = float(s[1]) if k > 1 else -1.0
        return t
    else:
        t = draw(st.floats(0.0, 2.0))
    if per_channel:
        scale = torch.tensor(draw(st.lists(st.floats(0.25, 2.0), min_size=k, max_size=k)))
        return (torch.full((k,), t) * scale).float() if math.isfinite(t) else torch.full((k,), t)
    return t


# ---------------------------------------------------------------------------
@needs_numba
@SETTINGS
@given(
    data=st.data(),
    k=st.integers(1, 300),
    n=st.integers(1, 300),
    xdt=st.sampled_from(["fp32", "bf16"]),
    wdt=st.sampled_from(["fp32", "bf16"]),
    mode=st.sampled_from(["none", "one", "all", "random", "random"]),
    per_channel=st.booleans(),
    nthreads=st.sampled_from([1, 2]),
)
def test_sparse_input_gemv_matches_masked_dense(threads, data, k, n, xdt, wdt, mode, per_channel, nthreads):
    threads(nthreads)
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, generator=g).to(DTYPES[xdt])
    w = torch.randn(n, k, generator=g).to(DTYPES[wdt])
    wt = to_kernel_layout(w)
    t = _thresholds(data.draw, x, mode, per_channel)

    y, n_active = sparse_input_gemv(x, wt, t, return_active=True)
    mask = ref.input_mask(x, t)
    y64 = ref.sparse_input_gemv_ref(x, wt, t, compute_dtype=torch.float64, out_dtype=torch.float64)
    assert y.dtype == x.dtype and y.shape == (n,)
    assert n_active == int(mask.sum())
    if mode == "none":
        assert n_active == 0 and bool((y == 0).all())
    if mode == "one":
        assert n_active == 1
    if mode == "all":
        assert n_active == k
    terms = (x.double().abs() * mask) @ wt.double().abs()
    _check(y, y64, RTOL * terms, f"{xdt}/{wdt} {k}x{n} {mode}")


@needs_numba
@pytest.mark.parametrize("nthreads", [1, 2])
def test_sparse_input_gemv_out_and_large(threads, nthreads):
    """A decode-sized layer (sizes not multiples of 8) with a preallocated out."""
    threads(nthreads)
    g = torch.Generator().manual_seed(1)
    k, n = 1027, 2051
    x = torch.randn(k, generator=g)
    wt = to_kernel_layout(torch.randn(n, k, generator=g), torch.bfloat16)
    out = torch.empty(n)
    y = sparse_input_gemv(x, wt, 0.7, out=out)
    assert y.data_ptr() == out.data_ptr()
    terms = (x.double().abs() * (x.abs() > 0.7)) @ wt.double().abs()
    _check(out, ref.sparse_input_gemv_ref(x, wt, 0.7, compute_dtype=torch.float64, out_dtype=torch.float64), RTOL * terms)


@needs_numba
def test_colsplit_variant_matches():
    from actsparse.kernels import numba_cpu as nc

    rng = np.random.default_rng(0)
    x = rng.standard_normal(333).astype(np.float32)
    wt = rng.standard_normal((333, 517)).astype(np.float32)
    thr = np.array([0.8], np.float32)
    a, b = np.empty(517, np.float32), np.empty(517, np.float32)
    na = nc.input_sparse_gemv(x, wt, thr, 0, a, 2)
    nb = nc.input_sparse_gemv_colsplit(x, wt, thr, 0, b, 2)
    assert na == nb == int((np.abs(x) > 0.8).sum())
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------
@needs_numba
@SETTINGS
@given(
    data=st.data(),
    m=st.integers(1, 300),
    k=st.integers(1, 300),
    xdt=st.sampled_from(["fp32", "bf16"]),
    wdt=st.sampled_from(["fp32", "bf16"]),
    kind=st.sampled_from(["mask", "indices", "values"]),
    density=st.sampled_from([0.0, 1.0, 0.3, "one"]),
    nthreads=st.sampled_from([1, 2]),
)
def test_sparse_output_gemv_matches(threads, data, m, k, xdt, wdt, kind, density, nthreads):
    threads(nthreads)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(k, generator=g).to(DTYPES[xdt])
    w = torch.randn(m, k, generator=g).to(DTYPES[wdt])
    if density == "one":
        mask = torch.zeros(m, dtype=torch.bool)
        mask[data.draw(st.integers(0, m - 1))] = True
    else:
        mask = torch.rand(m, generator=g) < density
    if kind == "mask":
        active, scale = mask, torch.ones(m)
    elif kind == "indices":
        active, scale = mask.nonzero().flatten(), torch.ones(m)
    else:
        scale = torch.randn(m, generator=g) * mask
        scale[mask & (scale == 0)] = 1.0
        active = scale

    y, n = sparse_output_gemv(x, w, active, return_active=True)
    y64 = ref.sparse_output_gemv_ref(x, w, active, compute_dtype=torch.float64, out_dtype=torch.float64)
    assert n == int(mask.sum())
    assert bool((y[~mask] == 0).all()), "inactive outputs must be exactly 0"
    terms = (w.double().abs() @ x.double().abs()) * scale.double().abs()
    _check(y, y64, RTOL * terms, f"{kind} {m}x{k}")


# ---------------------------------------------------------------------------
def _gap_threshold(a_abs: torch.Tensor, keep: int) -> float | None:
    """A threshold keeping exactly ``keep`` of |a|, far from every |a_i| (so that fp32
    vs float64 rounding of a cannot flip a decision); None if there is no such gap."""
    s = torch.sort(a_abs, descending=True).values.double()
    hi = float(s[keep - 1]) if keep > 0 else math.inf
    lo = float(s[keep]) if keep < s.numel() else -1.0
    if keep == 0:
        return float(s[0]) * 1.5 + 1.0
    if keep == s.numel():
        return -1.0
    if hi - lo <= 1e-4 * (float(s[0]) + 1e-30):
        return None
    return (hi + lo) / 2


@needs_numba
@SETTINGS
@given(
    data=st.data(),
    d=st.integers(1, 96),
    f=st.integers(1, 200),
    dt=st.sampled_from(["fp32", "bf16"]),
    act=st.sampled_from(list(ref.ACTIVATIONS)),
    frac=st.sampled_from([0.0, 1.0, 0.5, 0.1, "one"]),
    per_neuron=st.booleans(),
    nthreads=st.sampled_from([1, 2]),
)
def test_gated_mlp_step_matches(threads, data, d, f, dt, act, frac, per_neuron, nthreads):
    threads(nthreads)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    dtype = DTYPES[dt]
    x = torch.randn(d, generator=g).to(dtype)
    w_gate = (torch.randn(f, d, generator=g) / math.sqrt(d)).to(dtype)
    w_up = (torch.randn(f, d, generator=g) / math.sqrt(d)).to(dtype)
    wt_down = (torch.randn(f, d, generator=g) / math.sqrt(f)).to(dtype)
    x64 = x.double()
    a = ref.activation(w_gate.double() @ x64, act)
    if per_neuron:  # CHESS-style: t_i = T / E|u_i| with a random positive E|u_i|
        eu = torch.rand(f, generator=g).double() + 0.5
        score = a.abs() * eu
    else:
        eu = None
        score = a.abs()
    keep = 1 if frac == "one" else int(round(frac * f))
    t = _gap_threshold(score, keep)
    assume(t is not None)
    thr = (torch.full((f,), t, dtype=torch.float64) / eu).float() if per_neuron else t
    if per_neuron:  # re-check the gap on the fp32 per-neuron thresholds actually used
        margin = (a.abs() - thr.double()).abs() / (a.abs().max() + 1e-30)
        assume(bool((margin > 1e-5).all()))

    y, n = gated_mlp_step(x, w_gate, w_up, wt_down, thr, act, return_active=True)
    y64, n64 = ref.gated_mlp_step_ref(
        x, w_gate, w_up, wt_down, thr, act, return_active=True, compute_dtype=torch.float64,
        out_dtype=torch.float64,
    )
    assert n == n64 == keep
    mask = a.abs() > (thr.double() if per_neuron else t)
    u = w_up.double() @ x64
    gx = w_gate.double().abs() @ x64.abs()
    ux = w_up.double().abs() @ x64.abs()
    dh = (a.abs() * ux + u.abs() * 1.2 * gx + (a * u).abs()) * mask
    _check(y, y64, RTOL * (dh @ wt_down.double().abs()), f"{dt} {act} {d}/{f} keep={keep}")


# ---------------------------------------------------------------------------
def test_reference_is_the_masked_dense_forward():
    """The reference itself against a hand-written masked matmul (not a tautology:
    different code path, explicit loop over active inputs)."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(37, generator=g), torch.randn(11, 37, generator=g)
    y = ref.sparse_input_gemv_ref(x, w.t().contiguous(), 0.5, compute_dtype=torch.float64, out_dtype=torch.float64)
    want = torch.zeros(11, dtype=torch.float64)
    for i in range(37):
        if abs(float(x[i])) > 0.5:
            want += float(x[i]) * w[:, i].double()
    torch.testing.assert_close(y, want)


def test_disable_numba_uses_reference(monkeypatch):
    monkeypatch.setenv("ACTSPARSE_DISABLE_NUMBA", "1")
    assert backend() == "torch" and not numba_enabled()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, generator=g).bfloat16()
    w = torch.randn(40, 50, generator=g).bfloat16()
    wt = to_kernel_layout(w)
    y, n = sparse_input_gemv(x, wt, 0.5, return_active=True)
    assert y.dtype == torch.bfloat16 and n == int((x.float().abs() > 0.5).sum())
    torch.testing.assert_close(y, ref.sparse_input_gemv_ref(x, wt, 0.5))
    m = torch.rand(40, generator=g) > 0.5
    y = sparse_output_gemv(x, w, m)
    assert bool((y[~m] == 0).all())
    y, n = gated_mlp_step(x, w, w, w, 0.1, "relu", return_active=True)
    torch.testing.assert_close(y, ref.gated_mlp_step_ref(x, w, w, w, 0.1, "relu"))


def test_fp16_warns_and_falls_back():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, generator=g).half()
    wt = torch.randn(20, 30, generator=g).half()
    with pytest.warns(RuntimeWarning, match="float16"):
        y = sparse_input_gemv(x, wt, 0.3)
    assert y.dtype == torch.float16
    want = ref.sparse_input_gemv_ref(x, wt, 0.3, compute_dtype=torch.float64, out_dtype=torch.float64)
    torch.testing.assert_close(y.double(), want, rtol=2e-3, atol=2e-3)


def test_bad_inputs_raise():
    x = torch.randn(8)
    with pytest.raises(ValueError, match="transposed"):
        sparse_input_gemv(x, torch.randn(9, 8), 0.1)
    with pytest.raises(ValueError, match="per-channel"):
        sparse_input_gemv(x, torch.randn(8, 4), torch.ones(5))
    with pytest.raises(ValueError, match="activation"):
        gated_mlp_step(x, torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8), 0.1, "tanh")
    if numba_enabled():
        with pytest.raises(ValueError, match="contiguous"):
            sparse_input_gemv(x, torch.randn(4, 8).t(), 0.1)
        with pytest.raises(ValueError, match=r"\[0, 4\)"):
            sparse_output_gemv(x, torch.randn(4, 8), torch.tensor([0, 4]))


@needs_numba
def test_threads_follow_torch(threads):
    import numba

    g = torch.Generator().manual_seed(6)
    x, wt = torch.randn(16, generator=g), torch.randn(16, 8, generator=g)
    for n in (1, 2):
        threads(n)
        sparse_input_gemv(x, wt, 0.1)
        assert numba.get_num_threads() == min(n, numba.config.NUMBA_NUM_THREADS)


def test_batched_input_uses_dense_path():
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(3, 16, generator=g), torch.randn(8, 16, generator=g)
    y = sparse_input_gemv(x, to_kernel_layout(w), 0.5)
    want = torch.nn.functional.linear(x * (x.abs() > 0.5), w)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
