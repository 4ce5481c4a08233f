"""Torch reference of the quantised kernels: dequantise (the format's specification,
:func:`actsparse.kernels.quant_formats.QuantWeight.dequantize`), then the masked dense forward
of :mod:`actsparse.kernels.reference`. Every quantised kernel is tested against these; they
are also the fallback when numba is off or ``x`` holds more than one row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from actsparse.kernels import reference as ref
from actsparse.kernels.quant_formats import QuantWeight

__all__ = ["q_dense_gemv_ref", "q_input_sparse_gemv_ref", "q_output_sparse_gemv_ref", "q_gated_mlp_step_ref"]


def q_dense_gemv_ref(x, qw: QuantWeight, *, compute_dtype=torch.float32, out_dtype=None):
    """y = F.linear(x, dequantize(W))."""
    y = F.linear(x.to(compute_dtype), qw.dequantize().to(compute_dtype))
    return y.to(out_dtype or x.dtype)


def q_input_sparse_gemv_ref(x, qw: QuantWeight, threshold, *, compute_dtype=torch.float32, out_dtype=None):
    """y = F.linear(x * (|x| > t), dequantize(W))."""
    return ref.sparse_input_gemv_ref(x, qw.dequantize().t(), threshold, compute_dtype=compute_dtype,
                                     out_dtype=out_dtype)


def q_output_sparse_gemv_ref(x, qw: QuantWeight, active, *, compute_dtype=torch.float32, out_dtype=None):
    """Rows i of dequantize(W) x where active (a mask, row indices or values; see reference)."""
    return ref.sparse_output_gemv_ref(x, qw.dequantize(), active, compute_dtype=compute_dtype, out_dtype=out_dtype)


def q_gated_mlp_step_ref(x, q_gate: QuantWeight, q_up: QuantWeight, q_down: QuantWeight, threshold,
                         act: str = "silu", *, return_active: bool = False, compute_dtype=torch.float32,
                         out_dtype=None):
    """The CATS/CHESS gated MLP step of reference.gated_mlp_step_ref on the dequantised weights
    (q_down is the down projection, logical shape hidden x intermediate)."""
    return ref.gated_mlp_step_ref(x, q_gate.dequantize(), q_up.dequantize(), q_down.dequantize().t(), threshold,
                                  act, return_active=return_active, compute_dtype=compute_dtype,
                                  out_dtype=out_dtype)
