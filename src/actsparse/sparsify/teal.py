"""TEAL: magnitude thresholds on the input of every linear in each block.

Keep ``v`` iff ``|v| > t``; per layer and per input kind, ``t`` is the s-quantile of ``|v|``
on calibration data. q/k/v share one input (one threshold), gate/up share one input.
``allocation="uniform"``: the same s for every kind of every block. ``allocation="greedy"``:
the paper's block-wise greedy allocation (see :mod:`actsparse.sparsify.allocation`): per
block, the kinds' sparsities are raised one ``greedy_step`` at a time, always the kind whose
step adds the least block error per skipped parameter, until the block's parameter-weighted
sparsity is s.
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
ALLOCATIONS = ("uniform", "greedy")


@register_config
@dataclass(frozen=True)
class TEAL(SparsityConfig):
    """``sparsity``: target fraction of zeroed inputs; ``kinds``: which input kinds to sparsify;
    ``allocation``: "uniform" or "greedy" (block-wise, parameter-weighted sparsity = ``sparsity``
    per block); ``greedy_step``: the greedy's increment of one kind's sparsity;
    ``greedy_tokens``: calibration token rows per block on which the greedy measures the block
    error (ignored by "uniform")."""

    METHOD = "teal"
    VERSION = 1
    sparsity: float = 0.5
    kinds: tuple[str, ...] = ("attn.q", "attn.o", "mlp.gate", "mlp.down")
    allocation: str = "uniform"
    greedy_step: float = 0.05
    greedy_tokens: int = 512
    overrides: tuple[tuple[str, float | None], ...] = ()

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "kinds", tuple(self.kinds))
        bad = [k for k in self.kinds if k not in INPUT_KINDS]
        if bad:
            raise ConfigError(f"unknown TEAL input kind(s) {bad}; valid: {', '.join(INPUT_KINDS)}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        step = self.greedy_step
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 0.5:
            raise ConfigError(f"greedy_step must be in (0, 0.5], got {step!r}")
        object.__setattr__(self, "greedy_step", float(step))
        from actsparse.sparsify.calibration import MIN_CALIBRATION_TOKENS

        if isinstance(self.greedy_tokens, bool) or not isinstance(self.greedy_tokens, int) \
                or self.greedy_tokens < MIN_CALIBRATION_TOKENS:
            raise ConfigError(f"greedy_tokens must be an integer >= {MIN_CALIBRATION_TOKENS}, got {self.greedy_tokens!r}")
        if self.allocation == "greedy":
            from actsparse.sparsify.allocation import install_handler

            install_handler()  # TEAL's handler learns the greedy allocation


def magnitude_threshold(stats: SiteStats, sparsity: float) -> float:
    """The s-quantile of |v| from the calibration histogram (0 at s = 0)."""
    if sparsity <= 0:
        return 0.0
    return stats.abs_quantile(sparsity)
