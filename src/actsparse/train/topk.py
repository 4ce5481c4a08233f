"""Top-K activation layer (Lazy Neuron): keep the k largest values per token.

Usable in training: the output is ``zeros.scatter(idx, values)``, so kept entries get
their exact gradient (1 times the upstream gradient) and dropped entries get 0; no
straight-through estimator is involved.
"""
from __future__ import annotations

import torch
from torch import nn

from actsparse.errors import ConfigError


def topk_mask(x: torch.Tensor, k: int, *, dim: int = -1, magnitude: bool = False) -> torch.Tensor:
    """Bool mask of the k largest entries (of ``|x|`` when ``magnitude``) along ``dim``."""
    width = x.shape[dim]
    _check_k(k, width)
    score = x.abs() if magnitude else x
    idx = score.topk(k, dim=dim).indices
    return torch.zeros_like(x, dtype=torch.bool).scatter_(dim, idx, True)


def topk_activation(x: torch.Tensor, k: int, *, dim: int = -1, magnitude: bool = False) -> torch.Tensor:
    """Keep the k largest entries along ``dim`` (ties: any k of them), zero the rest."""
    width = x.shape[dim]
    _check_k(k, width)
    score = x.abs() if magnitude else x
    idx = score.topk(k, dim=dim).indices
    return torch.zeros_like(x).scatter(dim, idx, x.gather(dim, idx))


def _check_k(k, width: int | None = None) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ConfigError(f"Top-K k must be an integer >= 1, got {k!r}")
    if k < 1:
        raise ConfigError(f"Top-K k must be >= 1, got {k}")
    if width is not None and k > width:
        raise ConfigError(f"Top-K k={k} is larger than the layer width {width}; use k <= {width}")


class TopKActivation(nn.Module):
    """``topk(activation(x))`` along the last dim: keeps the k largest values per token.

    Args:
        k: values kept per token (1 <= k <= width; checked at the first forward).
        activation: applied first (e.g. ``nn.ReLU()``), so the module can replace the MLP
            activation in place; None keeps the input as is.
        magnitude: rank by ``|v|`` instead of ``v`` (for non-ReLU activations).
    """

    def __init__(self, k: int, activation: nn.Module | None = None, *, magnitude: bool = False):
        super().__init__()
        _check_k(k)
        self.k = k
        self.activation = activation
        self.magnitude = magnitude

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation is not None:
            x = self.activation(x)
        return topk_activation(x, self.k, magnitude=self.magnitude)

    def extra_repr(self) -> str:
        return f"k={self.k}, magnitude={self.magnitude}"
