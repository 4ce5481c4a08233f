"""Activation-sparse CPU GEMV kernels (batch-1 decode), fp32 and bf16.

    from actsparse.kernels import sparse_input_gemv, to_kernel_layout
    wt = to_kernel_layout(linear.weight, torch.bfloat16)   # (in, out), once
    y = sparse_input_gemv(x, wt, threshold)                # = F.linear(x * (|x| > t), W)

Importing this package is cheap: numba is imported, and the kernels compiled, on
the first call (compiled code is cached on disk; ``NUMBA_CACHE_DIR`` defaults to
``~/.cache/actsparse/numba``). Set ``ACTSPARSE_DISABLE_NUMBA=1`` to use the pure
torch reference instead.
"""
from __future__ import annotations

import os

# before numba is imported anywhere through this package
os.environ.setdefault(
    "NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "actsparse", "numba")
)

from actsparse.kernels.dispatch import (  # noqa: E402
    backend,
    gated_mlp_step,
    numba_enabled,
    sparse_input_gemv,
    sparse_output_gemv,
    to_kernel_layout,
)

__all__ = [
    "backend",
    "gated_mlp_step",
    "numba_enabled",
    "sparse_input_gemv",
    "sparse_output_gemv",
    "to_kernel_layout",
]
