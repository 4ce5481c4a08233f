"""Torch-facing kernel API: picks the numba kernels or the torch reference.

The numba kernels run when numba imports, ``ACTSPARSE_DISABLE_NUMBA`` is not set
to a true value, the tensors are on the CPU, ``x`` is a single vector and all
dtypes are fp32 or bf16. Other dtypes (fp16, ...) fall back to the reference with
a warning naming the dtype; batched ``x`` (more than one row) and non-CPU tensors
use the reference silently (the dense path is the right one there).

Threads follow ``torch.get_num_threads()``, clamped to
``numba.config.NUMBA_NUM_THREADS``; numba's pool and torch's are not busy at the
same time (a kernel call blocks the caller until it is done).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from actsparse.kernels import reference as ref
from actsparse.kernels.formats import KERNEL_DTYPES, numpy_view
from actsparse.numba_backend import kernel_threads, numba_enabled as backend_enabled, start_thread_pool

__all__ = [
    "backend",
    "numba_enabled",
    "sparse_input_gemv",
    "sparse_output_gemv",
    "gated_mlp_step",
    "to_kernel_layout",
]

_numba_mod = None  # actsparse.kernels.numba_cpu once imported, False if it cannot be


def _load_numba():
    global _numba_mod
    if _numba_mod is None:
        try:
            from actsparse.kernels import numba_cpu

            _numba_mod = numba_cpu
        except ImportError:  # numba (or llvmlite) missing
            _numba_mod = False
        else:
            start_thread_pool()
    return _numba_mod


def numba_enabled() -> bool:
    """True when calls may use the numba kernels (numba importable, not disabled)."""
    return backend_enabled() and bool(_load_numba())


def backend() -> str:
    """"numba" or "torch" (the reference), for reports."""
    return "numba" if numba_enabled() else "torch"


def to_kernel_layout(linear_weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Contiguous transposed copy (in_features x out_features) of a Linear weight,
    in ``dtype`` (default: the weight's), for :func:`sparse_input_gemv`."""
    w = linear_weight.detach()
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D Linear weight (out x in), got shape {tuple(w.shape)}")
    if dtype is not None:
        w = w.to(dtype)
    return w.t().contiguous()


# ---------------------------------------------------------------------------
def _use_kernel(name: str, x: torch.Tensor, *weights: torch.Tensor) -> bool:
    if not numba_enabled():
        return False
    if x.device.type != "cpu" or any(w.device.type != "cpu" for w in weights):
        return False
    for t in (x, *weights):
        if t.dtype not in KERNEL_DTYPES:
            warnings.warn(
                f"actsparse.kernels.{name}: dtype {t.dtype} is not supported by the numba "
                "kernels (fp32, bf16); using the slow torch reference",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
    return True


def _threshold_np(threshold, n: int) -> tuple[np.ndarray, int]:
    """(fp32 array, stride): stride 0 for a scalar threshold, 1 for per-channel."""
    if isinstance(threshold, torch.Tensor):
        t = threshold.detach()
        if t.dim() == 0:
            return np.array([float(t)], np.float32), 0
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(
                f"per-channel threshold must be 1-D of length {n}, got shape {tuple(t.shape)}"
            )
        return t.to(device="cpu", dtype=torch.float32).contiguous().numpy(), 1
    t = float(threshold)
    if t != t:
        raise ValueError("threshold is NaN")
    return np.array([t], np.float32), 0


def _contig(t: torch.Tensor, what: str) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(
            f"{what} must be contiguous; make it once with .contiguous() "
            "(or to_kernel_layout for a transposed weight), not per call"
        )
    return t


def _out_tensor(out, n: int, dtype) -> torch.Tensor:
    if out is None:
        return torch.empty(n, dtype=dtype)
    if out.shape != (n,) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous ({n},) tensor of dtype {dtype}, got "
            f"{tuple(out.shape)} {out.dtype}"
        )
    return out


def _single(x: torch.Tensor, k: int):
    """x as a 1-D vector if it holds one row of k features, else None."""
    if x.dim() == 1:
        return x if x.shape[0] == k else None
    if x.numel() == k and x.shape[-1] == k:
        return x.reshape(k)
    return None


# ---------------------------------------------------------------------------
def sparse_input_gemv(x, wt, threshold, out=None, *, return_active: bool = False):
    """y = F.linear(x * (|x| > t), W) with ``wt`` = W^T (in_features x out_features).

    x: (in_features,) fp32/bf16; wt: contiguous fp32/bf16 (see :func:`to_kernel_layout`);
    threshold: python float or per-input-channel 1-D tensor; y has x's dtype,
    accumulated in fp32. With ``return_active``, returns (y, number of active inputs).
    """
    if wt.dim() != 2 or x.shape[-1] != wt.shape[0]:
        raise ValueError(
            f"x has {x.shape[-1]} features but wt has shape {tuple(wt.shape)}; wt must be "
            "the transposed weight (in_features x out_features), see to_kernel_layout"
        )
    K, N = wt.shape
    xv = _single(x, K)
    if xv is None or not _use_kernel("sparse_input_gemv", x, wt):
        y = ref.sparse_input_gemv_ref(x, wt, threshold, out)
        if return_active:
            return y, int(ref.input_mask(x, threshold).sum())
        return y
    nc = _load_numba()
    thr, ts = _threshold_np(threshold, K)
    y = _out_tensor(out, N, x.dtype)
    n = nc.input_sparse_gemv(
        numpy_view(_contig(xv, "x")), numpy_view(_contig(wt, "wt")), thr, ts, numpy_view(y), kernel_threads()
    )
    if out is None and x.dim() != 1:
        y = y.reshape(*x.shape[:-1], N)
    return (y, int(n)) if return_active else y


def sparse_output_gemv(x, w, active, out=None, *, return_active: bool = False):
    """Rows i of y = W x where active; inactive outputs are exactly 0.

    w: (out_features x in_features), contiguous, fp32/bf16 (the normal layout).
    ``active``: a bool mask (out_features,); an integer tensor of row indices; or a
    float tensor of values v, where rows with v_i != 0 are computed and multiplied
    by v_i (h = a * (W_up x) after a CATS gate). y has x's dtype.
    """
    if w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"x has {x.shape[-1]} features but w has shape {tuple(w.shape)} (expected out x in)"
        )
    M, K = w.shape
    xv = _single(x, K)
    if xv is None or not _use_kernel("sparse_output_gemv", x, w):
        y = ref.sparse_output_gemv_ref(x, w, active, out)
        if return_active:
            return y, int(ref._active_rows(active, M)[0].sum())
        return y
    nc = _load_numba()
    y = _out_tensor(out, M, x.dtype)
    xn, wn, nt = numpy_view(_contig(xv, "x")), numpy_view(_contig(w, "w")), kernel_threads()
    active = active.detach()
    if active.dtype == torch.bool:
        if active.shape != (M,):
            raise ValueError(f"active mask must have shape ({M},), got {tuple(active.shape)}")
        n = nc.output_sparse_gemv(xn, wn, active.contiguous().view(torch.uint8).numpy(), False, numpy_view(y), nt)
    elif active.is_floating_point():
        if active.shape != (M,):
            raise ValueError(f"active values must have shape ({M},), got {tuple(active.shape)}")
        vals = active.to(torch.float32).contiguous().numpy()
        n = nc.output_sparse_gemv(xn, wn, vals, True, numpy_view(y), nt)
    else:
        rows = active.reshape(-1).to(torch.int64).contiguous()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= M):
            raise ValueError(f"active indices must be in [0, {M})")
        n = nc.output_sparse_gemv_rows(xn, wn, rows.numpy(), numpy_view(y), nt)
    if out is None and x.dim() != 1:
        y = y.reshape(*x.shape[:-1], M)
    return (y, int(n)) if return_active else y


def gated_mlp_step(
    x, w_gate, w_up, wt_down, threshold, act: str = "silu", out=None, *, return_active: bool = False
):
    """Fused CATS/CHESS gated MLP for one token.

    g = W_gate x (dense), a = act(g); neuron i is kept iff |a_i| > t_i (t a float or
    a per-neuron tensor); h_i = a_i * (W_up[i] . x) for kept i; y = sum_i h_i wt_down[i, :].
    w_gate, w_up: (intermediate x hidden); wt_down: the transposed down_proj weight
    (intermediate x hidden, see :func:`to_kernel_layout`). act: silu, gelu_tanh,
    gelu (erf) or relu. y has x's dtype. With ``return_active``: (y, kept neurons).
    """
    if act not in ref.ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(ref.ACTIVATIONS)}")
    if w_gate.dim() != 2 or w_up.shape != w_gate.shape or wt_down.shape != w_gate.shape:
        raise ValueError(
            "w_gate and w_up must be (intermediate x hidden) and wt_down the transposed "
            f"down weight of the same shape; got {tuple(w_gate.shape)}, {tuple(w_up.shape)}, "
            f"{tuple(wt_down.shape)}"
        )
    F_, D = w_gate.shape
    if x.shape[-1] != D:
        raise ValueError(f"x has {x.shape[-1]} features, the MLP expects {D}")
    xv = _single(x, D)
    if xv is None or not _use_kernel("gated_mlp_step", x, w_gate, w_up, wt_down):
        return ref.gated_mlp_step_ref(
            x, w_gate, w_up, wt_down, threshold, act, out, return_active=return_active
        )
    nc = _load_numba()
    thr, ts = _threshold_np(threshold, F_)
    y = _out_tensor(out, D, x.dtype)
    n = nc.gated_mlp(
        numpy_view(_contig(xv, "x")),
        numpy_view(_contig(w_gate, "w_gate")),
        numpy_view(_contig(w_up, "w_up")),
        numpy_view(_contig(wt_down, "wt_down")),
        thr,
        ts,
        nc.ACT_CODES[act],
        numpy_view(y),
        kernel_threads(),
    )
    if out is None and x.dim() != 1:
        y = y.reshape(*x.shape[:-1], D)
    return (y, int(n)) if return_active else y


def expert_mlp_step(x, w_gate, w_up, wt_down, router_weight, router_bias, top_k: int, act: str = "silu", out=None,
                    *, return_chosen: bool = False):
    """Expert-block gated MLP for one token (Read-ME-style experts, :mod:`actsparse.moe`).

    The neurons are in E contiguous experts of m = intermediate / E (``moe.permute_mlp_``
    puts them so); the router ``router_weight x + router_bias`` (E x hidden, E) picks the
    top_k experts, and only their m rows of w_gate and w_up and m rows of the transposed down
    weight ``wt_down`` are read: whole blocks, which stream at the dense speed where CATS's
    scattered rows do not. Equal to :func:`~actsparse.kernels.reference.expert_mlp_step_ref`
    (ties between router scores may pick other experts). With ``return_chosen``:
    (y, the chosen experts, ascending)."""
    if act not in ref.ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(ref.ACTIVATIONS)}")
    if w_gate.dim() != 2 or w_up.shape != w_gate.shape or wt_down.shape != w_gate.shape:
        raise ValueError("w_gate and w_up must be (intermediate x hidden) and wt_down the transposed down weight "
                         f"of the same shape; got {tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(wt_down.shape)}")
    F_, D = w_gate.shape
    E = router_weight.shape[0] if router_weight.dim() == 2 else -1
    if router_weight.dim() != 2 or router_weight.shape[1] != D or tuple(router_bias.shape) != (E,):
        raise ValueError(f"the router must be (experts x {D}) with a bias of (experts,); got "
                         f"{tuple(router_weight.shape)} and {tuple(router_bias.shape)}")
    if E < 1 or F_ % E:
        raise ValueError(f"{E} experts do not split {F_} neurons evenly; choose E dividing {F_}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in 1..{E} (the number of experts), got {top_k}")
    if x.shape[-1] != D:
        raise ValueError(f"x has {x.shape[-1]} features, the MLP expects {D}")
    xv = _single(x, D)
    if xv is None or not _use_kernel("expert_mlp_step", x, w_gate, w_up, wt_down, router_weight):
        return ref.expert_mlp_step_ref(x, w_gate, w_up, wt_down, router_weight, router_bias, top_k, act, out,
                                       return_chosen=return_chosen)
    nc = _load_numba()
    y = _out_tensor(out, D, x.dtype)
    chosen = np.empty(top_k, np.int64)
    nc.expert_mlp(numpy_view(_contig(xv, "x")), numpy_view(_contig(w_gate, "w_gate")),
                  numpy_view(_contig(w_up, "w_up")), numpy_view(_contig(wt_down, "wt_down")),
                  numpy_view(_contig(router_weight, "router_weight")),
                  router_bias.detach().to(torch.float32).contiguous().numpy(), top_k, nc.ACT_CODES[act], chosen,
                  numpy_view(y), kernel_threads())
    if out is None and x.dim() != 1:
        y = y.reshape(*x.shape[:-1], D)
    return (y, torch.from_numpy(chosen)) if return_chosen else y
