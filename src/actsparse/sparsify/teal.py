"""TEAL: magnitude thresholds on the input of every linear in each block.

Keep ``v`` iff ``|v| > t``; per layer and per input kind, ``t`` is the s-quantile of ``|v|``
on calibration data. q/k/v share one input (one threshold), gate/up share one input.
Uniform s everywhere (the block-wise greedy allocation of the paper is not implemented yet).
"""
from __future__ import annotations

from dataclasses import dataclass

from actsparse.config import SparsityConfig, register_config
from actsparse.errors import ConfigError
from actsparse.measure.accumulators import SiteStats

# input kinds: the role whose input is masked, and the linears that read it
INPUT_KINDS = {
    "attn.q": ("attn.q", "attn.k", "attn.v"),
    "attn.o": ("attn.o",),
    "mlp.gate": ("mlp.gate", "mlp.up"),
    "mlp.down": ("mlp.down",),
}
ALLOCATIONS = ("uniform",)  # the block-wise greedy allocation is not implemented yet


@register_config
@dataclass(frozen=True)
class TEAL(SparsityConfig):
    """``sparsity``: target fraction of zeroed inputs; ``kinds``: which input kinds to sparsify;
    ``allocation``: "uniform" (the block-wise greedy allocation is not implemented yet)."""

    METHOD = "teal"
    VERSION = 1
    sparsity: float = 0.5
    kinds: tuple[str, ...] = ("attn.q", "attn.o", "mlp.gate", "mlp.down")
    allocation: str = "uniform"
    overrides: tuple[tuple[str, float | None], ...] = ()

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "kinds", tuple(self.kinds))
        bad = [k for k in self.kinds if k not in INPUT_KINDS]
        if bad:
            raise ConfigError(f"unknown TEAL input kind(s) {bad}; valid: {', '.join(INPUT_KINDS)}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")


def magnitude_threshold(stats: SiteStats, sparsity: float) -> float:
    """The s-quantile of |v| from the calibration histogram (0 at s = 0)."""
    if sparsity <= 0:
        return 0.0
    return stats.abs_quantile(sparsity)
