"""Numba CPU kernels on block-quantised weights (int8, q4; formats in
:mod:`actsparse.kernels.quant_formats`): dense, output-sparse and input-sparse GEMV and the
fused gated-MLP step, batch 1, fp32 accumulation, 1..N threads.

The kernels read the packed codes directly (no matrix is ever dequantised); one block of 32
is widened in registers and reduced:

- row dot products (``rows`` layout): ``y_i = sum_b scale_ib * (sum_j q_ij x_j) [+ min_ib * sum_j x_j]``,
  with the per-block sums of x computed once per call (q4's ``min`` term);
- input-sparse accumulation (``transposed`` layout): for every active input channel k, in four
  rows per pass, ``acc[block b] += (x_k scale_kb) * q_k[b] [+ x_k min_kb]``.

Every kernel takes a weight as ``(codes, scales, mins)`` numpy arrays (``mins`` an empty
(0, 0) float32 array for int8); the codes' dtype (int8 or uint8) picks the format at compile
time. ``x`` is float32 or uint16 (bf16 bits), ``out`` float32 or uint16 (rounded to bf16 as
torch does). Thresholds and selections follow :mod:`actsparse.kernels.numba_cpu`. Shapes are
checked by the torch-facing wrappers (:mod:`actsparse.kernels.quant_dispatch`), not here.
"""
from __future__ import annotations

import actsparse.numba_backend  # noqa: F401  (cache directory set before numba loads)
import numpy as np
from numba import njit, prange, types
from llvmlite import ir
from numba.extending import intrinsic, overload

from actsparse.kernels.primitives import JIT, activate, chunk, chunk_aligned, compact, store, to_f32, widen

__all__ = ["q_dense_gemv", "q_output_sparse_gemv", "q_output_sparse_gemv_rows", "q_input_sparse_gemv",
           "q_gated_mlp", "QKERNELS"]

B = 32  # quant_formats.BLOCK (a literal here so that the inner loops have a constant trip count)
H = 16


# ---------------------------------------------------------------------------
# nibble unpacking (LLVM intrinsics on 32-bit lanes: numba's own integer ops widen to int64,
# which vectorises on half-width lanes)
# ---------------------------------------------------------------------------
def _nibble(shift: int):
    def gen(typingctx, v):
        if v != types.uint8:
            return None

        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            w = builder.zext(args[0], i32)
            if shift:
                w = builder.lshr(w, ir.Constant(i32, shift))
            w = builder.and_(w, ir.Constant(i32, 15))
            return builder.uitofp(w, ir.FloatType())

        return types.float32(v), codegen

    return gen


lo4 = intrinsic(_nibble(0))  # float32 of the low nibble of a uint8
lo4.__doc__ = "float32(b & 15) of a uint8 code byte (element j of its block)."
hi4 = intrinsic(_nibble(4))
hi4.__doc__ = "float32(b >> 4) of a uint8 code byte (element j + 16 of its block)."


# ---------------------------------------------------------------------------
# row dot products (rows layout)
# ---------------------------------------------------------------------------
@njit(inline="always", **JIT)
def block_sums(xf):
    """xs[b] = sum of block b of xf (the q4 min term's factor)."""
    nb = xf.shape[0] // B
    xs = np.empty(nb, np.float32)
    for b in range(nb):
        s = np.float32(0.0)
        for j in range(B):
            s += xf[b * B + j]
        xs[b] = s
    return xs


@njit(**JIT)
def i8_dot(codes, scales, i, xf):
    """Row i of an int8 matrix . xf: per block, the code products summed, then scaled."""
    r, c = codes[i], scales[i]
    t = np.float32(0.0)
    for b in range(scales.shape[1]):
        o = b * B
        p = np.float32(0.0)
        for j in range(B):
            p += np.float32(r[o + j]) * xf[o + j]
        t += p * c[b]
    return t


@njit(**JIT)
def q4_dot(codes, scales, mins, i, xf, xs):
    """Row i of a q4 matrix . xf: per block, the low nibbles meet x[0:16], the high x[16:32];
    plus min * (the block sum of x, ``xs``)."""
    r, c, m = codes[i], scales[i], mins[i]
    t = np.float32(0.0)
    for b in range(scales.shape[1]):
        o = b * B
        ob = b * H
        p = np.float32(0.0)
        for j in range(H):
            w = r[ob + j]
            p += lo4(w) * xf[o + j] + hi4(w) * xf[o + H + j]
        t += p * c[b] + m[b] * xs[b]
    return t


def qdot_rows(codes, scales, mins, rows, k0, k1, xf, xs, res):  # pragma: no cover - jit overload below
    raise NotImplementedError


@overload(qdot_rows, jit_options=dict(JIT))
def _qdot_rows_overload(codes, scales, mins, rows, k0, k1, xf, xs, res):
    """res[k] = W[rows[k]] . xf for k0 <= k < k1, one row at a time; the codes' dtype picks the format.

    One row per pass, as the fp dense dot (:func:`actsparse.kernels.primitives.dot_rows`): one
    sequential weight stream instead of four short ones. Not yet timed against the four
    interleaved rows it replaces (git history: ``i8_dot4`` / ``q4_dot4``)."""
    if codes.dtype == types.int8:

        def impl(codes, scales, mins, rows, k0, k1, xf, xs, res):
            for k in range(k0, k1):
                res[k] = i8_dot(codes, scales, rows[k], xf)

        return impl
    if codes.dtype == types.uint8:

        def impl(codes, scales, mins, rows, k0, k1, xf, xs, res):
            for k in range(k0, k1):
                res[k] = q4_dot(codes, scales, mins, rows[k], xf, xs)

        return impl
    return None


# ---------------------------------------------------------------------------
# input-sparse accumulation (transposed layout)
# ---------------------------------------------------------------------------
@njit(**JIT)
def i8_accumulate_rows(codes, scales, idx, vals, k0, k1, acc):
    """acc[:] = sum_{k0 <= k < k1} vals[k] * M[idx[k], :] for int8 M, four rows per pass."""
    N = acc.shape[0]
    nb = N // B
    for j in range(N):
        acc[j] = 0.0
    k = k0
    while k + 4 <= k1:
        r0, r1, r2, r3 = codes[idx[k]], codes[idx[k + 1]], codes[idx[k + 2]], codes[idx[k + 3]]
        c0, c1, c2, c3 = scales[idx[k]], scales[idx[k + 1]], scales[idx[k + 2]], scales[idx[k + 3]]
        v0, v1, v2, v3 = vals[k], vals[k + 1], vals[k + 2], vals[k + 3]
        for b in range(nb):
            a0, a1, a2, a3 = v0 * c0[b], v1 * c1[b], v2 * c2[b], v3 * c3[b]
            o = b * B
            for j in range(B):
                acc[o + j] += (a0 * np.float32(r0[o + j]) + a1 * np.float32(r1[o + j])) + (
                    a2 * np.float32(r2[o + j]) + a3 * np.float32(r3[o + j]))
        k += 4
    while k < k1:
        r0 = codes[idx[k]]
        c0 = scales[idx[k]]
        v0 = vals[k]
        for b in range(nb):
            a0 = v0 * c0[b]
            o = b * B
            for j in range(B):
                acc[o + j] += a0 * np.float32(r0[o + j])
        k += 1


@njit(**JIT)
def q4_accumulate_rows(codes, scales, mins, idx, vals, k0, k1, acc):
    """acc[:] = sum_{k0 <= k < k1} vals[k] * M[idx[k], :] for q4 M, four rows per pass."""
    N = acc.shape[0]
    nb = N // B
    for j in range(N):
        acc[j] = 0.0
    k = k0
    while k + 4 <= k1:
        i0, i1, i2, i3 = idx[k], idx[k + 1], idx[k + 2], idx[k + 3]
        r0, r1, r2, r3 = codes[i0], codes[i1], codes[i2], codes[i3]
        c0, c1, c2, c3 = scales[i0], scales[i1], scales[i2], scales[i3]
        m0, m1, m2, m3 = mins[i0], mins[i1], mins[i2], mins[i3]
        v0, v1, v2, v3 = vals[k], vals[k + 1], vals[k + 2], vals[k + 3]
        for b in range(nb):
            a0, a1, a2, a3 = v0 * c0[b], v1 * c1[b], v2 * c2[b], v3 * c3[b]
            cm = (v0 * m0[b] + v1 * m1[b]) + (v2 * m2[b] + v3 * m3[b])
            o = b * B
            ob = b * H
            for j in range(H):
                w0, w1, w2, w3 = r0[ob + j], r1[ob + j], r2[ob + j], r3[ob + j]
                acc[o + j] += ((a0 * lo4(w0) + a1 * lo4(w1))
                               + (a2 * lo4(w2) + a3 * lo4(w3))) + cm
                acc[o + H + j] += ((a0 * hi4(w0) + a1 * hi4(w1))
                                   + (a2 * hi4(w2) + a3 * hi4(w3))) + cm
        k += 4
    while k < k1:
        i0 = idx[k]
        r0, c0, m0 = codes[i0], scales[i0], mins[i0]
        v0 = vals[k]
        for b in range(nb):
            a0 = v0 * c0[b]
            cm = v0 * m0[b]
            o = b * B
            ob = b * H
            for j in range(H):
                w0 = r0[ob + j]
                acc[o + j] += a0 * lo4(w0) + cm
                acc[o + H + j] += a0 * hi4(w0) + cm
        k += 1


def qaccumulate_rows(codes, scales, mins, idx, vals, k0, k1, acc):  # pragma: no cover - jit overload below
    raise NotImplementedError


@overload(qaccumulate_rows, jit_options=dict(JIT))
def _qaccumulate_rows_overload(codes, scales, mins, idx, vals, k0, k1, acc):
    if codes.dtype == types.int8:

        def impl(codes, scales, mins, idx, vals, k0, k1, acc):
            i8_accumulate_rows(codes, scales, idx, vals, k0, k1, acc)

        return impl
    if codes.dtype == types.uint8:

        def impl(codes, scales, mins, idx, vals, k0, k1, acc):
            q4_accumulate_rows(codes, scales, mins, idx, vals, k0, k1, acc)

        return impl
    return None


@njit(parallel=True, **JIT)
def _q_sparse_rows_matvec(codes, scales, mins, idx, vals, n, out, nthreads):
    """out = sum_{k<n} vals[k] * M[idx[k], :], active rows split over threads (per-thread fp32
    accumulators), then a column-parallel reduction (as numba_cpu's input-sparse GEMV)."""
    N = scales.shape[1] * B
    part = np.empty((nthreads, N), np.float32)
    for t in prange(nthreads):
        k0, k1 = chunk(t, nthreads, n)
        qaccumulate_rows(codes, scales, mins, idx, vals, k0, k1, part[t])
    for t in prange(nthreads):
        j0, j1 = chunk_aligned(t, nthreads, N)
        for u in range(1, nthreads):
            for j in range(j0, j1):
                part[0, j] += part[u, j]
        for j in range(j0, j1):
            store(out, j, part[0, j])


# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------
@njit(parallel=True, **JIT)
def _q_rows_out(xf, xs, codes, scales, mins, idx, vals, n, use_scale, out, nthreads):
    """out[idx[k]] = M[idx[k]] . xf (times vals[k] if use_scale) for k < n, others 0."""
    M = scales.shape[0]
    d = np.empty(n, np.float32)
    y = np.zeros(M, np.float32)
    for t in prange(nthreads):
        k0, k1 = chunk(t, nthreads, n)
        qdot_rows(codes, scales, mins, idx, k0, k1, xf, xs, d)
        for k in range(k0, k1):
            y[idx[k]] = d[k] * vals[k] if use_scale else d[k]
    for t in prange(nthreads):
        j0, j1 = chunk_aligned(t, nthreads, M)
        for i in range(j0, j1):
            store(out, i, y[i])


@njit(**JIT)
def q_dense_gemv(x, codes, scales, mins, out, nthreads):
    """Dense out = W @ x on the rows layout (rows split over threads)."""
    M = scales.shape[0]
    xf = widen(x)
    xs = block_sums(xf)
    idx = np.arange(M)
    _q_rows_out(xf, xs, codes, scales, mins, idx, np.empty(0, np.float32), M, False, out, nthreads)


@njit(**JIT)
def q_output_sparse_gemv(x, codes, scales, mins, sel, use_scale, out, nthreads):
    """out[i] = W[i] . x (times sel[i] if use_scale) where sel[i] != 0, else 0 (rows layout).
    sel: (M,) float32 values or uint8 mask. Returns the number of active rows."""
    M = scales.shape[0]
    xf = widen(x)
    xs = block_sums(xf)
    idx = np.empty(M, np.int64)
    vals = np.empty(M, np.float32)
    n = 0
    for i in range(M):
        v = np.float32(sel[i])
        idx[n] = i
        vals[n] = v
        n += 1 if v != 0.0 else 0
    _q_rows_out(xf, xs, codes, scales, mins, idx, vals, n, use_scale, out, nthreads)
    return n


@njit(**JIT)
def q_output_sparse_gemv_rows(x, codes, scales, mins, rows, out, nthreads):
    """out[i] = W[i] . x for i in rows (int64, in range), 0 elsewhere (rows layout)."""
    xf = widen(x)
    xs = block_sums(xf)
    n = rows.shape[0]
    _q_rows_out(xf, xs, codes, scales, mins, rows, np.empty(0, np.float32), n, False, out, nthreads)
    return n


@njit(**JIT)
def q_input_sparse_gemv(x, codes, scales, mins, thr, ts, out, nthreads):
    """out[j] = sum_{i: |x_i| > thr[i*ts]} x_i * W^T[i, j] on the transposed layout
    (M = W^T, in x out); returns the active count."""
    K = x.shape[0]
    idx = np.empty(K, np.int64)
    vals = np.empty(K, np.float32)
    n = compact(x, thr, ts, idx, vals)
    _q_sparse_rows_matvec(codes, scales, mins, idx, vals, n, out, nthreads)
    return n


@njit(parallel=True, **JIT)
def _q_gate_act(xf, xs, codes, scales, mins, act_code, a, nthreads):
    F = scales.shape[0]
    rows = np.arange(F)
    for t in prange(nthreads):
        i0, i1 = chunk(t, nthreads, F)
        qdot_rows(codes, scales, mins, rows, i0, i1, xf, xs, a)
        for i in range(i0, i1):
            a[i] = activate(a[i], act_code)


@njit(parallel=True, **JIT)
def _q_up_mul(xf, xs, codes, scales, mins, idx, vals, n, nthreads):
    u = np.empty(n, np.float32)
    for t in prange(nthreads):
        k0, k1 = chunk(t, nthreads, n)
        qdot_rows(codes, scales, mins, idx, k0, k1, xf, xs, u)
        for k in range(k0, k1):
            vals[k] *= u[k]


@njit(**JIT)
def q_gated_mlp(x, gc, gs, gm, uc, us, um, dc, ds, dm, thr, ts, act_code, out, nthreads):
    """One token of a gated MLP with CATS/CHESS thresholding on quantised weights; returns #kept.

    gate (gc, gs, gm) and up (uc, us, um): rows layout (F x D, blocks along D); down
    (dc, ds, dm): transposed layout (W_down^T, F x D, blocks along D). a = act(W_gate x);
    neuron i kept iff |a_i| > thr[i*ts]; h_i = a_i (W_up[i] . x); out = sum_i h_i W_down^T[i, :]."""
    F = gs.shape[0]
    xf = widen(x)
    xs = block_sums(xf)
    a = np.empty(F, np.float32)
    _q_gate_act(xf, xs, gc, gs, gm, act_code, a, nthreads)
    idx = np.empty(F, np.int64)
    vals = np.empty(F, np.float32)
    n = compact(a, thr, ts, idx, vals)
    _q_up_mul(xf, xs, uc, us, um, idx, vals, n, nthreads)
    _q_sparse_rows_matvec(dc, ds, dm, idx, vals, n, out, nthreads)
    return n


QKERNELS = {
    "q_dense_gemv": q_dense_gemv,
    "q_output_sparse_gemv": q_output_sparse_gemv,
    "q_output_sparse_gemv_rows": q_output_sparse_gemv_rows,
    "q_input_sparse_gemv": q_input_sparse_gemv,
    "q_gated_mlp": q_gated_mlp,
}
