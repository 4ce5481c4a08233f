"""The module that replaces a quantised ``nn.Linear``: packed weights, dense-equivalent forward."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from actsparse.kernels.quant_formats import (BLOCK, FORMATS, INT8, ROWS, SCALE_DTYPE, QuantWeight, check_blockable,
                                             quantize_weight)


STATE_ATTR = "_actsparse_quant"  # the quantised model's description (quantize_ / load_quantized set it)


def quant_description(model: nn.Module) -> dict | None:
    """The description of a quantised model (config, the dense model's identity, linears), or None."""
    return model.__dict__.get(STATE_ATTR)


class QuantLinear(nn.Module):
    """A Linear whose weight is stored packed (codes, scales[, mins] buffers; see
    :mod:`actsparse.kernels.quant_formats`). ``forward`` is the dense forward of the dequantised
    weight, in the input's dtype: the specification the quantised kernels are tested against.
    :meth:`quant_weight` hands the packed weight to those kernels (decode integration).
    ``input_scale`` (fp32, in_features; AWQ-scaled linears only): the scale s its input channels
    were divided by, so that a plan calibrated on the dense model can test ``|x / s| > t / s``."""

    def __init__(self, fmt: str, layout: str, out_features: int, in_features: int, bias: bool = False):
        super().__init__()
        check_blockable((out_features, in_features), layout)
        self.fmt, self.layout = fmt, layout
        self.out_features, self.in_features = out_features, in_features
        rows, cols = (out_features, in_features) if layout == ROWS else (in_features, out_features)
        if fmt not in FORMATS:
            raise ValueError(f"unknown quantised format {fmt!r}; choose one of {', '.join(FORMATS)}")
        # zero-filled packed buffers of the right shapes (filled by from_linear or load_state_dict)
        codes = (torch.zeros(rows, cols, dtype=torch.int8) if fmt == INT8
                 else torch.zeros(rows, cols // 2, dtype=torch.uint8))
        self.register_buffer("codes", codes)
        self.register_buffer("scales", torch.zeros(rows, cols // BLOCK, dtype=SCALE_DTYPE))
        if fmt != INT8:
            self.register_buffer("mins", torch.zeros(rows, cols // BLOCK, dtype=SCALE_DTYPE))
        else:
            self.mins = None
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.register_buffer("input_scale", None)

    def set_input_scale(self, s: torch.Tensor | None) -> None:
        """Record (or, with a zero placeholder to be loaded, reserve) the AWQ input scale."""
        if s is not None and tuple(s.shape) != (self.in_features,):
            raise ValueError(f"an input scale of shape {tuple(s.shape)} for a linear of {self.in_features} inputs")
        self.input_scale = None if s is None else s.detach().to(torch.float32).clone()

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, layout: str) -> "QuantLinear":
        q = cls(fmt, layout, linear.out_features, linear.in_features, linear.bias is not None)
        qw = quantize_weight(linear.weight.detach(), fmt, layout)
        q.codes, q.scales = qw.codes, qw.scales
        if qw.mins is not None:
            q.mins = qw.mins
        if linear.bias is not None:
            q.bias.data = linear.bias.detach().to(torch.float32).clone()
        return q

    def quant_weight(self) -> QuantWeight:
        return QuantWeight(self.fmt, self.layout, (self.out_features, self.in_features), self.codes, self.scales,
                           self.mins)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised fp32 weight (out x in); computed on every access, not stored."""
        return self.quant_weight().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"layout={self.layout}, bias={self.bias is not None}")
