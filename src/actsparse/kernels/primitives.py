"""Public numba building blocks of every CPU kernel: bf16 widening and rounding, branch-free
compaction of active entries, row accumulation, row dot products, thread chunking and the
MLP activations. The GEMV kernels (:mod:`actsparse.kernels.numba_cpu`) and the compiled
decode step (:mod:`actsparse.decode.step`) are written with these.

Conventions:

- Weight storage follows :mod:`actsparse.kernels.formats`: fp32 arrays, or uint16 arrays
  holding bf16 bits, widened to fp32 by :func:`to_f32`; results are rounded back to bf16
  with round-to-nearest-even by :func:`store`, as torch does. All accumulation is fp32.
- Thresholds are arrays; a scalar threshold is an array of length 1 and a per-channel one
  has one entry per channel (``ts`` = 0 or 1 picks the stride).
- Active-index compaction is branch-free, there is no ``nonzero``.
- Functions that take ``nthreads`` split their work over that many threads; the caller
  sets ``numba.set_num_threads`` (see :func:`actsparse.numba_backend.kernel_threads`).
"""
from __future__ import annotations

import math

import actsparse.numba_backend  # noqa: F401  (cache directory set before numba loads)
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

JIT = dict(cache=True, fastmath=True, boundscheck=False, nogil=True, error_model="numpy")


# ---------------------------------------------------------------------------
# bit-level helpers (LLVM intrinsics so that they vectorise)
# ---------------------------------------------------------------------------
@intrinsic
def to_f32(typingctx, v):
    """Widen one element to fp32: uint16/int16 hold bf16 bits; floats are cast."""
    if isinstance(v, types.Integer) and v.bitwidth == 16:

        def codegen(context, builder, sig, args):
            w = builder.zext(args[0], ir.IntType(32))
            w = builder.shl(w, ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(w, ir.FloatType())

        return types.float32(v), codegen
    if v == types.float32:

        def codegen(context, builder, sig, args):
            return args[0]

        return types.float32(v), codegen
    if v == types.float64:

        def codegen(context, builder, sig, args):
            return builder.fptrunc(args[0], ir.FloatType())

        return types.float32(v), codegen
    return None


@intrinsic
def f32_to_bf16(typingctx, f):
    """fp32 -> bf16 bits (uint16), round to nearest even, NaN -> quiet NaN (0x7FC0
    with the sign kept); integer-only IR so that it vectorises under fastmath."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        b = builder.bitcast(args[0], i32)
        lsb = builder.and_(builder.lshr(b, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        r = builder.add(builder.add(b, ir.Constant(i32, 0x7FFF)), lsb)
        r = builder.lshr(r, ir.Constant(i32, 16))
        qnan = builder.or_(builder.lshr(b, ir.Constant(i32, 16)), ir.Constant(i32, 0x0040))
        mag = builder.and_(b, ir.Constant(i32, 0x7FFFFFFF))
        is_nan = builder.icmp_unsigned(">", mag, ir.Constant(i32, 0x7F800000))
        r = builder.select(is_nan, qnan, r)
        return builder.trunc(r, ir.IntType(16))

    return types.uint16(f), codegen


def store(out, j, v):  # pragma: no cover - replaced by the overload in jit code
    raise NotImplementedError


@overload(store, inline="always", jit_options=dict(JIT))
def _store_overload(out, j, v):
    """out[j] = v, rounding to bf16 bits when out is a uint16 array."""
    if isinstance(out, types.Array) and out.dtype == types.uint16:

        def impl(out, j, v):
            out[j] = f32_to_bf16(np.float32(v))

        return impl

    def impl(out, j, v):
        out[j] = v

    return impl


# ---------------------------------------------------------------------------
# compaction, accumulation, reduction
# ---------------------------------------------------------------------------
@njit(inline="always", **JIT)
def compact(x, thr, ts, idx, vals):
    """Branch-free: idx/vals[:n] = positions/values of x with |x_i| > thr[i*ts]."""
    n = 0
    for i in range(x.shape[0]):
        v = to_f32(x[i])
        idx[n] = i
        vals[n] = v
        n += 1 if abs(v) > thr[i * ts] else 0
    return n


@njit(**JIT)
def accumulate_rows(wt, idx, vals, k0, k1, acc):
    """acc[:] = sum_{k0 <= k < k1} vals[k] * wt[idx[k], :], eight rows per pass.

    Eight weight rows are streamed at once (eight hardware-prefetch streams, one
    load/store of the accumulator per eight FMAs)."""
    m = acc.shape[0]
    for j in range(m):
        acc[j] = 0.0
    k = k0
    while k + 8 <= k1:
        r0 = wt[idx[k]]
        r1 = wt[idx[k + 1]]
        r2 = wt[idx[k + 2]]
        r3 = wt[idx[k + 3]]
        r4 = wt[idx[k + 4]]
        r5 = wt[idx[k + 5]]
        r6 = wt[idx[k + 6]]
        r7 = wt[idx[k + 7]]
        v0 = vals[k]
        v1 = vals[k + 1]
        v2 = vals[k + 2]
        v3 = vals[k + 3]
        v4 = vals[k + 4]
        v5 = vals[k + 5]
        v6 = vals[k + 6]
        v7 = vals[k + 7]
        for j in range(m):
            acc[j] += (
                (v0 * to_f32(r0[j]) + v1 * to_f32(r1[j]))
                + (v2 * to_f32(r2[j]) + v3 * to_f32(r3[j]))
            ) + (
                (v4 * to_f32(r4[j]) + v5 * to_f32(r5[j]))
                + (v6 * to_f32(r6[j]) + v7 * to_f32(r7[j]))
            )
        k += 8
    if k + 4 <= k1:
        r0 = wt[idx[k]]
        r1 = wt[idx[k + 1]]
        r2 = wt[idx[k + 2]]
        r3 = wt[idx[k + 3]]
        v0 = vals[k]
        v1 = vals[k + 1]
        v2 = vals[k + 2]
        v3 = vals[k + 3]
        for j in range(m):
            acc[j] += (v0 * to_f32(r0[j]) + v1 * to_f32(r1[j])) + (
                v2 * to_f32(r2[j]) + v3 * to_f32(r3[j])
            )
        k += 4
    while k < k1:
        r0 = wt[idx[k]]
        v0 = vals[k]
        for j in range(m):
            acc[j] += v0 * to_f32(r0[j])
        k += 1


@njit(inline="always", **JIT)
def chunk(t, nt, n):
    return (n * t) // nt, (n * (t + 1)) // nt


@njit(inline="always", **JIT)
def chunk_aligned(t, nt, n):
    """Split range(n) in nt chunks whose bounds are multiples of 64 elements."""
    width = (n + nt - 1) // nt
    width = ((width + 63) // 64) * 64
    j0 = min(n, t * width)
    j1 = min(n, j0 + width)
    return j0, j1


@njit(**JIT)
def accumulate_runs(wt, idx, vals, k0, k1, acc):
    """acc[:] = sum_{k0 <= k < k1} vals[k] * wt[idx[k], :], one row per pass.

    For rows that come in contiguous runs (expert blocks): the rows then stream as one
    sequence, which one row per pass reads at the dense dot's speed, where eight
    interleaved rows (:func:`accumulate_rows`, better for scattered rows) read about two
    thirds of it (measured here, SmolLM2's 576-wide bf16 rows, one thread, cold: 21.7
    against 13.7 GB/s)."""
    m = acc.shape[0]
    for j in range(m):
        acc[j] = 0.0
    for k in range(k0, k1):
        r0 = wt[idx[k]]
        v0 = vals[k]
        for j in range(m):
            acc[j] += v0 * to_f32(r0[j])


@njit(parallel=True, **JIT)
def _reduce_parts(part, out, nthreads):
    """out = sum of the per-thread accumulators part[t], column blocks split over threads."""
    N = part.shape[1]
    for t in prange(nthreads):
        j0, j1 = chunk_aligned(t, nthreads, N)
        for u in range(1, nthreads):
            for j in range(j0, j1):
                part[0, j] += part[u, j]
        for j in range(j0, j1):
            store(out, j, part[0, j])


@njit(parallel=True, **JIT)
def sparse_rows_matvec(wt, idx, vals, n, out, nthreads):
    """out = sum_{k<n} vals[k] * wt[idx[k], :] with the active rows split over
    threads (per-thread fp32 accumulators), then a column-parallel reduction."""
    part = np.empty((nthreads, wt.shape[1]), np.float32)
    for t in prange(nthreads):
        k0, k1 = chunk(t, nthreads, n)
        accumulate_rows(wt, idx, vals, k0, k1, part[t])
    _reduce_parts(part, out, nthreads)


@njit(parallel=True, **JIT)
def runs_matvec(wt, idx, vals, n, out, nthreads):
    """:func:`sparse_rows_matvec` for rows in contiguous runs (:func:`accumulate_runs`)."""
    part = np.empty((nthreads, wt.shape[1]), np.float32)
    for t in prange(nthreads):
        k0, k1 = chunk(t, nthreads, n)
        accumulate_runs(wt, idx, vals, k0, k1, part[t])
    _reduce_parts(part, out, nthreads)


@njit(parallel=True, **JIT)
def sparse_cols_matvec(wt, idx, vals, n, out, nthreads):
    """Alternative split: output columns in one block per thread, every thread
    reads its part of all active rows. Slower here (kept for the benchmark)."""
    N = wt.shape[1]
    for t in prange(nthreads):
        j0, j1 = chunk_aligned(t, nthreads, N)
        if j1 > j0:
            acc = np.empty(j1 - j0, np.float32)
            accumulate_rows(wt[:, j0:j1], idx, vals, 0, n, acc)
            for j in range(j1 - j0):
                store(out, j0 + j, acc[j])


# ---------------------------------------------------------------------------
# row dot products (output-sparse GEMV, dense GEMV on the normal layout)
# ---------------------------------------------------------------------------
@njit(**JIT)
def dot(w, i, xf):
    """fp32 dot product of row i of w (float32 or uint16 bf16) with xf (float32)."""
    row = w[i]
    s = np.float32(0.0)
    for k in range(xf.shape[0]):
        s += to_f32(row[k]) * xf[k]
    return s


@njit(inline="always", **JIT)
def widen(x):
    xf = np.empty(x.shape[0], np.float32)
    for k in range(x.shape[0]):
        xf[k] = to_f32(x[k])
    return xf


@njit(**JIT)
def dot_rows(w, rows, k0, k1, xf, res):
    """res[k] = w[rows[k]] . xf for k0 <= k < k1, one row at a time.

    One row per pass, not several interleaved: LLVM vectorises the single reduction with
    several accumulators, and the row streams sequentially. Measured here (AMD EPYC, one
    thread, SmolLM2's 30 layers of linears, cold) 21.6 GB/s fp32 and 20.2 bf16, against 8-11
    for four rows interleaved (four short streams 2.3 KB apart defeat the prefetcher)."""
    for k in range(k0, k1):
        res[k] = dot(w, rows[k], xf)


@njit(**JIT)
def dot_range(w, i0, i1, xf, res):
    """res[i] = w[i] . xf for i0 <= i < i1, one row at a time (see :func:`dot_rows`)."""
    for i in range(i0, i1):
        res[i] = dot(w, i, xf)


@njit(inline="always", **JIT)
def activate(g, code):
    """The MLP activation of ``code`` (``actsparse.kernels.reference.ACT_CODES``)."""
    if code == 0:
        return max(g, np.float32(0.0))
    if code == 1:
        return g / (np.float32(1.0) + np.exp(-g))
    if code == 2:
        c = np.float32(0.7978845608028654)  # sqrt(2/pi)
        inner = c * (g + np.float32(0.044715) * g * g * g)
        return np.float32(0.5) * g * (np.float32(1.0) + np.tanh(inner))
    return np.float32(0.5) * g * (np.float32(1.0) + np.float32(math.erf(g * np.float32(0.7071067811865476))))
