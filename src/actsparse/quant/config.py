"""Quantisation configs (torchao convention): ``quantize_(model, Q4Config(awq=True), calibration=...)``.

``group`` is the block size of the formats (:mod:`actsparse.kernels.quant_formats`), fixed at 32.
``transposed``: the roles (e.g. ``("mlp.down",)``) packed in the transposed layout, the one the
input-sparse GEMV reads; the others use the rows layout. The layout decides which elements
share a block, so it is part of the quantised values. ``lm_head``: quantise the output head too
(plain rounding, rows layout; it is untied from the embedding, which stays dense), in
``head_format`` (default: the config's own format; e.g. ``Q4Config(lm_head=True,
head_format="int8")``, as llama.cpp's Q4_0 files keep an 8-bit head: a q4 head costs SmolLM2
+6% perplexity, an int8 one nothing). AWQ (``awq=True``):
per-input-channel scales ``s = mean|x|^alpha`` searched over ``alpha_grid`` points of [0, 1]
on ``sample_rows`` calibration rows per linear group, folded into the preceding norm or linear.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from actsparse.config import VersionedConfig
from actsparse.errors import ConfigError
from actsparse.kernels.quant_formats import BLOCK, INT8, Q4


@dataclass(frozen=True)
class QuantConfig(VersionedConfig):
    KIND_KEY: ClassVar[str] = "format"
    group: int = BLOCK
    awq: bool = False
    lm_head: bool = False
    head_format: str | None = None
    transposed: tuple[str, ...] = ()
    alpha_grid: int = 20
    sample_rows: int = 512

    def __post_init__(self):
        if self.group != BLOCK:
            raise ConfigError(f"group must be {BLOCK} (the only block size the formats and kernels define), "
                              f"got {self.group}")
        if self.alpha_grid < 2:
            raise ConfigError(f"alpha_grid must be at least 2 points of [0, 1], got {self.alpha_grid}")
        if self.sample_rows < 1:
            raise ConfigError(f"sample_rows must be >= 1, got {self.sample_rows}")
        if self.head_format is not None:
            if self.head_format not in (INT8, Q4):
                raise ConfigError(f"head_format must be {INT8} or {Q4} (or None: the config's format), "
                                  f"got {self.head_format!r}")
            if not self.lm_head:
                raise ConfigError("head_format is the lm_head's format: set lm_head=True too")
        from actsparse.models.sitemaps import LINEAR_ROLES

        bad = [r for r in self.transposed if r not in LINEAR_ROLES]
        if bad:
            raise ConfigError(f"transposed names unknown linear roles {bad}; valid: {', '.join(LINEAR_ROLES)}")

    @property
    def fmt(self) -> str:
        return self.KIND

    @property
    def head_fmt(self) -> str:
        """The lm_head's format when ``lm_head`` is set."""
        return self.head_format or self.KIND


@dataclass(frozen=True)
class Int8Config(QuantConfig):
    """Symmetric int8, blocks of 32, one fp16 scale per block."""

    KIND: ClassVar[str] = INT8


@dataclass(frozen=True)
class Q4Config(QuantConfig):
    """Asymmetric 4-bit (code * scale + min), blocks of 32; ``awq=False`` is plain rounding (RTN)."""

    KIND: ClassVar[str] = Q4


CONFIGS = {c.KIND: c for c in (Int8Config, Q4Config)}


def config_from_dict(d: dict) -> QuantConfig:
    kind = d.get(QuantConfig.KIND_KEY) if isinstance(d, dict) else None
    if kind not in CONFIGS:
        raise ConfigError(f"unknown quantisation format {kind!r}; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[kind].from_dict(d)
