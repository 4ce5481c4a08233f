"""Numba CPU kernels on block-quantised weights (int8, q4; formats in
:mod:`actsparse.kernels.quant_formats`): dense, output-sparse and input-sparse GEMV and the
fused gated-MLP step, batch 1, fp32 accumulation, 1..N threads.

The kernels read the packed codes directly (no matrix is ever dequantised); one block of 32
is widened in registers and reduced:

- row dot products (``rows`` layout): ``y_i = sum_b scale_ib * (sum_j q_ij x_j) [+ min_ib * sum_j x_j]``,
  with the per-block sums of x computed once per call (q4's ``min`` term);
- input-sparse accumulation (``transposed`` layout): for every active input channel k, in eight
  rows per pass, ``acc[block b] += (x_k scale_kb) * q_k[b] [+ x_k min_kb]``.

Every kernel takes a weight as ``(codes, scales, mins)`` numpy arrays, scales and mins the
uint16 bits of fp16 values (``mins`` an empty (0, 0) array for int8; :meth:`QuantWeight.numpy`);
the codes' dtype (int8 or uint8) picks the format at compile time. A row dot first widens its
row's scales into a small fp32 buffer (``cs``, one per call), so that the element loop looks
up fp32 values. ``x`` is float32 or uint16 (bf16 bits), ``out`` float32 or uint16 (rounded to bf16 as
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


@intrinsic
def h2f(typingctx, v):
    """float32 of the fp16 whose bits a uint16 holds (``vcvtph2ps`` once vectorised)."""
    if v != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        h = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(h, ir.FloatType())

    return types.float32(v), codegen


lo4 = intrinsic(_nibble(0))  # float32 of the low nibble of a uint8
lo4.__doc__ = "float32(b & 15) of a uint8 code byte (element j of its block)."
hi4 = intrinsic(_nibble(4))
hi4.__doc__ = "float32(b >> 4) of a uint8 code byte (element j + 16 of its block)."


# ---------------------------------------------------------------------------
# row dot products (rows layout)
# ---------------------------------------------------------------------------
@njit(inline="always", **JIT)
def q4_prepare(xf):
    """x in the order of q4's packed codes, once per GEMV: ``xq = [lo | hi | sums]`` with
    ``lo[16b + j] = x[32b + j]``, ``hi[16b + j] = x[32b + 16 + j]`` (the elements of byte
    16b + j's low and high nibble) and ``sums[b]`` = the sum of block b (the min term's factor),
    so that the row dot is one flat loop over the code bytes."""
    K = xf.shape[0]
    nb = K // B
    half = K // 2
    xq = np.empty(K + nb, np.float32)
    for b in range(nb):
        s = np.float32(0.0)
        for j in range(H):
            lo, hi = xf[b * B + j], xf[b * B + H + j]
            xq[b * H + j] = lo
            xq[half + b * H + j] = hi
            s += lo + hi
        xq[K + b] = s
    return xq


@njit(inline="always", **JIT)
def prepare_x(xf, mins):
    """What the row dots of a weight with these ``mins`` read besides ``xf``: q4's
    :func:`q4_prepare` (mins present), nothing for int8 (an empty (0, 0) mins)."""
    if mins.shape[0] > 0:
        return q4_prepare(xf)
    return np.empty(0, np.float32)


# The row dots are one flat loop over the row with the block's scale looked up per element
# (``c[k >> 5]``): written as blocks with an inner loop of 32, LLVM vectorises the loop over the
# blocks instead (gathers of codes 32 bytes apart) and the kernel took 6-9x longer per token
# than bf16 (measured here, AMD EPYC, SmolLM2's linears, cold, one thread: int8 2.4 -> 25 GB/s,
# q4 2.3 -> 18.5 GB/s of codes + scales + mins).
@njit(inline="always", **JIT)
def row_scales(scales, i, cs):
    """cs[:] = the fp32 values of row i's fp16 scales."""
    c = scales[i]
    for b in range(cs.shape[0]):
        cs[b] = h2f(c[b])


@njit(inline="always", **JIT)
def i8_dot(codes, scales, i, xf, cs):
    """Row i of an int8 matrix . xf (``cs``: an fp32 scratch of one scale per block)."""
    r = codes[i]
    row_scales(scales, i, cs)
    s = np.float32(0.0)
    for k in range(codes.shape[1]):
        s += np.float32(r[k]) * xf[k] * cs[k >> 5]
    return s


@njit(inline="always", **JIT)
def q4_dot(codes, scales, mins, i, xq, cs):
    """Row i of a q4 matrix . x, with ``xq = q4_prepare(x)``: low nibbles meet ``lo``, high
    nibbles ``hi``; plus min * (the block sums of x). ``cs``: as :func:`i8_dot`."""
    r, m = codes[i], mins[i]
    row_scales(scales, i, cs)
    half = codes.shape[1]
    xl, xh, xs = xq[:half], xq[half:2 * half], xq[2 * half:]
    s = np.float32(0.0)
    for kb in range(half):
        w = r[kb]
        s += (lo4(w) * xl[kb] + hi4(w) * xh[kb]) * cs[kb >> 4]
    t = np.float32(0.0)
    for b in range(scales.shape[1]):
        t += h2f(m[b]) * xs[b]
    return s + t


def qdot_rows(codes, scales, mins, rows, k0, k1, xf, xq, res):  # pragma: no cover - jit overload below
    raise NotImplementedError


@overload(qdot_rows, jit_options=dict(JIT))
def _qdot_rows_overload(codes, scales, mins, rows, k0, k1, xf, xq, res):
    """res[k] = W[rows[k]] . x for k0 <= k < k1, one row at a time (one sequential weight
    stream, as the fp dense dot :func:`actsparse.kernels.primitives.dot_rows`); the codes' dtype
    picks the format. int8 reads ``xf``, q4 ``xq = q4_prepare(xf)``."""
    if codes.dtype == types.int8:

        def impl(codes, scales, mins, rows, k0, k1, xf, xq, res):
            cs = np.empty(scales.shape[1], np.float32)
            for k in range(k0, k1):
                res[k] = i8_dot(codes, scales, rows[k], xf, cs)

        return impl
    if codes.dtype == types.uint8:

        def impl(codes, scales, mins, rows, k0, k1, xf, xq, res):
            cs = np.empty(scales.shape[1], np.float32)
            for k in range(k0, k1):
                res[k] = q4_dot(codes, scales, mins, rows[k], xq, cs)

        return impl
    return None


# ---------------------------------------------------------------------------
# input-sparse accumulation (transposed layout)
# ---------------------------------------------------------------------------
# Eight rows per pass: a transposed row is short (out features bytes for int8, half that for
# q4, plus its scales), so more rows in flight keep more misses outstanding (int8, SmolLM2's
# linears at 50%, cold, one thread: 8.4 GB/s with four rows, 11.1 with eight).
@njit(**JIT)
def i8_accumulate_rows(codes, scales, idx, vals, k0, k1, acc):
    """acc[:] = sum_{k0 <= k < k1} vals[k] * M[idx[k], :] for int8 M, eight rows per pass."""
    N = acc.shape[0]
    nb = N // B
    for j in range(N):
        acc[j] = 0.0
    k = k0
    while k + 8 <= k1:
        i0, i1, i2, i3, i4, i5, i6, i7 = (idx[k], idx[k + 1], idx[k + 2], idx[k + 3], idx[k + 4], idx[k + 5],
                                          idx[k + 6], idx[k + 7])
        r0, r1, r2, r3, r4, r5, r6, r7 = codes[i0], codes[i1], codes[i2], codes[i3], codes[i4], codes[i5], codes[i6], codes[i7]
        c0, c1, c2, c3 = scales[i0], scales[i1], scales[i2], scales[i3]
        c4, c5, c6, c7 = scales[i4], scales[i5], scales[i6], scales[i7]
        v0, v1, v2, v3 = vals[k], vals[k + 1], vals[k + 2], vals[k + 3]
        v4, v5, v6, v7 = vals[k + 4], vals[k + 5], vals[k + 6], vals[k + 7]
        for b in range(nb):
            a0, a1, a2, a3 = v0 * h2f(c0[b]), v1 * h2f(c1[b]), v2 * h2f(c2[b]), v3 * h2f(c3[b])
            a4, a5, a6, a7 = v4 * h2f(c4[b]), v5 * h2f(c5[b]), v6 * h2f(c6[b]), v7 * h2f(c7[b])
            o = b * B
            for j in range(o, o + B):
                acc[j] += ((a0 * np.float32(r0[j]) + a1 * np.float32(r1[j]))
                           + (a2 * np.float32(r2[j]) + a3 * np.float32(r3[j]))) + (
                    (a4 * np.float32(r4[j]) + a5 * np.float32(r5[j]))
                    + (a6 * np.float32(r6[j]) + a7 * np.float32(r7[j])))
        k += 8
    while k < k1:
        r0 = codes[idx[k]]
        c0 = scales[idx[k]]
        v0 = vals[k]
        for b in range(nb):
            a0 = v0 * h2f(c0[b])
            for j in range(b * B, b * B + B):
                acc[j] += a0 * np.float32(r0[j])
        k += 1


@njit(**JIT)
def q4_accumulate_rows(codes, scales, mins, idx, vals, k0, k1, acc):
    """acc[:] = sum_{k0 <= k < k1} vals[k] * M[idx[k], :] for q4 M, eight rows per pass.

    Each pass first forms the eight rows' scaled block scales ``a[u, b] = vals * scale`` and adds
    their min terms into one per-block sum (both vectorised loops over the blocks); the code loop
    then only widens, scales and adds, and the min sum is added once at the end (11008x4096 at 50%,
    one thread: 13.1 -> 14.3 GB/s, at 90% 17.6 -> 21.4, against the scalars formed per block)."""
    N = acc.shape[0]
    nb = N // B
    a = np.empty((8, nb), np.float32)
    cm = np.zeros(nb, np.float32)
    for j in range(N):
        acc[j] = 0.0
    k = k0
    while k + 8 <= k1:
        for u in range(8):
            r = idx[k + u]
            v = vals[k + u]
            c, m = scales[r], mins[r]
            for b in range(nb):
                a[u, b] = v * h2f(c[b])
                cm[b] += v * h2f(m[b])
        r0, r1, r2, r3 = codes[idx[k]], codes[idx[k + 1]], codes[idx[k + 2]], codes[idx[k + 3]]
        r4, r5, r6, r7 = codes[idx[k + 4]], codes[idx[k + 5]], codes[idx[k + 6]], codes[idx[k + 7]]
        for b in range(nb):
            a0, a1, a2, a3 = a[0, b], a[1, b], a[2, b], a[3, b]
            a4, a5, a6, a7 = a[4, b], a[5, b], a[6, b], a[7, b]
            o = b * B
            ob = b * H
            for j in range(H):
                w0, w1, w2, w3 = r0[ob + j], r1[ob + j], r2[ob + j], r3[ob + j]
                w4, w5, w6, w7 = r4[ob + j], r5[ob + j], r6[ob + j], r7[ob + j]
                acc[o + j] += ((a0 * lo4(w0) + a1 * lo4(w1)) + (a2 * lo4(w2) + a3 * lo4(w3))) + (
                    (a4 * lo4(w4) + a5 * lo4(w5)) + (a6 * lo4(w6) + a7 * lo4(w7)))
                acc[o + H + j] += ((a0 * hi4(w0) + a1 * hi4(w1)) + (a2 * hi4(w2) + a3 * hi4(w3))) + (
                    (a4 * hi4(w4) + a5 * hi4(w5)) + (a6 * hi4(w6) + a7 * hi4(w7)))
        k += 8
    while k < k1:
        i0 = idx[k]
        r0, c0, m0 = codes[i0], scales[i0], mins[i0]
        v0 = vals[k]
        for b in range(nb):
            a0 = v0 * h2f(c0[b])
            cm[b] += v0 * h2f(m0[b])
            o = b * B
            ob = b * H
            for j in range(H):
                w0 = r0[ob + j]
                acc[o + j] += a0 * lo4(w0)
                acc[o + H + j] += a0 * hi4(w0)
        k += 1
    for b in range(nb):
        for j in range(b * B, b * B + B):
            acc[j] += cm[b]


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
def _q_rows_out(xf, xq, codes, scales, mins, idx, vals, n, use_scale, out, nthreads):
    """out[idx[k]] = M[idx[k]] . xf (times vals[k] if use_scale) for k < n, others 0."""
    M = scales.shape[0]
    d = np.empty(n, np.float32)
    y = np.zeros(M, np.float32)
    for t in prange(nthreads):
        k0, k1 = chunk(t, nthreads, n)
        qdot_rows(codes, scales, mins, idx, k0, k1, xf, xq, d)
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
    xq = prepare_x(xf, mins)
    idx = np.arange(M)
    _q_rows_out(xf, xq, codes, scales, mins, idx, np.empty(0, np.float32), M, False, out, nthreads)


@njit(**JIT)
def q_output_sparse_gemv(x, codes, scales, mins, sel, use_scale, out, nthreads):
    """out[i] = W[i] . x (times sel[i] if use_scale) where sel[i] != 0, else 0 (rows layout).
    sel: (M,) float32 values or uint8 mask. Returns the number of active rows."""
    M = scales.shape[0]
    xf = widen(x)
    xq = prepare_x(xf, mins)
    idx = np.empty(M, np.int64)
    vals = np.empty(M, np.float32)
    n = 0
    for i in range(M):
        v = np.float32(sel[i])
        idx[n] = i
        vals[n] = v
        n += 1 if v != 0.0 else 0
    _q_rows_out(xf, xq, codes, scales, mins, idx, vals, n, use_scale, out, nthreads)
    return n


@njit(**JIT)
def q_output_sparse_gemv_rows(x, codes, scales, mins, rows, out, nthreads):
    """out[i] = W[i] . x for i in rows (int64, in range), 0 elsewhere (rows layout)."""
    xf = widen(x)
    xq = prepare_x(xf, mins)
    n = rows.shape[0]
    _q_rows_out(xf, xq, codes, scales, mins, rows, np.empty(0, np.float32), n, False, out, nthreads)
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
def _q_gate_act(xf, xq, codes, scales, mins, act_code, a, nthreads):
    F = scales.shape[0]
    rows = np.arange(F)
    for t in prange(nthreads):
        i0, i1 = chunk(t, nthreads, F)
        qdot_rows(codes, scales, mins, rows, i0, i1, xf, xq, a)
        for i in range(i0, i1):
            a[i] = activate(a[i], act_code)


@njit(parallel=True, **JIT)
def _q_up_mul(xf, xq, codes, scales, mins, idx, vals, n, nthreads):
    u = np.empty(n, np.float32)
    for t in prange(nthreads):
        k0, k1 = chunk(t, nthreads, n)
        qdot_rows(codes, scales, mins, idx, k0, k1, xf, xq, u)
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
    xq = prepare_x(xf, gm)
    a = np.empty(F, np.float32)
    _q_gate_act(xf, xq, gc, gs, gm, act_code, a, nthreads)
    idx = np.empty(F, np.int64)
    vals = np.empty(F, np.float32)
    n = compact(a, thr, ts, idx, vals)
    _q_up_mul(xf, xq, uc, us, um, idx, vals, n, nthreads)
    _q_sparse_rows_matvec(dc, ds, dm, idx, vals, n, out, nthreads)
    return n


QKERNELS = {
    "q_dense_gemv": q_dense_gemv,
    "q_output_sparse_gemv": q_output_sparse_gemv,
    "q_output_sparse_gemv_rows": q_output_sparse_gemv_rows,
    "q_input_sparse_gemv": q_input_sparse_gemv,
    "q_gated_mlp": q_gated_mlp,
}
