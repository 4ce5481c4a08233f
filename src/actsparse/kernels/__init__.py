"""Activation-sparse CPU GEMV kernels (batch-1 decode), fp32 and bf16.

    from actsparse.kernels import sparse_input_gemv, to_kernel_layout
    wt = to_kernel_layout(linear.weight, torch.bfloat16)   # (in, out), once
    y = sparse_input_gemv(x, wt, threshold)                # = F.linear(x * (|x| > t), W)

Modules: ``formats`` (weight formats and their numpy storage), ``primitives`` (public numba
building blocks), ``numba_cpu`` (the GEMV kernels), ``reference`` (the torch specification
of every kernel), ``dispatch`` (the torch-facing API that picks one of them).

Importing this package is cheap: numba is imported, and the kernels compiled, on the
first call (compiled code is cached under the actsparse cache directory, see
:mod:`actsparse.numba_backend`). Set ``ACTSPARSE_DISABLE_NUMBA=1`` to use the pure torch
reference instead.
"""
from __future__ import annotations

from actsparse.kernels.dispatch import (
    backend,
    expert_mlp_step,
    gated_mlp_step,
    numba_enabled,
    sparse_input_gemv,
    sparse_output_gemv,
    to_kernel_layout,
)

__all__ = [
    "backend",
    "expert_mlp_step",
    "gated_mlp_step",
    "numba_enabled",
    "sparse_input_gemv",
    "sparse_output_gemv",
    "to_kernel_layout",
]
