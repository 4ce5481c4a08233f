"""Block-quantised weights (int8, q4) for a model, with AWQ from calibration statistics.

    from actsparse.quant import Q4Config, quantize_, save_quantized, load_quantized
    quantize_(model, Q4Config(awq=True), calibration=windows)

Modules: ``config`` (Int8Config, Q4Config), ``modules`` (QuantLinear), ``awq`` (scale search
and exact folds), ``api`` (quantize_, save / load), ``gguf`` (load_gguf_quantized_: a GGUF
file's Q8_0 / Q4_0 / Q4_1 tensors as int8 / q4, losslessly). The formats and kernels live in
:mod:`actsparse.kernels.quant_formats` / ``quant_numba`` / ``quant_dispatch``.
"""
from actsparse.quant.api import calibration_rows, load_quantized, plan_layouts, quantize_, save_quantized
from actsparse.quant.gguf import load_gguf_quantized_
from actsparse.quant.config import CONFIGS, Int8Config, Q4Config, QuantConfig
from actsparse.quant.modules import QuantLinear

__all__ = ["CONFIGS", "Int8Config", "Q4Config", "QuantConfig", "QuantLinear", "quantize_", "save_quantized", "load_quantized", "plan_layouts",
           "load_gguf_quantized_",
           "calibration_rows"]
