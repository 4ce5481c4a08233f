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

CHUNK = 128


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

    @numba.njit(cache=True, fastmath=False, boundscheck=False, inline="always")
    def reduce_row_slow(x, prev, linked, temporal, flow_thr, bounds, shift, base, hist_bins, c0, c1,
                        count, nonzero, positive, le_eps, abs_sum, vsum, sq_sum, pos_sum, pos_sq_sum,
                        hist, delta_zero, delta_le, flow_active, both_active):
        # handles non-finite values: they are counted by the caller and skipped here
        n_eps = bounds.shape[0]
        for c in range(c0, c1):
            xv = x[c]
            if not np.isfinite(xv):
                continue
            a = abs(xv)
            count[c] += 1
            if xv != 0.0:
                nonzero[c] += 1
            for e in range(n_eps):
                if a <= bounds[e]:
                    le_eps[e, c] += 1
            xd = np.float64(xv)
            abs_sum[c] += abs(xd)
            vsum[c] += xd
            sq_sum[c] += xd * xd
            if xv > 0.0:
                positive[c] += 1
                pos_sum[c] += xd
                pos_sq_sum[c] += xd * xd
            h = (np.int64(np.float32(a).view(np.int32)) >> shift) - base
            hist[min(max(h, 0), hist_bins - 1)] += 1
            if temporal:
                act = a > flow_thr
                if act:
                    flow_active[c] += 1
                if linked and np.isfinite(prev[c]):
                    d = abs(xv - prev[c])
                    if d == 0.0:
                        delta_zero[c] += 1
                    for e in range(n_eps):
                        if d <= bounds[e]:
                            delta_le[e, c] += 1
                    if act and abs(prev[c]) > flow_thr:
                        both_active[c] += 1

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
            hist = hist_chunks[ci]
            bad = 0
            nc = c1 - c0
            l_rows = 0
            # chunk-local accumulators: int32 / float32 so loops run 8 lanes wide, and no
            # aliasing with the outputs; flushed into the int64 / float64 fields at the end
            l_nz = np.zeros(nc, np.int32)
            l_pos = np.zeros(nc, np.int32)
            l_le = np.zeros((n_eps, nc), np.int32)
            l_abs = np.zeros(nc, np.float32)
            l_sum = np.zeros(nc, np.float32)
            l_sq = np.zeros(nc, np.float32)
            l_psum = np.zeros(nc, np.float32)
            l_psq = np.zeros(nc, np.float32)
            l_flow = np.zeros(nc, np.int32)
            l_dz = np.zeros(nc, np.int32)
            l_both = np.zeros(nc, np.int32)
            l_dle = np.zeros((n_eps, nc), np.int32)
            for b in range(n_b):
                for t in range(n_t):
                    if not valid[b, t]:
                        continue
                    x = v[b, t, c0:c1]
                    xb = bits[b, t, c0:c1]
                    linked = temporal and t > 0 and valid[b, t - 1]
                    prev = v[b, t - 1, c0:c1] if t > 0 else x
                    probe = np.float32(0.0)
                    for j in range(nc):
                        probe += x[j] - x[j]  # NaN iff some value is not finite
                    if linked:
                        for j in range(nc):
                            probe += prev[j] - prev[j]
                    if not np.isfinite(probe):
                        for j in range(nc):
                            if not np.isfinite(x[j]):
                                bad += 1
                        reduce_row_slow(v[b, t], v[b, t - 1] if t > 0 else v[b, t], linked, temporal, flow_thr,
                                        bounds, shift, base, hist_bins, c0, c1, count, nonzero, positive, le_eps,
                                        abs_sum, vsum, sq_sum, pos_sum, pos_sq_sum, hist, delta_zero, delta_le,
                                        flow_active, both_active)
                        continue
                    # fast path: every value finite, branch-free loops that LLVM vectorises
                    l_rows += 1
                    for j in range(nc):
                        xv = x[j]
                        a = abs(xv)
                        l_nz[j] += np.int32(xv != 0.0)
                        l_pos[j] += np.int32(xv > 0.0)
                        l_abs[j] += a
                        l_sum[j] += xv
                        l_sq[j] += xv * xv
                        pv = max(xv, np.float32(0.0))
                        l_psum[j] += pv
                        l_psq[j] += pv * pv
                    for e in range(n_eps):
                        bound = bounds[e]
                        for j in range(nc):
                            l_le[e, j] += np.int32(abs(x[j]) <= bound)
                    for j in range(nc):
                        h = ((xb[j] & 0x7FFFFFFF) >> shift) - base
                        hist[min(max(h, 0), hist_bins - 1)] += 1
                    if temporal:
                        for j in range(nc):
                            l_flow[j] += np.int32(abs(x[j]) > flow_thr)
                        if linked:
                            for j in range(nc):
                                d = abs(x[j] - prev[j])
                                l_dz[j] += np.int32(d == 0.0)
                                l_both[j] += np.int32((abs(x[j]) > flow_thr) & (abs(prev[j]) > flow_thr))
                            for e in range(n_eps):
                                bound = bounds[e]
                                for j in range(nc):
                                    l_dle[e, j] += np.int32(abs(x[j] - prev[j]) <= bound)
            for j in range(nc):
                c = c0 + j
                count[c] += l_rows
                nonzero[c] += l_nz[j]
                positive[c] += l_pos[j]
                abs_sum[c] += l_abs[j]
                vsum[c] += l_sum[j]
                sq_sum[c] += l_sq[j]
                pos_sum[c] += l_psum[j]
                pos_sq_sum[c] += l_psq[j]
                flow_active[c] += l_flow[j]
                delta_zero[c] += l_dz[j]
                both_active[c] += l_both[j]
                for e in range(n_eps):
                    le_eps[e, c] += l_le[e, j]
                    delta_le[e, c] += l_dle[e, j]
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
