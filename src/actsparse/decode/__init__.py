"""Fast batch-1 decoding on the sparse CPU kernels.

* :class:`FastDecoder` — a compiled decode loop for LLaMA-style models (one numba call per
  token), dense or sparse (the model's sparse modules decide).
* :func:`accelerate_` — swaps a sparsified model's masked linears for kernel-backed ones so
  that ``model.generate`` uses the kernels for single-token steps (any mapped architecture).
"""
from __future__ import annotations

import actsparse.kernels  # noqa: F401  (sets NUMBA_CACHE_DIR before numba is imported)
from actsparse.decode.accelerate import AccelerationReport, accelerate_, deaccelerate_
from actsparse.decode.fast import FastDecoder, GenerationResult

__all__ = ["AccelerationReport", "FastDecoder", "GenerationResult", "accelerate_", "deaccelerate_"]
