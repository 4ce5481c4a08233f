"""Quantised kernels (int8, q4) vs the specification: dequantise, then the masked dense forward.

Tolerances (stated once):
- the packed format: dequantize(quantize(w)) is within half a quantisation step of w
  (int8: scale / 2; q4: scale / 2 per element), and exact for values on the grid;
- kernels: |y - y_ref| <= RTOL * sum_i |x_i| * mag_ij + ATOL, where y_ref is the float64
  forward of the dequantised weight and mag_ij = |q_ij * scale| + |min| is the magnitude of
  the terms the kernel actually adds (q4 factors each block into sum(code x) * scale +
  min * sum(x)); RTOL = 2e-5 (fp32 accumulation of up to a few hundred terms, two levels);
- bf16 outputs additionally get half a bf16 ulp of the result (2^-8 relative).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from actsparse.errors import UnsupportedError
from actsparse.kernels import numba_enabled
from actsparse.kernels import quant_reference as qref
from actsparse.kernels import reference as ref
from actsparse.kernels.quant_dispatch import q_dense_gemv, q_gated_mlp_step, q_input_sparse_gemv, q_output_sparse_gemv
from actsparse.kernels.quant_formats import (BLOCK, FORMATS, QuantWeight, dequantize_matrix, quantize_matrix,
                                             quantize_weight)

RTOL = 2e-5
ATOL = 1e-6
BF16_REL = 2.0**-8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
needs_numba = pytest.mark.skipif(not numba_enabled(), reason="numba kernels disabled or missing")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def _mag(qw: QuantWeight) -> torch.Tensor:
    """|terms| per logical weight element (out x in), float64."""
    if qw.fmt == "int8":
        m = dequantize_matrix("int8", qw.codes, qw.scales).abs()
    else:
        m = dequantize_matrix("q4", qw.codes, qw.scales.abs(), qw.mins.abs())
    m = m.double()
    return m if qw.layout == "rows" else m.t()


def _check(y, y64, bound, what=""):
    tol = bound + ATOL
    if y.dtype == torch.bfloat16:
        tol = tol + BF16_REL * y64.abs()
    err = (y.double() - y64).abs()
    bad = err > tol
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {y.numel()} outputs off; max err "
                                 f"{float(err.max()):.3g}, tol there {float(tol[err.argmax()]):.3g}")


def _weight(g, out_f, in_f, kind):
    w = torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)
    if kind == "offset":  # q4's min matters: a block-wise offset
        w = w + torch.randn(out_f, 1, generator=g)
    elif kind == "zeros":  # all-zero and constant blocks (scale 0)
        w[:, :BLOCK] = 0.0
        if out_f > 1:
            w[0] = 0.7
    return w


# ---------------------------------------------------------------------------
# the format
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_error_is_half_a_step(fmt):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(7, 96, generator=g) * torch.rand(7, 1, generator=g) * 3
    m[0, :32] = 0
    m[1, 32:64] = 0.25
    p = quantize_matrix(m, fmt)
    d = dequantize_matrix(fmt, p["codes"], p["scales"], p.get("mins"))
    assert p["scales"].dtype == torch.float16
    step = p["scales"].float().repeat_interleave(BLOCK, dim=1)
    # half a step, plus what rounding the block's scale (and min) to fp16 moves the grid's ends
    amax = m.abs().reshape(7, 3, BLOCK).amax(-1).repeat_interleave(BLOCK, dim=1)
    assert bool(((d - m).abs() <= step / 2 + amax * 2.0 ** -10 + 1e-6).all())
    assert bool((d[0, :32] == 0).all())
    if fmt == "q4":  # a constant block is its min (0.25 is exact in fp16)
        assert bool((d[1, 32:64] == 0.25).all())
    # the grid is a fixed point: re-quantising the dequantised matrix gives the same codes
    p2 = quantize_matrix(d, fmt)
    d2 = dequantize_matrix(fmt, p2["codes"], p2["scales"], p2.get("mins"))
    assert torch.allclose(d2, d, atol=1e-6, rtol=1e-6)


def test_q4_nibble_order_and_int8_codes():
    m = torch.arange(32, dtype=torch.float32)[None] % 16  # codes 0..15, 0..15 with min 0, scale 1
    p = quantize_matrix(m, "q4")
    assert p["codes"].shape == (1, 16) and p["codes"].dtype == torch.uint8
    assert float(p["scales"][0, 0]) == 1.0 and float(p["mins"][0, 0]) == 0.0
    # byte j: element j low, element j + 16 high
    assert p["codes"][0].tolist() == [j | (j << 4) for j in range(16)]
    q = quantize_matrix(torch.linspace(-1, 1, 32)[None], "int8")
    assert q["codes"].dtype == torch.int8 and int(q["codes"].min()) == -127 and int(q["codes"].max()) == 127


def test_unblockable_shapes_are_refused_with_the_fix():
    with pytest.raises(UnsupportedError, match="multiple of 32"):
        quantize_weight(torch.randn(64, 40), "int8", "rows")
    with pytest.raises(UnsupportedError, match="other layout"):
        quantize_weight(torch.randn(40, 64), "q4", "transposed")
    quantize_weight(torch.randn(40, 64), "q4", "rows")  # the block axis is what counts
    with pytest.raises(UnsupportedError, match="NaN"):
        quantize_weight(torch.full((2, 32), math.nan), "int8")


def test_layout_mismatch_names_the_fix():
    qw = quantize_weight(torch.randn(64, 64), "int8", "rows")
    with pytest.raises(ValueError, match="transposed"):
        q_input_sparse_gemv(torch.randn(64), qw, 0.1)
    qt = quantize_weight(torch.randn(64, 64), "int8", "transposed")
    with pytest.raises(ValueError, match="rows"):
        q_dense_gemv(torch.randn(64), qt)


# ---------------------------------------------------------------------------
# kernels vs the reference
# ---------------------------------------------------------------------------
blocks = st.integers(1, 6).map(lambda b: b * BLOCK)


@needs_numba
@SETTINGS
@given(data=st.data(), m=st.integers(1, 70), k=blocks, fmt=st.sampled_from(FORMATS),
       xdt=st.sampled_from(["fp32", "bf16"]), kind=st.sampled_from(["plain", "offset", "zeros"]),
       nthreads=st.sampled_from([1, 2]))
def test_dense_gemv_matches(threads, data, m, k, fmt, xdt, kind, nthreads):
    threads(nthreads)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    qw = quantize_weight(_weight(g, m, k, kind), fmt, "rows")
    x = torch.randn(k, generator=g).to(DTYPES[xdt])
    y = q_dense_gemv(x, qw)
    assert y.dtype == x.dtype and y.shape == (m,)
    y64 = qref.q_dense_gemv_ref(x, qw, compute_dtype=torch.float64, out_dtype=torch.float64)
    _check(y, y64, RTOL * (_mag(qw) @ x.double().abs()), f"{fmt} {m}x{k} {kind}")


@needs_numba
@SETTINGS
@given(data=st.data(), n=blocks, k=st.integers(1, 200), fmt=st.sampled_from(FORMATS),
       xdt=st.sampled_from(["fp32", "bf16"]), kind=st.sampled_from(["plain", "offset", "zeros"]),
       mode=st.sampled_from(["none", "all", "random", "random"]), per_channel=st.booleans(),
       nthreads=st.sampled_from([1, 2]))
def test_input_sparse_gemv_matches(threads, data, n, k, fmt, xdt, kind, mode, per_channel, nthreads):
    threads(nthreads)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    qw = quantize_weight(_weight(g, n, k, kind), fmt, "transposed")
    x = torch.randn(k, generator=g).to(DTYPES[xdt])
    t = {"none": math.inf, "all": -1.0}.get(mode, data.draw(st.floats(0.0, 2.0)))
    if per_channel:
        t = torch.full((k,), t) * (torch.rand(k, generator=g) + 0.5) if math.isfinite(t) else torch.full((k,), t)
    y, active = q_input_sparse_gemv(x, qw, t, return_active=True)
    mask = ref.input_mask(x, t)
    assert active == int(mask.sum())
    y64 = qref.q_input_sparse_gemv_ref(x, qw, t, compute_dtype=torch.float64, out_dtype=torch.float64)
    _check(y, y64, RTOL * (_mag(qw) @ (x.double().abs() * mask)), f"{fmt} {n}x{k} {mode}")
    if mode == "none":
        assert bool((y == 0).all())


@needs_numba
@SETTINGS
@given(data=st.data(), m=st.integers(1, 70), k=blocks, fmt=st.sampled_from(FORMATS),
       xdt=st.sampled_from(["fp32", "bf16"]), sel=st.sampled_from(["mask", "rows", "values"]),
       density=st.sampled_from([0.0, 0.1, 0.5, 1.0]), nthreads=st.sampled_from([1, 2]))
def test_output_sparse_gemv_matches(threads, data, m, k, fmt, xdt, sel, density, nthreads):
    threads(nthreads)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    qw = quantize_weight(_weight(g, m, k, "offset"), fmt, "rows")
    x = torch.randn(k, generator=g).to(DTYPES[xdt])
    mask = torch.rand(m, generator=g) < density
    if sel == "mask":
        active, scale = mask, torch.ones(m, dtype=torch.float64)
    elif sel == "rows":
        active, scale = mask.nonzero().squeeze(1), torch.ones(m, dtype=torch.float64)
    else:
        active = torch.randn(m, generator=g) * mask
        scale = active.double().abs()
    y, n = q_output_sparse_gemv(x, qw, active, return_active=True)
    assert n == int(mask.sum()) if sel != "values" else n == int((active != 0).sum())
    y64 = qref.q_output_sparse_gemv_ref(x, qw, active, compute_dtype=torch.float64, out_dtype=torch.float64)
    _check(y, y64, RTOL * (_mag(qw) @ x.double().abs()) * scale, f"{fmt} {m}x{k} {sel}")
    assert bool((y[~mask] == 0).all())


def _gap_threshold(a_abs, keep):
    s = torch.sort(a_abs, descending=True).values.double()
    if keep == 0:
        return float(s[0]) * 1.5 + 1.0
    if keep == s.numel():
        return -1.0
    hi, lo = float(s[keep - 1]), float(s[keep])
    return None if hi - lo <= 1e-4 * (float(s[0]) + 1e-30) else (hi + lo) / 2


@needs_numba
@SETTINGS
@given(data=st.data(), d=blocks, f=st.integers(1, 6).map(lambda b: b * BLOCK), gfmt=st.sampled_from(FORMATS),
       dfmt=st.sampled_from(FORMATS), dt=st.sampled_from(["fp32", "bf16"]), act=st.sampled_from(list(ref.ACTIVATIONS)),
       frac=st.sampled_from([0.0, 1.0, 0.5, 0.1]), nthreads=st.sampled_from([1, 2]))
def test_gated_mlp_step_matches(threads, data, d, f, gfmt, dfmt, dt, act, frac, nthreads):
    threads(nthreads)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    qg = quantize_weight(_weight(g, f, d, "plain"), gfmt, "rows")
    qu = quantize_weight(_weight(g, f, d, "offset"), gfmt, "rows")
    qd = quantize_weight(_weight(g, d, f, "plain"), dfmt, "transposed")
    x = torch.randn(d, generator=g).to(DTYPES[dt])
    x64 = x.double()
    wg, wu, wd = (q.dequantize().double() for q in (qg, qu, qd))
    a = ref.activation(wg @ x64, act)
    keep = int(round(frac * f))
    t = _gap_threshold(a.abs(), keep)
    assume(t is not None)
    y, n = q_gated_mlp_step(x, qg, qu, qd, t, act, return_active=True)
    y64, n64 = qref.q_gated_mlp_step_ref(x, qg, qu, qd, t, act, return_active=True, compute_dtype=torch.float64,
                                         out_dtype=torch.float64)
    assert n == n64 == keep
    mask = a.abs() > t
    u = wu @ x64
    gx, ux = _mag(qg) @ x64.abs(), _mag(qu) @ x64.abs()
    dh = (a.abs() * ux + u.abs() * 1.2 * gx + (a * u).abs()) * mask
    _check(y, y64, 2 * RTOL * (_mag(qd) @ dh), f"{gfmt}/{dfmt} {act} {d}/{f} keep={keep}")


@needs_numba
def test_smollm2_shapes_and_batched_fallback(threads):
    threads(2)
    g = torch.Generator().manual_seed(1)
    for fmt in FORMATS:
        w = torch.randn(1536, 576, generator=g) / 24
        qr, qt = quantize_weight(w, fmt, "rows"), quantize_weight(w, fmt, "transposed")
        x = torch.randn(576, generator=g)
        y = q_dense_gemv(x, qr)
        _check(y, qref.q_dense_gemv_ref(x, qr, compute_dtype=torch.float64, out_dtype=torch.float64),
               RTOL * (_mag(qr) @ x.double().abs()), f"{fmt} 1536x576")
        y = q_input_sparse_gemv(x, qt, 0.5)
        xm = x.double().abs() * (x.abs() > 0.5)
        _check(y, qref.q_input_sparse_gemv_ref(x, qt, 0.5, compute_dtype=torch.float64, out_dtype=torch.float64),
               RTOL * (_mag(qt) @ xm), f"{fmt} transposed 1536x576")
        xb = torch.randn(3, 576, generator=g)  # batched: the reference (dense) path
        torch.testing.assert_close(q_dense_gemv(xb, qr), xb @ qr.dequantize().t())
