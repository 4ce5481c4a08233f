"""The numba kernel behind :mod:`actsparse.measure.fused`.

Kept at module level (not in a closure) so numba's on-disk cache works: importing this
module imports numba; the first call compiles once per machine, later processes load
the cached machine code. Import it lazily (``fused._kernel()``).
"""
import actsparse.numba_backend  # noqa: F401  (cache directory set before numba loads)
import numpy as np
from numba import njit, prange

CHUNK = 128


@njit(cache=True, fastmath=False, boundscheck=False, inline="always")
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

@njit(parallel=True, cache=True, fastmath=False, boundscheck=False)
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



@njit(parallel=True, cache=True, fastmath=False, boundscheck=False)
def reduce_light(v, valid, scale, use_scale, shift, base, hist_bins, count, nonzero, abs_sum, hist_chunks,
                 bad_chunks):
    """The statistics a threshold needs (per-neuron counts, nonzeros, |v| sums; the |v|
    histogram) of ``v`` (batch, time, width) at the valid tokens, straight from the tensor: no
    masked copy, no temporaries. With ``use_scale`` the values are ``|v_j| * scale_j``.
    Non-finite values are counted in ``bad_chunks`` and skipped."""
    n_b, n_t, width = v.shape
    n_chunks = hist_chunks.shape[0]
    for ci in prange(n_chunks):
        c0 = ci * CHUNK
        c1 = min(width, c0 + CHUNK)
        hist = hist_chunks[ci]
        nc = c1 - c0
        bad = 0
        l_count = np.zeros(nc, np.int64)
        l_nz = np.zeros(nc, np.int64)
        l_abs = np.zeros(nc, np.float64)
        av = np.empty(nc, np.float32)
        avb = av.view(np.int32)
        for b in range(n_b):
            for t in range(n_t):
                if not valid[b, t]:
                    continue
                x = v[b, t, c0:c1]
                for j in range(nc):
                    av[j] = abs(x[j]) * scale[c0 + j] if use_scale else abs(x[j])
                for j in range(nc):
                    a = av[j]
                    if not np.isfinite(a):
                        bad += 1
                        continue
                    l_count[j] += 1
                    l_nz[j] += a != 0.0
                    l_abs[j] += a
                    h = (avb[j] >> shift) - base
                    hist[min(max(h, 0), hist_bins - 1)] += 1
        for j in range(nc):
            c = c0 + j
            count[c] += l_count[j]
            nonzero[c] += l_nz[j]
            abs_sum[c] += l_abs[j]
        bad_chunks[ci] = bad
