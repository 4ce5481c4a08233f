"""Delta Activation Layer: quantise activations and penalise their change over time.

Input ``a`` of shape (batch, time, ...). The layer outputs ``y = round(a / q) * q`` with a
straight-through gradient (``dy/da = 1``, ``dy/dq = round(a/q) - a/q``); the step q is
learnable, initialised to 0.1 and kept positive by storing ``log q``. Along time,
``delta_t = y_t - y_{t-1}`` (t >= 1; with ``include_first=True`` also ``delta_0 = y_0``,
i.e. a zero initial state), and the layer records

    loss = rate * fan_out * ||delta||_1 / numel(delta)       (rate about 1e-5)

in ``.loss`` (with graph) after each forward. ``fan_out`` is how many weights each
activation feeds (e.g. the next linear's ``out_features``): a nonzero delta costs that
many multiply-accumulates in a delta network. Metrics: :func:`temporal_sparsity` (fraction
of zero deltas) and :func:`nonzero_deltas_per_frame`.

    layer = DeltaActivation(fan_out=next_linear.out_features)
    y = layer(features)                       # (batch, time, ...)
    loss = task_loss + delta_loss(model)      # sum of every DeltaActivation's .loss
"""
from __future__ import annotations

import math

import torch
from torch import nn


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def quantize(a: torch.Tensor, q: torch.Tensor | float) -> torch.Tensor:
    """``round(a / q) * q`` with the straight-through gradient for ``a`` and ``q``."""
    return ste_round(a / q) * q


def deltas(y: torch.Tensor, *, include_first: bool = False) -> torch.Tensor:
    """``y_t - y_{t-1}`` along dim 1 (time); with ``include_first`` the first frame is
    compared against zero."""
    if y.ndim < 2:
        raise ValueError(f"delta needs input of shape (batch, time, ...), got {tuple(y.shape)}")
    d = y[:, 1:] - y[:, :-1]
    if include_first:
        d = torch.cat([y[:, :1], d], dim=1)
    return d


@torch.no_grad()
def temporal_sparsity(y: torch.Tensor, *, include_first: bool = False) -> float:
    """Fraction of deltas that are exactly zero."""
    d = deltas(y, include_first=include_first)
    return float((d == 0).sum()) / d.numel() if d.numel() else math.nan


@torch.no_grad()
def nonzero_deltas_per_frame(y: torch.Tensor, *, include_first: bool = False) -> float:
    """Mean over (batch, frame) of the number of nonzero deltas in that frame."""
    d = deltas(y, include_first=include_first)
    frames = d.shape[0] * d.shape[1]
    return float((d != 0).sum()) / frames if frames else math.nan


class DeltaActivation(nn.Module):
    """Quantise to a learnable step q and record the delta L1 loss (see module docstring).

    Args:
        q_init: initial quantisation step (0.1).
        rate: loss rate (about 1e-5).
        fan_out: weights fed by each activation (scales the loss).
        learn_q: make q a parameter (default) or a fixed buffer.
        include_first: also penalise the first frame against a zero state.
    """

    def __init__(self, q_init: float = 0.1, rate: float = 1e-5, fan_out: int = 1, *, learn_q: bool = True,
                 include_first: bool = False):
        super().__init__()
        if not q_init > 0:
            raise ValueError(f"q_init must be > 0, got {q_init}")
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        if fan_out < 1:
            raise ValueError(f"fan_out must be >= 1, got {fan_out}")
        log_q = torch.tensor(math.log(q_init))
        if learn_q:
            self.log_q = nn.Parameter(log_q)
        else:
            self.register_buffer("log_q", log_q)
        self.rate = float(rate)
        self.fan_out = int(fan_out)
        self.include_first = include_first
        self.loss: torch.Tensor = torch.zeros(())
        self.last_temporal_sparsity = math.nan
        self.last_nonzero_per_frame = math.nan

    @property
    def q(self) -> torch.Tensor:
        return self.log_q.exp()

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if a.ndim < 2:
            raise ValueError(f"DeltaActivation needs input of shape (batch, time, ...), got {tuple(a.shape)}")
        y = quantize(a, self.q.to(a.dtype))
        d = deltas(y, include_first=self.include_first)
        n = d.numel()
        self.loss = self.rate * self.fan_out * d.abs().sum() / n if n else y.sum() * 0.0
        with torch.no_grad():
            frames = d.shape[0] * d.shape[1]
            nz = float((d != 0).sum())
            self.last_temporal_sparsity = 1.0 - nz / n if n else math.nan
            self.last_nonzero_per_frame = nz / frames if frames else math.nan
        return y

    def extra_repr(self) -> str:
        return f"q={float(self.q.detach()):.4g}, rate={self.rate}, fan_out={self.fan_out}"


def delta_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the ``.loss`` of every DeltaActivation in ``model`` (last forward)."""
    losses = [m.loss for m in model.modules() if isinstance(m, DeltaActivation)]
    return torch.stack(losses).sum() if losses else torch.zeros(())
