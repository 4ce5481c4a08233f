"""One decoded token of a decoder (any architecture a DecodePlan describes), all layers, in one numba call.

The per-token Python and dispatch overhead of a Hugging Face decode step (~15 ms for
SmolLM2's 30 layers) is larger than the time to read the weights, so sparse GEMVs alone
cannot make decoding fast. Here the whole layer loop runs compiled: one dispatch per
token. What each linear does comes from the typed decode plan
(:class:`actsparse.decode.plan.DecodePlan`), passed as grouped arguments (the named tuples
below); every linear is one of the :class:`~actsparse.decode.plan.Mode` codes:

* ``DENSE``: ``w`` (out x in, the model's own weight, not copied) row dot products;
* ``THRESHOLD``: input-sparse, ``|x_i| > thr[i*stride]``, on the transposed copy ``wt``;
* ``TOPK``: the ``k`` largest ``|x_i|`` (threshold = the (k+1)-th largest), on ``wt``;
* ``FUSED``: computed by the first linear of its group (k and v with q, up with gate).

The MLP activation site (CATS / CHESS / Top-K on the activation / a ReLU model's natural
zeros) keeps neuron i iff ``|act(g_i)|`` passes its test; then only the kept rows of
``up`` (normal layout) and of the transposed ``down`` are read.

Per-layer arrays come in numba typed lists (index ``layer * 7 + role``) so the dispatch
cost does not grow with the number of layers. The hidden state and all activations are
fp32; a weight is a plain array (fp32, or bf16 bits: :mod:`actsparse.kernels.formats`) or a
packed int8 / q4 tuple ``(codes, scales, mins)`` (:mod:`actsparse.kernels.quant_formats`); the
GEMV helpers of :mod:`actsparse.kernels.weight_ops` pick the kernel from the weight's type when
the step is compiled, so one code path serves every format (``fmt`` records each linear's
format code). A quantised linear is stored once: by rows (dense, kept rows of up) or
transposed (input-sparse; a dense linear stored only transposed reads every input of ``wt``).
Attention runs over an fp32 KV cache.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from actsparse.decode.codes import Mode, Role
from actsparse.kernels.primitives import JIT, activate, compact, to_f32
from actsparse.kernels.weight_ops import (accumulate, accumulate_parallel, dense_range, dense_rows_parallel, m_bytes,
                                          m_cols, m_row_bytes, m_rows, rows_dot, rows_dot_parallel)

_DENSE, _TOPK, _FUSED = int(Mode.DENSE), int(Mode.TOPK), int(Mode.FUSED)
_NR = len(Role)
_Q, _K, _V, _O = int(Role.Q), int(Role.K), int(Role.V), int(Role.O)
_GATE, _UP, _DOWN = int(Role.GATE), int(Role.UP), int(Role.DOWN)

# Below this many weight bytes a GEMV runs on the calling thread: waking the other threads
# for a parallel region costs microseconds (a scheduler slice when the cores are busy),
# more than a small GEMV takes, and a token has hundreds of them.
PARALLEL_MIN_BYTES = 1 << 20


@njit(inline="always", **JIT)
def _topk_threshold(x, k):
    """A threshold t with exactly k entries of |x| above it (no ties)."""
    n = x.shape[0]
    if k >= n:
        return np.float32(-1.0)
    if k <= 0:
        return np.float32(np.inf)
    a = np.abs(x)
    return np.partition(a, n - k - 1)[n - k - 1]


@njit(**JIT)
def _dense_rows(xf, w, out, nthreads):
    """out = w @ xf on the normal (out x in) layout, rows split over threads. With one
    thread no parallel region is entered (each costs microseconds, hundreds per token)."""
    if nthreads == 1 or m_bytes(w) < PARALLEL_MIN_BYTES:
        dense_range(w, 0, m_rows(w), xf, out)
    else:
        dense_rows_parallel(xf, w, out, nthreads)


@njit(inline="always", **JIT)
def _select(x, mode, thr, ts, k, idx, vals):
    """idx/vals[:n] = the entries of x that pass the test of ``mode`` (1 threshold, 2 top-k)."""
    if mode == _TOPK:
        t1 = np.empty(1, np.float32)
        t1[0] = _topk_threshold(x, k)
        return compact(x, t1, 0, idx, vals)
    return compact(x, thr, ts, idx, vals)


@njit(**JIT)
def _linear(x, mode, w, wt, thr, ts, k, bias, out, idx, vals, nthreads):
    """out = linear(x) under ``mode``; returns the number of active inputs. A dense linear
    stored only transposed (one quantised copy in the input-sparse layout) reads every input
    of ``wt``."""
    K = x.shape[0]
    if mode == _DENSE and m_rows(w) > 0:
        _dense_rows(x, w, out, nthreads)
        n = K
    else:
        if mode == _DENSE:
            for i in range(K):
                idx[i] = i
                vals[i] = x[i]
            n = K
        else:
            n = _select(x, mode, thr, ts, k, idx, vals)
        if nthreads == 1 or n * m_row_bytes(wt) < PARALLEL_MIN_BYTES:
            accumulate(wt, idx, vals, 0, n, out)
        else:
            accumulate_parallel(wt, idx, vals, n, out, nthreads)
    if bias.shape[0] > 0:
        for j in range(out.shape[0]):
            out[j] += bias[j]
    return n


@njit(**JIT)
def _rmsnorm(h, w, eps, out):
    s = 0.0
    for i in range(h.shape[0]):
        s += h[i] * h[i]
    r = np.float32(1.0 / math.sqrt(s / h.shape[0] + eps))
    for i in range(h.shape[0]):
        out[i] = w[i] * (h[i] * r)


@njit(**JIT)
def _rope(x, n_heads, hd, cos, sin):
    """In place on x viewed as (n_heads, hd): x*cos + rotate_half(x)*sin (HF convention) on the
    first ``len(cos)`` dims of each head (partial rotary leaves the others)."""
    half = cos.shape[0] // 2
    for h in range(n_heads):
        b = h * hd
        for i in range(half):
            x1 = x[b + i]
            x2 = x[b + i + half]
            x[b + i] = x1 * cos[i] - x2 * sin[i]
            x[b + i + half] = x2 * cos[i + half] + x1 * sin[i + half]


@njit(parallel=True, **JIT)
def _attention_parallel(q, k_cache, v_cache, t0, T, n_heads, n_rep, hd, scale, softcap, out):
    for h in prange(n_heads):
        _attention_head(q, k_cache, v_cache, t0, T, h, n_rep, hd, scale, softcap, out)


@njit(**JIT)
def _attention(q, k_cache, v_cache, t0, T, n_heads, n_rep, hd, scale, softcap, out, nthreads):
    """out[h] = softmax(q_h . K * scale) V over positions t0 <= t < T, per head (GQA); with
    ``softcap`` > 0 the scaled scores are soft-capped first: cap * tanh(s / cap)."""
    if nthreads == 1 or 8 * (T - t0) * n_heads * hd < PARALLEL_MIN_BYTES:
        for h in range(n_heads):
            _attention_head(q, k_cache, v_cache, t0, T, h, n_rep, hd, scale, softcap, out)
    else:
        _attention_parallel(q, k_cache, v_cache, t0, T, n_heads, n_rep, hd, scale, softcap, out)


@njit(**JIT)
def _attention_head(q, k_cache, v_cache, t0, T, h, n_rep, hd, scale, softcap, out):
    kv = h // n_rep
    scores = np.empty(T - t0, np.float32)
    qb = h * hd
    mx = -np.inf
    for t in range(t0, T):
        s = np.float32(0.0)
        for d in range(hd):
            s += q[qb + d] * k_cache[kv, t, d]
        s *= scale
        if softcap > 0:
            s = np.float32(np.tanh(s / softcap)) * softcap
        scores[t - t0] = s
        mx = max(mx, s)
    tot = np.float32(0.0)
    for t in range(T - t0):
        e = np.float32(np.exp(scores[t] - mx))
        scores[t] = e
        tot += e
    for d in range(hd):
        out[qb + d] = 0.0
    inv = np.float32(1.0) / tot
    for t in range(t0, T):
        p = scores[t - t0] * inv
        for d in range(hd):
            out[qb + d] += p * v_cache[kv, t, d]


@njit(**JIT)
def _kept_up(xf, w_up, idx, vals, n, nthreads):
    """vals[k] *= w_up[idx[k]] . xf for k < n."""
    u = np.empty(n, np.float32)
    if nthreads == 1 or n * m_row_bytes(w_up) < PARALLEL_MIN_BYTES:
        rows_dot(w_up, idx, 0, n, xf, u)
    else:
        rows_dot_parallel(w_up, idx, n, xf, u, nthreads)
    for j in range(n):
        vals[j] *= u[j]


@njit(**JIT)
def _role(x, layer, role, weights, tests, out, idx, vals, nthreads):
    """out = linear ``role`` of ``layer`` applied to x under its test; returns active inputs."""
    b = layer * _NR + role
    return _linear(x, tests.mode[layer, role], weights.w[b], weights.wt[b], tests.thr[b], tests.stride[layer, role],
                   tests.k[layer, role], weights.bias[b], out, idx, vals, nthreads)


@njit(**JIT)
def _head_norms(x, n, hd, w, eps):
    """RMSNorm of each of the ``n`` heads of x (viewed as (n, hd)) with gain ``w``, in place."""
    for h in range(n):
        part = x[h * hd:(h + 1) * hd]
        _rmsnorm(part, w, eps, part)


@njit(**JIT)
def decode_token(token, pos, args, kv, h, logits, counts, nthreads):
    """Run token ``token`` at position ``pos`` through every layer; write ``logits``.

    ``args``: :class:`StepArgs` (from :meth:`DecodePlan.kernel_args`); ``kv``: the
    :class:`KVCache`; ``h``: (hidden,) fp32 scratch; ``counts``: (L, 8) int64, active inputs
    per role and kept neurons, accumulated.
    """
    weights, tests, norms, attn, rope, emb = args.weights, args.tests, args.norms, args.attn, args.rope, args.emb
    L = norms.attn.shape[0]
    D = h.shape[0]
    n_heads, n_kv, hd = attn.n_heads, attn.n_kv, attn.head_dim
    row = emb.embed[token]
    for i in range(D):
        h[i] = to_f32(row[i])
    if emb.scale != 1.0:
        for i in range(D):
            h[i] *= emb.scale
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
    qk_norms = norms.q.shape[0] > 0
    sandwich = norms.attn_out.shape[0] > 0
    for layer in range(L):
        _rmsnorm(h, norms.attn[layer], norms.eps, xn)
        if tests.mode[layer, _K] == _FUSED:  # q, k, v share their input test: one pass over [Wq; Wk; Wv]^T
            n = _role(xn, layer, _Q, weights, tests, qkv, idx, vals, nthreads)
            counts[layer, _Q] += n
            counts[layer, _K] += n
            counts[layer, _V] += n
        else:
            counts[layer, _Q] += _role(xn, layer, _Q, weights, tests, q, idx, vals, nthreads)
            counts[layer, _K] += _role(xn, layer, _K, weights, tests, kx, idx, vals, nthreads)
            counts[layer, _V] += _role(xn, layer, _V, weights, tests, vx, idx, vals, nthreads)
        if qk_norms:
            _head_norms(q, n_heads, hd, norms.q[layer], norms.eps)
            _head_norms(kx, n_kv, hd, norms.k[layer], norms.eps)
        table = rope.index[layer]
        _rope(q, n_heads, hd, rope.cos[table, pos], rope.sin[table, pos])
        _rope(kx, n_kv, hd, rope.cos[table, pos], rope.sin[table, pos])
        for g in range(n_kv):
            for d in range(hd):
                kv.k[layer, g, pos, d] = kx[g * hd + d]
                kv.v[layer, g, pos, d] = vx[g * hd + d]
        window = attn.window[layer]
        t0 = max(0, pos + 1 - window) if window > 0 else 0
        _attention(q, kv.k[layer], kv.v[layer], t0, pos + 1, n_heads, n_rep, hd, attn.scale, attn.softcap, att,
                   nthreads)
        counts[layer, _O] += _role(att, layer, _O, weights, tests, o, idx, vals, nthreads)
        if sandwich:
            _rmsnorm(o, norms.attn_out[layer], norms.eps, o)
        for i in range(D):
            h[i] += o[i]
        _rmsnorm(h, norms.mlp[layer], norms.eps, xn)
        counts[layer, 7] += _mlp(xn, layer, weights, tests, args.act, o, counts, nthreads)
        if sandwich:
            _rmsnorm(o, norms.mlp_out[layer], norms.eps, o)
        for i in range(D):
            h[i] += o[i]
    _rmsnorm(h, norms.final, norms.eps, xn)
    _dense_rows(xn, emb.lm_head, logits, nthreads)
    if emb.softcap > 0:
        for i in range(logits.shape[0]):
            logits[i] = np.float32(np.tanh(logits[i] / emb.softcap)) * emb.softcap


@njit(**JIT)
def _mlp(xn, layer, weights, tests, act, out, counts, nthreads):
    """out = down(act(gate(xn)) * up(xn)) with the layer's tests; returns kept neurons."""
    b = layer * _NR
    w_down = weights.w[b + _DOWN]
    F = m_cols(w_down) if m_rows(w_down) > 0 else m_rows(weights.wt[b + _DOWN])
    D = xn.shape[0]
    K = max(F, D)
    idx = np.empty(K, np.int64)
    vals = np.empty(K, np.float32)
    m = np.zeros(F, np.float32)
    code = act.code
    if tests.mode[layer, _UP] == _FUSED:  # gate and up share their input test: one pass over [Wg; Wu]^T
        gu = np.empty(2 * F, np.float32)
        n = _role(xn, layer, _GATE, weights, tests, gu, idx, vals, nthreads)
        counts[layer, _GATE] += n
        counts[layer, _UP] += n
        for i in range(F):
            m[i] = activate(gu[i], code) * gu[F + i]
        counts[layer, _DOWN] += _role(m, layer, _DOWN, weights, tests, out, idx, vals, nthreads)
        return F
    g = np.empty(F, np.float32)
    counts[layer, _GATE] += _role(xn, layer, _GATE, weights, tests, g, idx, vals, nthreads)
    for i in range(F):
        g[i] = activate(g[i], code)
    a_mode = act.mode[layer]
    if a_mode == _DENSE:
        u = np.empty(F, np.float32)
        counts[layer, _UP] += _role(xn, layer, _UP, weights, tests, u, idx, vals, nthreads)
        for i in range(F):
            m[i] = g[i] * u[i]
        kept = F
    else:
        kept = _select(g, a_mode, act.thr[layer], act.stride[layer], act.k[layer], idx, vals)
        if tests.mode[layer, _UP] == _DENSE and m_rows(weights.w[b + _UP]) > 0 and weights.bias[b + _UP].shape[0] == 0:
            _kept_up(xn, weights.w[b + _UP], idx, vals, kept, nthreads)  # only the kept rows of up
            counts[layer, _UP] += D
        else:
            u = np.empty(F, np.float32)
            idx2 = np.empty(K, np.int64)
            vals2 = np.empty(K, np.float32)
            counts[layer, _UP] += _role(xn, layer, _UP, weights, tests, u, idx2, vals2, nthreads)
            for j in range(kept):
                vals[j] *= u[idx[j]]
        for j in range(kept):
            m[idx[j]] = vals[j]
    counts[layer, _DOWN] += _role(m, layer, _DOWN, weights, tests, out, idx, vals, nthreads)
    return kept
