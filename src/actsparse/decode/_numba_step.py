"""One decoded token of a LLaMA-style model, all layers, in one numba call.

The per-token Python and dispatch overhead of a Hugging Face decode step (~15 ms for
SmolLM2's 30 layers) is larger than the time to read the weights, so sparse GEMVs alone
cannot make decoding fast. Here the whole layer loop runs compiled: one dispatch per
token. Every linear is one of

* mode 0, dense: ``w`` (out x in, the model's own weight, not copied) row dot products;
* mode 1, input-sparse: threshold ``|x_i| > thr[i*ts]`` on the transposed copy ``wt``;
* mode 2, top-k: the ``k`` largest ``|x_i|`` (threshold = the (k+1)-th largest), on ``wt``.

The MLP activation site (CATS / CHESS / Top-K on the activation / a ReLU model's natural
zeros) keeps neuron i iff ``|act(g_i)|`` passes its test; then only the kept rows of
``up`` (normal layout) and of the transposed ``down`` are read.

Per-layer arrays come in numba typed lists (one per role) so the dispatch cost does not
grow with the number of layers. The hidden state and all activations are fp32; weights
are fp32 or bf16 (uint16 bits). Attention runs over an fp32 KV cache.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from actsparse.kernels.numba_cpu import (
    _JIT,
    _accumulate,
    _act,
    _compact,
    _chunk,
    _range_dot,
    _rows_dot,
    _sparse_rows_matvec,
    to_f32,
)

MODE_FUSED = 3  # k and v (or up) are computed with q (or gate): one GEMV on the concatenated weight
# Below this many weight bytes a GEMV runs on the calling thread: waking the other threads
# for a parallel region costs microseconds (a scheduler slice when the cores are busy),
# more than a small GEMV takes, and a token has hundreds of them.
PARALLEL_MIN_BYTES = 1 << 20


@njit(inline="always", **_JIT)
def _topk_threshold(x, k):
    """A threshold t with exactly k entries of |x| above it (no ties)."""
    n = x.shape[0]
    if k >= n:
        return np.float32(-1.0)
    if k <= 0:
        return np.float32(np.inf)
    a = np.abs(x)
    return np.partition(a, n - k - 1)[n - k - 1]


@njit(parallel=True, **_JIT)
def _dense_rows_parallel(xf, w, out, nthreads):
    M = w.shape[0]
    for t in prange(nthreads):
        i0, i1 = _chunk(t, nthreads, M)
        _range_dot(w, i0, i1, xf, out)


@njit(**_JIT)
def _dense_rows(xf, w, out, nthreads):
    """out = w @ xf on the normal (out x in) layout, rows split over threads. With one
    thread no parallel region is entered (each costs microseconds, hundreds per token)."""
    if nthreads == 1 or w.size * w.itemsize < PARALLEL_MIN_BYTES:
        _range_dot(w, 0, w.shape[0], xf, out)
    else:
        _dense_rows_parallel(xf, w, out, nthreads)


@njit(inline="always", **_JIT)
def _select(x, mode, thr, ts, k, idx, vals):
    """idx/vals[:n] = the entries of x that pass the test of ``mode`` (1 threshold, 2 top-k)."""
    if mode == 2:
        t1 = np.empty(1, np.float32)
        t1[0] = _topk_threshold(x, k)
        return _compact(x, t1, 0, idx, vals)
    return _compact(x, thr, ts, idx, vals)


@njit(**_JIT)
def _linear(x, mode, w, wt, thr, ts, k, bias, out, idx, vals, nthreads):
    """out = linear(x) under ``mode``; returns the number of active inputs."""
    K = x.shape[0]
    if mode == 0:
        _dense_rows(x, w, out, nthreads)
        n = K
    else:
        n = _select(x, mode, thr, ts, k, idx, vals)
        if nthreads == 1 or n * wt.shape[1] * wt.itemsize < PARALLEL_MIN_BYTES:
            _accumulate(wt, idx, vals, 0, n, out)
        else:
            _sparse_rows_matvec(wt, idx, vals, n, out, nthreads)
    if bias.shape[0] > 0:
        for j in range(out.shape[0]):
            out[j] += bias[j]
    return n


@njit(**_JIT)
def _rmsnorm(h, w, eps, out):
    s = 0.0
    for i in range(h.shape[0]):
        s += h[i] * h[i]
    r = np.float32(1.0 / math.sqrt(s / h.shape[0] + eps))
    for i in range(h.shape[0]):
        out[i] = w[i] * (h[i] * r)


@njit(**_JIT)
def _rope(x, n_heads, hd, cos, sin):
    """In place on x viewed as (n_heads, hd): x*cos + rotate_half(x)*sin (HF convention)."""
    half = hd // 2
    for h in range(n_heads):
        b = h * hd
        for i in range(half):
            x1 = x[b + i]
            x2 = x[b + i + half]
            x[b + i] = x1 * cos[i] - x2 * sin[i]
            x[b + i + half] = x2 * cos[i + half] + x1 * sin[i + half]


@njit(parallel=True, **_JIT)
def _attention_parallel(q, k_cache, v_cache, T, n_heads, n_rep, hd, scale, out):
    for h in prange(n_heads):
        _attention_head(q, k_cache, v_cache, T, h, n_rep, hd, scale, out)


@njit(**_JIT)
def _attention(q, k_cache, v_cache, T, n_heads, n_rep, hd, scale, out, nthreads):
    """out[h] = softmax(q_h . K * scale) V over positions < T, per head (GQA)."""
    if nthreads == 1 or 8 * T * n_heads * hd < PARALLEL_MIN_BYTES:
        for h in range(n_heads):
            _attention_head(q, k_cache, v_cache, T, h, n_rep, hd, scale, out)
    else:
        _attention_parallel(q, k_cache, v_cache, T, n_heads, n_rep, hd, scale, out)


@njit(**_JIT)
def _attention_head(q, k_cache, v_cache, T, h, n_rep, hd, scale, out):
    kv = h // n_rep
    scores = np.empty(T, np.float32)
    qb = h * hd
    mx = -np.inf
    for t in range(T):
        s = np.float32(0.0)
        for d in range(hd):
            s += q[qb + d] * k_cache[kv, t, d]
        s *= scale
        scores[t] = s
        mx = max(mx, s)
    tot = np.float32(0.0)
    for t in range(T):
        e = np.float32(np.exp(scores[t] - mx))
        scores[t] = e
        tot += e
    for d in range(hd):
        out[qb + d] = 0.0
    inv = np.float32(1.0) / tot
    for t in range(T):
        p = scores[t] * inv
        for d in range(hd):
            out[qb + d] += p * v_cache[kv, t, d]


@njit(**_JIT)
def _kept_up(xf, w_up, idx, vals, n, nthreads):
    """vals[k] *= w_up[idx[k]] . xf for k < n."""
    u = np.empty(n, np.float32)
    if nthreads == 1 or n * w_up.shape[1] * w_up.itemsize < PARALLEL_MIN_BYTES:
        _rows_dot(w_up, idx, 0, n, xf, u)
    else:
        _rows_dot_parallel(w_up, idx, n, xf, u, nthreads)
    for j in range(n):
        vals[j] *= u[j]


@njit(parallel=True, **_JIT)
def _rows_dot_parallel(w, rows, n, xf, res, nthreads):
    for t in prange(nthreads):
        k0, k1 = _chunk(t, nthreads, n)
        _rows_dot(w, rows, k0, k1, xf, res)


@njit(**_JIT)
def decode_token(
    token, pos, embed, h,
    modes, ws, wts, thrs, tss, ks, biases,
    norm1, norm2, final_norm, eps,
    act_code, a_modes, a_thrs, a_tss, a_ks,
    k_cache, v_cache, cos, sin, n_heads, n_kv, hd, scale,
    lm_head, logits, counts, nthreads,
):
    """Run token ``token`` at position ``pos`` through every layer; write ``logits``.

    modes/tss/ks: (L, 7) int64 per role (q, k, v, o, gate, up, down); ws/wts/thrs/biases:
    typed lists of length 7*L (index layer*7 + role). a_*: per-layer activation-site test
    (mode 0 = none). k_cache/v_cache: (L, n_kv, T_max, hd) fp32. counts: (L, 8) int64,
    active inputs per role and kept neurons, accumulated.
    """
    L = norm1.shape[0]
    D = h.shape[0]
    row = embed[token]
    for i in range(D):
        h[i] = to_f32(row[i])
    xn = np.empty(D, np.float32)
    nq = n_heads * hd
    nk = n_kv * hd
    qkv = np.empty(nq + 2 * nk, np.float32)
    q = qkv[:nq]
    kx = qkv[nq:nq + nk]
    vx = qkv[nq + nk:]
    att = np.empty(n_heads * hd, np.float32)
    o = np.empty(D, np.float32)
    n_rep = n_heads // n_kv
    big = max(D, n_heads * hd)
    idx = np.empty(big, np.int64)
    vals = np.empty(big, np.float32)
    for layer in range(L):
        b = layer * 7
        _rmsnorm(h, norm1[layer], eps, xn)
        if modes[layer, 1] == MODE_FUSED:  # q, k, v share their input test: one pass over [Wq; Wk; Wv]^T
            n = _linear(xn, modes[layer, 0], ws[b], wts[b], thrs[b], tss[layer, 0], ks[layer, 0], biases[b], qkv,
                        idx, vals, nthreads)
            counts[layer, 0] += n
            counts[layer, 1] += n
            counts[layer, 2] += n
        else:
            counts[layer, 0] += _linear(xn, modes[layer, 0], ws[b], wts[b], thrs[b], tss[layer, 0], ks[layer, 0],
                                        biases[b], q, idx, vals, nthreads)
            counts[layer, 1] += _linear(xn, modes[layer, 1], ws[b + 1], wts[b + 1], thrs[b + 1], tss[layer, 1],
                                        ks[layer, 1], biases[b + 1], kx, idx, vals, nthreads)
            counts[layer, 2] += _linear(xn, modes[layer, 2], ws[b + 2], wts[b + 2], thrs[b + 2], tss[layer, 2],
                                        ks[layer, 2], biases[b + 2], vx, idx, vals, nthreads)
        _rope(q, n_heads, hd, cos[pos], sin[pos])
        _rope(kx, n_kv, hd, cos[pos], sin[pos])
        for g in range(n_kv):
            for d in range(hd):
                k_cache[layer, g, pos, d] = kx[g * hd + d]
                v_cache[layer, g, pos, d] = vx[g * hd + d]
        _attention(q, k_cache[layer], v_cache[layer], pos + 1, n_heads, n_rep, hd, scale, att, nthreads)
        counts[layer, 3] += _linear(att, modes[layer, 3], ws[b + 3], wts[b + 3], thrs[b + 3], tss[layer, 3], ks[layer, 3], biases[b + 3], o, idx, vals, nthreads)
        for i in range(D):
            h[i] += o[i]
        _rmsnorm(h, norm2[layer], eps, xn)
        counts[layer, 7] += _mlp(xn, layer, b, modes, ws, wts, thrs, tss, ks, biases, act_code,
                                 a_modes[layer], a_thrs[layer], a_tss[layer], a_ks[layer], o, counts, nthreads)
        for i in range(D):
            h[i] += o[i]
    _rmsnorm(h, final_norm, eps, xn)
    _dense_rows(xn, lm_head, logits, nthreads)


@njit(**_JIT)
def _mlp(xn, layer, b, modes, ws, wts, thrs, tss, ks, biases, act_code, a_mode, a_thr, a_ts, a_k, out, counts,
         nthreads):
    """out = down(act(gate(xn)) * up(xn)) with the layer's tests; returns kept neurons."""
    F = ws[b + 6].shape[1] if modes[layer, 6] == 0 else wts[b + 6].shape[0]  # down's input width
    D = xn.shape[0]
    K = max(F, D)
    idx = np.empty(K, np.int64)
    vals = np.empty(K, np.float32)
    m = np.zeros(F, np.float32)
    if modes[layer, 5] == MODE_FUSED:  # gate and up share their input test: one pass over [Wg; Wu]^T
        gu = np.empty(2 * F, np.float32)
        n = _linear(xn, modes[layer, 4], ws[b + 4], wts[b + 4], thrs[b + 4], tss[layer, 4], ks[layer, 4],
                    biases[b + 4], gu, idx, vals, nthreads)
        counts[layer, 4] += n
        counts[layer, 5] += n
        for i in range(F):
            m[i] = _act(gu[i], act_code) * gu[F + i]
        counts[layer, 6] += _linear(m, modes[layer, 6], ws[b + 6], wts[b + 6], thrs[b + 6], tss[layer, 6],
                                    ks[layer, 6], biases[b + 6], out, idx, vals, nthreads)
        return F
    g = np.empty(F, np.float32)
    counts[layer, 4] += _linear(xn, modes[layer, 4], ws[b + 4], wts[b + 4], thrs[b + 4], tss[layer, 4], ks[layer, 4],
                                biases[b + 4], g, idx, vals, nthreads)
    for i in range(F):
        g[i] = _act(g[i], act_code)
    if a_mode == 0:
        u = np.empty(F, np.float32)
        counts[layer, 5] += _linear(xn, modes[layer, 5], ws[b + 5], wts[b + 5], thrs[b + 5], tss[layer, 5],
                                    ks[layer, 5], biases[b + 5], u, idx, vals, nthreads)
        for i in range(F):
            m[i] = g[i] * u[i]
        kept = F
    else:
        kept = _select(g, a_mode, a_thr, a_ts, a_k, idx, vals)
        if modes[layer, 5] == 0 and biases[b + 5].shape[0] == 0:
            _kept_up(xn, ws[b + 5], idx, vals, kept, nthreads)  # only the kept rows of up
            counts[layer, 5] += D
        else:
            u = np.empty(F, np.float32)
            idx2 = np.empty(K, np.int64)
            vals2 = np.empty(K, np.float32)
            counts[layer, 5] += _linear(xn, modes[layer, 5], ws[b + 5], wts[b + 5], thrs[b + 5], tss[layer, 5],
                                        ks[layer, 5], biases[b + 5], u, idx2, vals2, nthreads)
            for j in range(kept):
                vals[j] *= u[idx[j]]
        for j in range(kept):
            m[idx[j]] = vals[j]
    counts[layer, 6] += _linear(m, modes[layer, 6], ws[b + 6], wts[b + 6], thrs[b + 6], tss[layer, 6], ks[layer, 6],
                                biases[b + 6], out, idx, vals, nthreads)
    return kept
