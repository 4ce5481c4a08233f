"""GEMV building blocks that take either kind of weight, so that one compiled decode step
(:mod:`actsparse.decode.step`) runs fp32, bf16, int8 and q4 weights with one code path.

A weight is either

- a plain 2-D array: float32, or uint16 holding bf16 bits (:mod:`actsparse.kernels.formats`), or
- a packed block-quantised tuple ``(codes, scales, mins)`` (:mod:`actsparse.kernels.quant_formats`:
  int8 codes for ``int8``, uint8 for ``q4``; scales and mins the uint16 bits of fp16 values,
  ``mins`` an empty (0, 0) array for int8).

Each function here is a numba ``@overload`` that picks, at compile time, the fp kernels of
:mod:`actsparse.kernels.primitives` or the quantised ones of :mod:`actsparse.kernels.quant_numba`.
Shapes are those of the stored matrix ``M``: the weight W (rows layout) or W^T (transposed);
a (0, 0) placeholder has 0 rows.
"""
from __future__ import annotations

import actsparse.numba_backend  # noqa: F401  (cache directory set before numba loads)
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from actsparse.kernels.primitives import JIT, accumulate_rows, chunk, dot_range, dot_rows, sparse_rows_matvec
from actsparse.kernels.quant_numba import (B, _q_sparse_rows_matvec, i8_dot, prepare_x, q4_dot, q4_prepare,
                                           qaccumulate_rows, qdot_rows)

__all__ = ["m_rows", "m_cols", "m_bytes", "m_row_bytes", "dense_range", "rows_dot", "accumulate", "accumulate_parallel"]


def _packed(w) -> bool:
    return isinstance(w, types.BaseTuple)


def m_rows(w):  # pragma: no cover - jit overloads below
    raise NotImplementedError


def m_cols(w):  # pragma: no cover
    raise NotImplementedError


def m_bytes(w):  # pragma: no cover
    raise NotImplementedError


def m_row_bytes(w):  # pragma: no cover
    raise NotImplementedError


def dense_range(w, i0, i1, xf, res):  # pragma: no cover
    raise NotImplementedError


def rows_dot(w, rows, k0, k1, xf, res):  # pragma: no cover
    raise NotImplementedError


def accumulate(w, idx, vals, k0, k1, acc):  # pragma: no cover
    raise NotImplementedError


def accumulate_parallel(w, idx, vals, n, out, nthreads):  # pragma: no cover
    raise NotImplementedError


@overload(m_rows, inline="always", jit_options=dict(JIT))
def _m_rows(w):
    """Rows of the stored matrix."""
    if _packed(w):
        return lambda w: w[1].shape[0]
    return lambda w: w.shape[0]


@overload(m_cols, inline="always", jit_options=dict(JIT))
def _m_cols(w):
    """Columns (elements) of the stored matrix: q4 packs two codes per byte, so ask the scales."""
    if _packed(w):
        return lambda w: w[1].shape[1] * B
    return lambda w: w.shape[1]


@overload(m_bytes, inline="always", jit_options=dict(JIT))
def _m_bytes(w):
    """Bytes stored (codes + scales + mins for a packed weight)."""
    if _packed(w):
        return lambda w: w[0].size * w[0].itemsize + w[1].size * w[1].itemsize + w[2].size * w[2].itemsize
    return lambda w: w.size * w.itemsize


@overload(m_row_bytes, inline="always", jit_options=dict(JIT))
def _m_row_bytes(w):
    """Bytes of one stored row."""
    if _packed(w):
        return lambda w: w[0].shape[1] * w[0].itemsize + w[1].shape[1] * w[1].itemsize + w[2].shape[1] * w[2].itemsize
    return lambda w: w.shape[1] * w.itemsize


@overload(dense_range, jit_options=dict(JIT))
def _dense_range(w, i0, i1, xf, res):
    """res[i] = M[i] . xf for i0 <= i < i1, one row at a time."""
    if not _packed(w):
        return lambda w, i0, i1, xf, res: dot_range(w, i0, i1, xf, res)
    if w[0].dtype == types.int8:

        def impl(w, i0, i1, xf, res):
            cs = np.empty(w[1].shape[1], np.float32)
            for i in range(i0, i1):
                res[i] = i8_dot(w[0], w[1], i, xf, cs)

        return impl

    def impl_q4(w, i0, i1, xf, res):
        xq = q4_prepare(xf)
        cs = np.empty(w[1].shape[1], np.float32)
        for i in range(i0, i1):
            res[i] = q4_dot(w[0], w[1], w[2], i, xq, cs)

    return impl_q4


@overload(rows_dot, jit_options=dict(JIT))
def _rows_dot(w, rows, k0, k1, xf, res):
    """res[k] = M[rows[k]] . xf for k0 <= k < k1."""
    if not _packed(w):
        return lambda w, rows, k0, k1, xf, res: dot_rows(w, rows, k0, k1, xf, res)

    def impl(w, rows, k0, k1, xf, res):
        xq = prepare_x(xf, w[2])
        qdot_rows(w[0], w[1], w[2], rows, k0, k1, xf, xq, res)

    return impl


@overload(accumulate, jit_options=dict(JIT))
def _accumulate(w, idx, vals, k0, k1, acc):
    """acc[:] = sum_{k0 <= k < k1} vals[k] * M[idx[k], :] (acc is overwritten)."""
    if not _packed(w):
        return lambda w, idx, vals, k0, k1, acc: accumulate_rows(w, idx, vals, k0, k1, acc)
    return lambda w, idx, vals, k0, k1, acc: qaccumulate_rows(w[0], w[1], w[2], idx, vals, k0, k1, acc)


@overload(accumulate_parallel, jit_options=dict(JIT))
def _accumulate_parallel(w, idx, vals, n, out, nthreads):
    """out = sum_{k<n} vals[k] * M[idx[k], :], the active rows split over ``nthreads``."""
    if not _packed(w):
        return lambda w, idx, vals, n, out, nthreads: sparse_rows_matvec(w, idx, vals, n, out, nthreads)
    return lambda w, idx, vals, n, out, nthreads: _q_sparse_rows_matvec(w[0], w[1], w[2], idx, vals, n, out,
                                                                        nthreads)


@njit(parallel=True, **JIT)
def dense_rows_parallel(xf, w, out, nthreads):
    """out = M @ xf, the rows split over ``nthreads``."""
    M = m_rows(w)
    for t in prange(nthreads):
        i0, i1 = chunk(t, nthreads, M)
        dense_range(w, i0, i1, xf, out)


@njit(parallel=True, **JIT)
def rows_dot_parallel(w, rows, n, xf, res, nthreads):
    """res[k] = M[rows[k]] . xf for k < n, split over ``nthreads``."""
    for t in prange(nthreads):
        k0, k1 = chunk(t, nthreads, n)
        rows_dot(w, rows, k0, k1, xf, res)
