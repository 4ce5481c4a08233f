"""CATS: threshold ``|act(g)|`` per layer at the s-quantile (MLP only).

``h = act(g) * keep * u``: a zero at neuron i lets a kernel skip row i of up_proj and
column i of down_proj (gate stays dense).
"""
from __future__ import annotations

from dataclasses import dataclass

from actsparse.config import SparsityConfig, register_config
from actsparse.measure.accumulators import SiteStats


@register_config
@dataclass(frozen=True)
class CATS(SparsityConfig):
    METHOD = "cats"
    VERSION = 1
    sparsity: float = 0.5
    overrides: tuple[tuple[str, float | None], ...] = ()


def act_threshold(stats: SiteStats, sparsity: float) -> float:
    return 0.0 if sparsity <= 0 else stats.abs_quantile(sparsity)
