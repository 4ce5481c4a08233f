"""Fast batch-1 decoding on the sparse CPU kernels.

* :class:`DecodePlan` — the typed plan of what the compiled step does with every linear,
  built from the model's sparse modules and its site map.
* :class:`FastDecoder` — a compiled decode loop for LLaMA-style models (one numba call per
  token), dense or sparse (the model's sparse modules decide).
* :func:`accelerate_` — swaps a sparsified model's masked linears for kernel-backed ones so
  that ``model.generate`` uses the kernels for single-token steps (any mapped architecture).
"""
from __future__ import annotations

from actsparse.decode.accelerate import AccelerationReport, accelerate_, deaccelerate_
from actsparse.decode.fast import FastDecoder, GenerationResult
from actsparse.decode.plan import DecodePlan, Mode, Role

__all__ = ["AccelerationReport", "DecodePlan", "FastDecoder", "GenerationResult", "Mode", "Role", "accelerate_",
           "deaccelerate_"]
