"""Torch-facing API of the quantised kernels: a :class:`QuantWeight` in, a tensor out.

    qw = quantize_weight(linear.weight, "q4", "transposed")     # once
    y = q_input_sparse_gemv(x, qw, threshold)                   # = F.linear(x * (|x| > t), dequantize(W))

Layouts are checked, not converted: dense and output-sparse GEMV (and the gate/up of the
gated MLP) read the ``rows`` layout, input-sparse GEMV (and the MLP's down projection) the
``transposed`` one. The numba kernels run under the same conditions as
:mod:`actsparse.kernels.dispatch` (numba on, CPU, one vector x of fp32/bf16); otherwise the
torch reference (:mod:`actsparse.kernels.quant_reference`) runs. Results have x's dtype.
"""
from __future__ import annotations

import torch

from actsparse.kernels import quant_reference as qref
from actsparse.kernels import reference as ref
from actsparse.kernels.dispatch import _load_numba, _out_tensor, _single, _threshold_np, numba_enabled
from actsparse.kernels.formats import KERNEL_DTYPES, numpy_view
from actsparse.kernels.quant_formats import ROWS, TRANSPOSED, QuantWeight
from actsparse.numba_backend import kernel_threads

__all__ = ["q_dense_gemv", "q_input_sparse_gemv", "q_output_sparse_gemv", "q_gated_mlp_step"]

_qmod = None


def _qkernels():
    global _qmod
    if _qmod is None:
        from actsparse.kernels import quant_numba

        _qmod = quant_numba
    return _qmod


def _need(qw: QuantWeight, layout: str, what: str) -> None:
    if not isinstance(qw, QuantWeight):
        raise TypeError(f"{what} expects a QuantWeight (see quantize_weight), got {type(qw).__name__}")
    if qw.layout != layout:
        raise ValueError(f"{what} reads the {layout} layout, this weight is packed {qw.layout}; pack it with "
                         f"quantize_weight(w, {qw.fmt!r}, {layout!r})")


def _kernel_ok(x: torch.Tensor, k: int):
    xv = _single(x, k)
    if xv is None or x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES or not numba_enabled():
        return None
    _load_numba()  # starts the thread pool once
    return numpy_view(xv.contiguous())


def _shape_out(y, x, n):
    return y.reshape(*x.shape[:-1], n) if x.dim() != 1 else y


def _check_features(x, qw: QuantWeight) -> tuple[int, int]:
    """(M, K) of the weight, refusing an x whose last dimension is not K."""
    M, K = qw.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {qw.shape} expects {K}")
    return M, K


def q_dense_gemv(x, qw: QuantWeight):
    """y = F.linear(x, dequantize(W)); qw in the rows layout."""
    _need(qw, ROWS, "q_dense_gemv")
    M, K = _check_features(x, qw)
    xn = _kernel_ok(x, K)
    if xn is None:
        return qref.q_dense_gemv_ref(x, qw)
    y = _out_tensor(None, M, x.dtype)
    c, s, m = qw.numpy()
    _qkernels().q_dense_gemv(xn, c, s, m, numpy_view(y), kernel_threads())
    return _shape_out(y, x, M)


def q_input_sparse_gemv(x, qw: QuantWeight, threshold, *, return_active: bool = False):
    """y = F.linear(x * (|x| > t), dequantize(W)); qw in the transposed layout; threshold a float or
    a per-input-channel tensor. With ``return_active``: (y, active inputs)."""
    _need(qw, TRANSPOSED, "q_input_sparse_gemv")
    M, K = _check_features(x, qw)
    xn = _kernel_ok(x, K)
    if xn is None:
        y = qref.q_input_sparse_gemv_ref(x, qw, threshold)
        return (y, int(ref.input_mask(x, threshold).sum())) if return_active else y
    thr, ts = _threshold_np(threshold, K)
    y = _out_tensor(None, M, x.dtype)
    c, s, m = qw.numpy()
    n = _qkernels().q_input_sparse_gemv(xn, c, s, m, thr, ts, numpy_view(y), kernel_threads())
    y = _shape_out(y, x, M)
    return (y, int(n)) if return_active else y


def q_output_sparse_gemv(x, qw: QuantWeight, active, *, return_active: bool = False):
    """Rows i of dequantize(W) x where active, others exactly 0; qw in the rows layout. ``active``:
    a bool mask, an integer tensor of row indices, or float values v (rows with v_i != 0, times v_i)."""
    _need(qw, ROWS, "q_output_sparse_gemv")
    M, K = _check_features(x, qw)
    mask, _ = ref._active_rows(active.detach(), M)  # validates shape / index range
    xn = _kernel_ok(x, K)
    if xn is None:
        y = qref.q_output_sparse_gemv_ref(x, qw, active)
        return (y, int(mask.sum())) if return_active else y
    y = _out_tensor(None, M, x.dtype)
    c, s, m = qw.numpy()
    qk, nt, yn = _qkernels(), kernel_threads(), numpy_view(y)
    active = active.detach()
    if active.dtype == torch.bool:
        n = qk.q_output_sparse_gemv(xn, c, s, m, active.contiguous().view(torch.uint8).numpy(), False, yn, nt)
    elif active.is_floating_point():
        n = qk.q_output_sparse_gemv(xn, c, s, m, active.to(torch.float32).contiguous().numpy(), True, yn, nt)
    else:
        n = qk.q_output_sparse_gemv_rows(xn, c, s, m, active.reshape(-1).to(torch.int64).contiguous().numpy(),
                                         yn, nt)
    y = _shape_out(y, x, M)
    return (y, int(n)) if return_active else y


def q_gated_mlp_step(x, q_gate: QuantWeight, q_up: QuantWeight, q_down: QuantWeight, threshold,
                     act: str = "silu", *, return_active: bool = False):
    """Fused CATS/CHESS gated MLP for one token on quantised weights: gate and up in the rows
    layout (intermediate x hidden), down (logical hidden x intermediate) in the transposed layout.
    Same semantics as :func:`actsparse.kernels.gated_mlp_step`."""
    if act not in ref.ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(ref.ACTIVATIONS)}")
    _need(q_gate, ROWS, "q_gated_mlp_step (gate)")
    _need(q_up, ROWS, "q_gated_mlp_step (up)")
    _need(q_down, TRANSPOSED, "q_gated_mlp_step (down)")
    F_, D = q_gate.shape
    if q_up.shape != (F_, D) or q_down.shape != (D, F_):
        raise ValueError(f"gate and up must be (intermediate x hidden) and down (hidden x intermediate); got "
                         f"{q_gate.shape}, {q_up.shape}, {q_down.shape}")
    if x.shape[-1] != D:
        raise ValueError(f"x has {x.shape[-1]} features, the MLP expects {D}")
    xn = _kernel_ok(x, D)
    if xn is None:
        return qref.q_gated_mlp_step_ref(x, q_gate, q_up, q_down, threshold, act, return_active=return_active)
    thr, ts = _threshold_np(threshold, F_)
    y = _out_tensor(None, D, x.dtype)
    from actsparse.kernels.reference import ACT_CODES

    n = _qkernels().q_gated_mlp(xn, *q_gate.numpy(), *q_up.numpy(), *q_down.numpy(), thr, ts, ACT_CODES[act],
                                numpy_view(y), kernel_threads())
    y = _shape_out(y, x, D)
    return (y, int(n)) if return_active else y
