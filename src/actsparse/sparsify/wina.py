"""WINA: TEAL with a weight-informed score ``|v_j| * ||W[:, j]||_2``.

``W[:, j]`` is the column of the linear that reads ``v_j``. Thresholding the score at its
s-quantile ``T`` equals a per-channel threshold ``T / ||W[:, j]||`` on ``|v_j|``. Each linear
gets its own score (q, k and v read the same input with different columns).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from actsparse.errors import ConfigError
from actsparse.sparsify.calibration import Request, quantile_threshold
from actsparse.sparsify.modules import out_in_weight
from actsparse.sparsify.registry import Assignment, Handler, SparsityConfig, register_handler, register_method

LINEAR_KINDS = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "mlp.gate", "mlp.up", "mlp.gate_up", "mlp.down")


@register_method
@dataclass(frozen=True)
class WINA(SparsityConfig):
    METHOD = "wina"
    VERSION = 1
    sparsity: float = 0.5
    kinds: tuple[str, ...] = LINEAR_KINDS
    overrides: tuple[tuple[str, float | None], ...] = ()

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "kinds", tuple(self.kinds))
        bad = [k for k in self.kinds if k not in LINEAR_KINDS]
        if bad:
            raise ConfigError(f"unknown WINA linear kind(s) {bad}; valid: {', '.join(LINEAR_KINDS)}")


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """``||W[:, j]||_2`` for a linear weight of shape (out, in), as fp32."""
    return weight.detach().to(torch.float32).norm(dim=0)


def score_thresholds(T: float, norms: torch.Tensor) -> torch.Tensor:
    """Per-channel thresholds on |v_j|: ``T / ||W[:, j]||`` (+inf for a zero column, 0 if T = 0)."""
    n = norms.to(torch.float64)
    if T <= 0:
        return torch.zeros_like(n, dtype=torch.float32)
    return torch.where(n > 0, T / n.clamp_min(1e-300), torch.full_like(n, float("inf"))).to(torch.float32)


@register_handler(WINA)
class _WINAHandler(Handler):
    def requests(self, t):
        t.require()
        reqs = []
        for layer in t.layers:
            for role in t.config.kinds:
                if t.has(role):
                    path = t.path(layer, role)
                    reqs.append(Request(f"{path}:wina", path, "input", scale=column_norms(out_in_weight(t.module(path)))))
        return reqs

    def assign(self, t, stats):
        out = []
        for layer in t.layers:
            for role in t.config.kinds:
                if not t.has(role):
                    continue
                path = t.path(layer, role)
                s = t.sparsity(path)
                if s is None:
                    continue
                T = quantile_threshold(stats[f"{path}:wina"], s)
                thr = score_thresholds(T, column_norms(out_in_weight(t.module(path))))
                out.append(Assignment(path, "linear", f"{role}:input", threshold=thr, skips=(path,), target=s))
        return out
