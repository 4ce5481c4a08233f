"""One-pass numba reduction of a site tensor into SiteStats fields.

The torch path in :mod:`actsparse.measure.accumulators` issues a dozen full-tensor ops
per hook call; this kernel reads each value once, so capture stays cheap next to the
forward pass. Columns (neurons) are split into chunks across threads; each chunk owns
its columns and its own histogram, so there are no races. It is tested against the
torch path, which stays the fallback (``ACTSPARSE_DISABLE_NUMBA=1`` or numba missing).
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

CHUNK = 64


def numba_enabled() -> bool:
    if os.environ.get("ACTSPARSE_DISABLE_NUMBA", "").strip() not in ("", "0"):
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _import_numba():
    os.environ.setdefault(
        "NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "actsparse", "numba"))
    import numba

    return numba


@lru_cache(maxsize=1)
def _kernel():
    numba = _import_numba()
    prange = numba.prange

    @numba.njit(parallel=True, cache=True, fastmath=False, boundscheck=False)
    def reduce_site(v, bits, valid, temporal, flow_thr, bounds, shift, base, hist_bins,
                    count, nonzero, positive, le_eps, abs_sum, vsum, sq_sum, pos_sum, pos_sq_sum,
                    hist_chunks, delta_zero, delta_le, flow_active, both_active, bad_chunks):
        n_b, n_t, width = v.shape
        n_eps = bounds.shape[0]
        n_chunks = hist_chunks.shape[0]
        for ci in prange(n_chunks):
            c0 = ci * CHUNK
            c1 = min(width, c0 + CHUNK)
            bad = 0
            for b in range(n_b):
                for t in range(n_t):
                    if not valid[b, t]:
                        continue
                    linked = temporal and t > 0 and valid[b, t - 1]
                    for c in range(c0, c1):
                        x = v[b, t, c]
                        if not np.isfinite(x):
                            bad += 1
                            continue
                        a = abs(x)
                        count[c] += 1
                        if x != 0.0:
                            nonzero[c] += 1
                        for e in range(n_eps):
                            if a <= bounds[e]:
                                le_eps[e, c] += 1
                        xd = np.float64(x)
                        abs_sum[c] += abs(xd)
                        vsum[c] += xd
                        sq_sum[c] += xd * xd
                        if x > 0.0:
                            positive[c] += 1
                            pos_sum[c] += xd
                            pos_sq_sum[c] += xd * xd
                        h = ((bits[b, t, c] & 0x7FFFFFFF) >> shift) - base
                        if h < 0:
                            h = 0
                        elif h > hist_bins - 1:
                            h = hist_bins - 1
                        hist_chunks[ci, h] += 1
                        if temporal:
                            act = a > flow_thr
                            if act:
                                flow_active[c] += 1
                            if linked:
                                p = v[b, t - 1, c]
                                if np.isfinite(p):
                                    d = abs(x - p)
                                    if d == 0.0:
                                        delta_zero[c] += 1
                                    for e in range(n_eps):
                                        if d <= bounds[e]:
                                            delta_le[e, c] += 1
                                    if act and abs(p) > flow_thr:
                                        both_active[c] += 1
            bad_chunks[ci] = bad

    return reduce_site


def reduce_into(st, v, valid, *, temporal: bool, flow_threshold: float) -> None:
    """Fold ``v`` (batch, time, width) float32 with ``valid`` (batch, time) bool into ``st``."""
    from actsparse.measure import accumulators as acc

    v = np.ascontiguousarray(v, dtype=np.float32)
    valid = np.ascontiguousarray(valid, dtype=np.bool_)
    n_chunks = -(-st.width // CHUNK)
    hist_chunks = np.zeros((n_chunks, acc.HIST_BINS), dtype=np.int64)
    bad_chunks = np.zeros(n_chunks, dtype=np.int64)
    views = {name: getattr(st, name).numpy() for name in (
        "count", "nonzero", "positive", "le_eps", "abs_sum", "sum", "sq_sum", "pos_sum", "pos_sq_sum",
        "delta_zero", "delta_le_eps", "flow_active", "both_active")}
    _kernel()(v, v.view(np.int32), valid, temporal, np.float32(flow_threshold),
              np.asarray(st.eps, dtype=np.float32), acc._SHIFT, acc._BASE - 1, acc.HIST_BINS,
              views["count"], views["nonzero"], views["positive"], views["le_eps"], views["abs_sum"],
              views["sum"], views["sq_sum"], views["pos_sum"], views["pos_sq_sum"], hist_chunks,
              views["delta_zero"], views["delta_le_eps"], views["flow_active"], views["both_active"], bad_chunks)
    st.hist += acc.torch.from_numpy(hist_chunks.sum(0))
    st.nonfinite += int(bad_chunks.sum())
    st.rows += int(valid.sum())
    if temporal and v.shape[1] > 1:
        st.pairs += int((valid[:, 1:] & valid[:, :-1]).sum())
