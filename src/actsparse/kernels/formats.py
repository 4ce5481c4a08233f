"""Weight formats the kernels read, and the one rule for how each is stored in numpy.

Kernels see numpy arrays. fp32 weights are ``float32`` arrays; bf16 weights are ``uint16``
arrays holding the same 16 bits (numba has no bf16 type: the kernels widen each element to
fp32 by shifting it into the high half of a 32-bit word, see
:func:`actsparse.kernels.primitives.to_f32`). This module is the only place that knows
that mapping; everything else asks :func:`weight_format` / :func:`numpy_view`.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

from actsparse.errors import UnsupportedError


class WeightFormat(IntEnum):
    """How a weight matrix is stored for the kernels (kernel-visible: the values are the codes)."""

    F32 = 0
    BF16 = 1
    # block-quantised formats (codes, scales[, mins]; see kernels/quant_formats.py, which defines them)
    INT8 = 2
    Q4 = 3


TORCH_DTYPE = {WeightFormat.F32: torch.float32, WeightFormat.BF16: torch.bfloat16}
STORAGE_DTYPE = {WeightFormat.F32: np.float32, WeightFormat.BF16: np.uint16,
                 WeightFormat.INT8: np.int8, WeightFormat.Q4: np.uint8}  # quantised: the dtype of the codes
KERNEL_DTYPES = tuple(TORCH_DTYPE.values())


def weight_format(t: torch.Tensor | torch.dtype) -> WeightFormat:
    """The format of a tensor (or dtype) the kernels can read; other dtypes raise."""
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    for fmt, dt in TORCH_DTYPE.items():
        if dt == dtype:
            return fmt
    raise UnsupportedError(f"the kernels read fp32 and bf16 weights, not {dtype}; convert the model with "
                           "model.to(torch.float32) or model.to(torch.bfloat16)")


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor in its kernel storage dtype (bf16 -> uint16 bits)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(STORAGE_DTYPE[WeightFormat.BF16])
    return t.numpy()


def empty_weights(fmt: WeightFormat) -> np.ndarray:
    """A (0, 0) placeholder in ``fmt``'s storage dtype (for typed lists that need every slot)."""
    return np.empty((0, 0), STORAGE_DTYPE[fmt])
