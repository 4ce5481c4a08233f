"""CHESS: channel-wise thresholds for the MLP activation.

Importance of neuron i: ``|act(g_i)| * E|u_i|``; ``T`` = per-layer s-quantile of the
importance on calibration data; per-neuron threshold on ``|act(g_i)|``: ``t_i = T / E|u_i|``.
The "selective" variant also thresholds the inputs of chosen attention projections
(per-layer quantile of ``|v|``, as TEAL).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from actsparse.config import SparsityConfig, check_sparsity, register_config
from actsparse.errors import ConfigError

ATTENTION_KINDS = ("attn.q", "attn.k", "attn.v", "attn.o")


@register_config
@dataclass(frozen=True)
class CHESS(SparsityConfig):
    """``selective``: also sparsify the inputs of the ``attention`` projections, at
    ``attention_sparsity`` (defaults to ``sparsity``)."""

    METHOD = "chess"
    VERSION = 1
    sparsity: float = 0.5
    selective: bool = False
    attention: tuple[str, ...] = ("attn.q", "attn.o")
    attention_sparsity: float | None = None
    overrides: tuple[tuple[str, float | None], ...] = ()

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "attention", tuple(self.attention))
        bad = [k for k in self.attention if k not in ATTENTION_KINDS]
        if bad:
            raise ConfigError(f"unknown CHESS attention projection(s) {bad}; valid: {', '.join(ATTENTION_KINDS)}")
        if self.attention_sparsity is not None:
            object.__setattr__(self, "attention_sparsity", check_sparsity(self.attention_sparsity, "attention_sparsity"))


def channel_thresholds(T: float, mean_abs_u: torch.Tensor) -> torch.Tensor:
    """``t_i = T / E|u_i|`` (fp32); a neuron with ``E|u_i| = 0`` never contributes and gets +inf
    (unless T = 0: then 0, i.e. nothing is dropped)."""
    u = mean_abs_u.to(torch.float64)
    if T <= 0:
        return torch.zeros_like(u, dtype=torch.float32)
    t = torch.where(u > 0, T / u.clamp_min(1e-300), torch.full_like(u, float("inf")))
    return t.to(torch.float32)
