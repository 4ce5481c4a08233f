"""Block-quantised weight formats (int8, q4): the one definition the packer, the kernels,
the torch reference and the saved files share.

A quantised weight stores one 2-D matrix ``M`` in blocks of ``BLOCK`` = 32 consecutive
elements along ``M``'s last axis (each row of ``M`` is ``M.shape[1] / 32`` whole blocks).
Which matrix ``M`` is depends on the layout:

- ``rows``: ``M = W`` (out_features x in_features), blocks run along the input dimension.
  Read by the dense and the output-sparse GEMV (CATS/CHESS up and gate): a row's dot product
  walks its blocks.
- ``transposed``: ``M = W^T`` (in_features x out_features), blocks run along the output
  dimension. Read by the input-sparse GEMV: an active input channel is one contiguous run of
  out_features / 32 whole blocks (skipped inputs skip whole blocks).

The two layouts of one weight are *different quantisations* (the blocks group other
elements), so a model quantised for the input-sparse down projection has other values
than one quantised for the dense one; the layout is part of a weight's identity.

Formats (``M`` of shape (R, C), C a multiple of 32, ``nb = C / 32`` blocks per row):

``int8`` (:data:`INT8`), symmetric (like llama.cpp's Q8_0, 1.0625 bytes per weight):
    ``codes``: int8 (R, C), values in [-127, 127]; ``scales``: float16 (R, nb).
    Element: ``m = float32(q) * float32(scale)``. Packing: ``scale = fp16(max|m_block| / 127)``
    (a block whose scale is 0 in fp16 has codes 0), ``q = round_half_even(m / scale)`` with that
    fp16 scale, clamped to [-127, 127].

``q4`` (:data:`Q4`), asymmetric 4-bit (like Q4_1, 0.625 bytes per weight):
    ``codes``: uint8 (R, C / 2), two 4-bit codes per byte; ``scales``, ``mins``: float16 (R, nb).
    Nibble order: within block b of a row, byte ``16 * b + j`` (0 <= j < 16) holds element
    ``32 * b + j`` in its low nibble and element ``32 * b + j + 16`` in its high nibble (the
    two halves of a block unpack with one mask and one shift each, which vectorises).
    Element: ``m = float32(code) * float32(scale) + float32(min)``. Packing: ``min =
    fp16(min(m_block))``, ``scale = fp16((max(m_block) - min) / 15)`` (a block whose scale is 0
    has codes 0), ``code = round_half_even((m - min) / scale)`` with those fp16 values, clamped
    to [0, 15].

Scales and mins are fp16, as in GGUF's blocks (so its files load bit for bit, and a q4 weight
takes 0.625 bytes, not the 0.75 of fp32 ones). The kernels widen them to fp32 (``vcvtph2ps``);
numba has no float16 type, so the numpy views the kernels get hold their bits as uint16
(:meth:`QuantWeight.numpy`).

Shapes whose block axis is not a multiple of 32 are refused (:class:`UnsupportedError`
naming the shape), never padded: a padded block would change what the kernels read past the
end of a row, and every model dimension in scope (SmolLM2: 576, 1536, 49152) is a multiple.

All arithmetic that defines an element is fp32 (of the fp16 scale and min);
:func:`dequantize` is the specification the kernels are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actsparse.errors import UnsupportedError

BLOCK = 32
INT8 = "int8"
Q4 = "q4"
FORMATS = (INT8, Q4)
ROWS = "rows"
TRANSPOSED = "transposed"
LAYOUTS = (ROWS, TRANSPOSED)
SCALE_DTYPE = torch.float16
# the kernel-visible codes (WeightFormat values in kernels/formats.py use the same numbers)
FORMAT_CODES = {INT8: 2, Q4: 3}

__all__ = ["BLOCK", "INT8", "Q4", "FORMATS", "ROWS", "TRANSPOSED", "LAYOUTS", "SCALE_DTYPE", "QuantWeight",
           "quantize_weight", "quantize_matrix", "dequantize_matrix", "check_blockable"]


def check_blockable(shape, layout: str, what: str = "weight") -> None:
    """Refuse a (out, in) weight shape whose block axis is not a multiple of BLOCK."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    out_f, in_f = shape
    axis, n = ("in_features", in_f) if layout == ROWS else ("out_features", out_f)
    if n % BLOCK or n == 0:
        raise UnsupportedError(
            f"{what} of shape {tuple(shape)}: the {layout} layout blocks along {axis} = {n}, which is not a "
            f"positive multiple of {BLOCK}; quantise it in the other layout, or leave this linear dense "
            f"(exclude it from the quantisation)")


def quantize_matrix(m: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """Pack ``m`` (R, C), blocks along its last axis: {"codes", "scales"[, "mins"]} (CPU tensors)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantised format {fmt!r}; choose one of {', '.join(FORMATS)}")
    m = m.detach().to(device="cpu", dtype=torch.float32)
    R, C = m.shape
    if C % BLOCK:
        raise UnsupportedError(f"matrix of shape {(R, C)}: blocks of {BLOCK} need a multiple of {BLOCK} columns")
    if not bool(torch.isfinite(m).all()):
        raise UnsupportedError("the weight holds NaN/inf values; they cannot be quantised")
    b = m.reshape(R, C // BLOCK, BLOCK)
    if fmt == INT8:
        scale = _fp16(b.abs().amax(-1) / 127.0, "scale")
        s32 = scale.float()
        safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
        q = torch.round(b / safe[..., None]).clamp_(-127, 127)
        q = torch.where(s32[..., None] > 0, q, torch.zeros_like(q))
        return {"codes": q.to(torch.int8).reshape(R, C).contiguous(), "scales": scale.contiguous()}
    lo = _fp16(b.amin(-1), "min")
    lo32 = lo.float()
    scale = _fp16((b.amax(-1) - lo32) / 15.0, "scale")
    s32 = scale.float()
    safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
    c = torch.round((b - lo32[..., None]) / safe[..., None]).clamp_(0, 15)
    c = torch.where(s32[..., None] > 0, c, torch.zeros_like(c)).to(torch.uint8)
    packed = c[..., :16] | (c[..., 16:] << 4)
    return {"codes": packed.reshape(R, C // 2).contiguous(), "scales": scale.contiguous(), "mins": lo.contiguous()}


def _fp16(v: torch.Tensor, what: str) -> torch.Tensor:
    h = v.to(SCALE_DTYPE)
    if not bool(torch.isfinite(h).all()):
        raise UnsupportedError(f"a block {what} of this weight ({float(v.abs().max()):.4g}) overflows the fp16 the "
                               f"formats store it in (at most 65504); leave this linear dense")
    return h


def dequantize_matrix(fmt: str, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """The fp32 matrix a packed one stands for (the specification of every kernel)."""
    R, nb = scales.shape
    if fmt == INT8:
        q = codes.reshape(R, nb, BLOCK).to(torch.float32)
        return (q * scales.float()[..., None]).reshape(R, nb * BLOCK)
    if fmt == Q4:
        p = codes.reshape(R, nb, BLOCK // 2)
        c = torch.cat([p & 15, p >> 4], dim=-1).to(torch.float32)
        return (c * scales.float()[..., None] + mins.float()[..., None]).reshape(R, nb * BLOCK)
    raise ValueError(f"unknown quantised format {fmt!r}; choose one of {', '.join(FORMATS)}")


@dataclass
class QuantWeight:
    """One packed weight: the logical (out, in) ``shape``, its ``fmt`` and ``layout``, and the
    stored tensors (``mins`` is None for int8). ``M`` is W (rows) or W^T (transposed)."""

    fmt: str
    layout: str
    shape: tuple[int, int]
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """The logical fp32 weight W (out x in)."""
        m = dequantize_matrix(self.fmt, self.codes, self.scales, self.mins)
        return m if self.layout == ROWS else m.t()

    def __post_init__(self):
        for name in ("scales", "mins"):
            t = getattr(self, name)
            if t is not None and t.dtype != SCALE_DTYPE:
                raise ValueError(f"a packed weight's {name} are {SCALE_DTYPE}, these are {t.dtype} (model.to(dtype) "
                                 f"and .float() cast a QuantLinear's buffers too): re-quantise, or reload the "
                                 f"quantised model, instead of casting it")

    def numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(codes, scales, mins) as zero-copy numpy views for the kernels: scales and mins as the
        uint16 bits of their fp16 values; int8 gets an empty (0, 0) mins."""
        mins = self.mins if self.mins is not None else torch.empty((0, 0), dtype=SCALE_DTYPE)
        return self.codes.numpy(), self.scales.numpy().view(np.uint16), mins.numpy().view(np.uint16)

    @property
    def nbytes(self) -> int:
        n = self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()
        return n + (self.mins.numel() * self.mins.element_size() if self.mins is not None else 0)


def quantize_weight(w: torch.Tensor, fmt: str, layout: str = ROWS) -> QuantWeight:
    """Pack a Linear weight W (out x in) in ``fmt`` and ``layout``."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D Linear weight (out x in), got shape {tuple(w.shape)}")
    check_blockable(tuple(w.shape), layout)
    m = w if layout == ROWS else w.t()
    p = quantize_matrix(m, fmt)
    return QuantWeight(fmt, layout, (int(w.shape[0]), int(w.shape[1])), p["codes"], p["scales"], p.get("mins"))
