"""FATReLU: ReLU with a shifted threshold (ProSparse's activation threshold shifting).

``FATReLU(t)(v) = v if v >= t else 0``. With ``t = 0`` it equals ReLU (on the value; the
gradient at exactly 0 is 1 instead of 0). The gradient is 1 for kept entries, 0 else.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from actsparse.errors import ConfigError


def fatrelu(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Functional FATReLU: ``x`` where ``x >= threshold``, else 0 (differentiable)."""
    return x * (x >= threshold).to(x.dtype)


class FATReLU(nn.Module):
    """Elementwise ``v if v >= threshold else 0``; a drop-in for the MLP activation."""

    def __init__(self, threshold: float = 0.01):
        super().__init__()
        self.threshold = check_threshold(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fatrelu(x, self.threshold)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


def check_threshold(threshold) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(f"FATReLU threshold must be a number >= 0, got {threshold!r}") from None
    if not math.isfinite(t) or t < 0:
        raise ConfigError(f"FATReLU threshold must be a finite number >= 0, got {threshold!r}")
    return t


def fatrelu_(model: nn.Module, threshold: float = 0.01):
    """Swap the MLP activation of every block for ``FATReLU(threshold)`` (in place).

    Existing FATReLUs get the new threshold. The model should already use ReLU (see
    :func:`actsparse.train.relufy.relufy_`): FATReLU replaces whatever activation was
    there. Returns the list of :class:`~actsparse.train.targets.Change`.
    """
    from actsparse.models.swap import swap_module
    from actsparse.train.targets import OWNER, Change, activation_paths

    t = check_threshold(threshold)
    changes = []
    for path in activation_paths(model):
        old = model.get_submodule(path)
        if isinstance(old, FATReLU):
            if old.threshold != t:
                changes.append(Change(path, repr(old), f"FATReLU(threshold={t})"))
                old.threshold = t
            continue
        swap_module(model, path, FATReLU(t), owner=OWNER)
        changes.append(Change(path, type(old).__name__, f"FATReLU(threshold={t})"))
    return changes
