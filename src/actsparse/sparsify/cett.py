"""CETT thresholds (Sparsing Law): per-layer thresholds on ``|h_i| * ||W_down[:, i]||``.

For one layer with down_proj input ``h`` (tokens x n) and weight ``W`` (d x n), neuron i's
contribution is ``n_i = h_i W[:, i]``, whose norm is ``|h_i| * c_i`` with ``c_i = ||W[:, i]||``.
Dropping every neuron with ``|h_i| c_i <= tau`` gives, per token,
``CETT = || sum_{dropped} n_i || / || y ||``, averaged over tokens. For a target CETT the
layer threshold ``tau`` is found by bisection over the sorted candidate scores; the
per-neuron threshold on ``|h_i|`` is ``tau / c_i``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from actsparse.errors import ConfigError
from actsparse.sparsify.calibration import Request
from actsparse.sparsify.modules import out_in_weight
from actsparse.sparsify.registry import Assignment, Handler, SparsityConfig, register_handler, register_method


@register_method
@dataclass(frozen=True)
class CETT(SparsityConfig):
    """``cett``: the target relative error of cutting the tail, shared by all layers (in [0, 1))."""

    METHOD = "cett"
    VERSION = 1
    KNOB = "cett"
    cett: float = 0.2
    sample_tokens: int = 512
    overrides: tuple[tuple[str, float | None], ...] = ()

    def __post_init__(self):
        super().__post_init__()
        c = self.cett
        if isinstance(c, bool) or not isinstance(c, (int, float)) or math.isnan(c) or not 0 <= c < 1:
            raise ConfigError(f"cett must be in [0, 1), got {c!r}")
        object.__setattr__(self, "cett", float(c))
        if self.sample_tokens < 1:
            raise ConfigError(f"sample_tokens must be >= 1, got {self.sample_tokens}")


def cett_value(h: torch.Tensor, weight: torch.Tensor, tau: float, norms: torch.Tensor | None = None) -> float:
    """Mean over tokens of ``||sum_{i: |h_i| c_i <= tau} h_i W[:, i]|| / ||h W^T||``."""
    h = h.to(torch.float64)
    w = weight.detach().to(torch.float64)
    c = w.norm(dim=0) if norms is None else norms.to(torch.float64)
    dropped = h * ((h.abs() * c) <= tau)
    num = (dropped @ w.T).norm(dim=-1)
    den = (h @ w.T).norm(dim=-1)
    ok = den > 0
    if not bool(ok.any()):
        return 0.0
    return float((num[ok] / den[ok]).mean())


def threshold_for_cett(h: torch.Tensor, weight: torch.Tensor, target: float,
                       dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    """The largest candidate ``tau`` (a score value present in ``h``, or 0) whose CETT stays
    <= ``target``, by bisection over the sorted scores (CETT grows with tau). Returns
    ``(tau, cett(tau))``."""
    h = h.to(dtype)
    w = weight.detach().to(dtype)
    c = w.norm(dim=0)
    y_norm = (h @ w.T).norm(dim=-1)
    ok = y_norm > 0
    h, y_norm = h[ok], y_norm[ok]
    if h.shape[0] == 0 or target <= 0:
        return 0.0, 0.0
    scores = torch.unique((h.abs() * c).reshape(-1))  # sorted ascending

    def cett_at(tau: float) -> float:
        dropped = h * ((h.abs() * c) <= tau)
        return float(((dropped @ w.T).norm(dim=-1) / y_norm).mean())

    lo, hi = -1, scores.numel() - 1  # invariant: cett(scores[lo]) <= target (lo = -1 means tau = 0 dropped none)
    if cett_at(float(scores[hi])) <= target:
        return float(scores[hi]), cett_at(float(scores[hi]))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cett_at(float(scores[mid])) <= target:
            lo = mid
        else:
            hi = mid
    if lo < 0:
        return 0.0, cett_at(0.0)
    tau = float(scores[lo])
    return tau, cett_at(tau)


def neuron_thresholds(tau: float, weight: torch.Tensor) -> torch.Tensor:
    """Per-neuron thresholds on |h_i|: ``tau / ||W[:, i]||`` (fp32; +inf for a zero column).

    Rounding: the module keeps ``|h_i| > t_i`` in fp32; scores exactly at tau are dropped."""
    c = weight.detach().to(torch.float64).norm(dim=0)
    if tau <= 0:
        return torch.zeros_like(c, dtype=torch.float32)
    return torch.where(c > 0, tau / c.clamp_min(1e-300), torch.full_like(c, float("inf"))).to(torch.float32)


@register_handler(CETT)
class _CETTHandler(Handler):
    def requests(self, t):
        t.require("mlp.down")
        return [Request(f"{p}:sample", p, "input", sample_rows=t.config.sample_tokens)
                for p in (t.path(i, "mlp.down") for i in t.layers)]

    def assign(self, t, stats):
        out = []
        for layer in t.layers:
            path = t.path(layer, "mlp.down")
            if t.sparsity(path, 0.0) is None:
                continue
            w = out_in_weight(t.module(path))
            tau, _reached = threshold_for_cett(stats[f"{path}:sample"], w, t.config.cett, dtype=torch.float32)
            out.append(Assignment(path, "linear", "mlp.down:input", threshold=neuron_thresholds(tau, w),
                                  skips=(path,), target=None))
        return out
