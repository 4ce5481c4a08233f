"""A minimal LoRA for the sparse linears of a sparsified model (peft is not a dependency).

    add_lora_(model, rank=8, alpha=16)   # every MaskedLinear gets adapter = LoRA(in, out)
    ...train the adapters...
    merge_lora_(model)                    # W += (alpha / rank) B A, adapters removed

The adapter reads the linear's *masked* input (``MaskedLinear.forward``: ``linear(xm) +
adapter(xm)``), so merging it into the weight is exact and the merged model skips the same
weight rows as before: the sparse kernels need nothing new. ``B`` starts at zero (the model
is unchanged before training), ``A`` Kaiming-uniform from a seeded generator.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from actsparse.errors import ConfigError, StateError
from actsparse.sparsify.modules import MaskedLinear, iter_sparse_modules, out_in_weight


class LoRA(nn.Module):
    """``scale * B (A x)`` with ``A`` (rank, in), ``B`` (out, rank), ``scale = alpha / rank``."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, *,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft
        a = (torch.rand(rank, in_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        self.A = nn.Parameter(a.to(dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype) * self.scale

    def delta(self) -> torch.Tensor:
        """The (out, in) weight update this adapter adds."""
        return (self.B @ self.A) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def sparse_linears(model: nn.Module) -> list[tuple[str, MaskedLinear]]:
    mods = [(p, m) for p, m in iter_sparse_modules(model) if isinstance(m, MaskedLinear)]
    if not mods:
        raise StateError("the model has no sparse linears (MaskedLinear): sparsify it first (sparsify_ or load_plan)")
    return mods


def add_lora_(model: nn.Module, rank: int = 8, alpha: float = 16.0, seed: int = 0) -> list[str]:
    """Give every sparse linear of ``model`` a LoRA adapter; returns their module paths.
    The adapters' parameters are the only ones left trainable by :func:`lora_parameters`."""
    g = torch.Generator().manual_seed(seed)
    paths = []
    for path, m in sparse_linears(model):
        if m.adapter is not None:
            raise StateError(f"{path} already has an adapter; merge_lora_ or remove_lora_ first")
        dtype = out_in_weight(m).dtype if hasattr(m, "weight") else torch.float32
        m.adapter = LoRA(m.in_features, m.out_features, rank, alpha, generator=g, dtype=dtype).to(
            next(m.parameters()).device)
        paths.append(path)
    return paths


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".adapter." in f".{n}"}


def remove_lora_(model: nn.Module) -> None:
    for _, m in iter_sparse_modules(model):
        if isinstance(m, MaskedLinear):
            m.adapter = None


@torch.no_grad()
def merge_lora_(model: nn.Module) -> int:
    """Add every adapter's ``scale * B A`` to its linear's weight and remove the adapters
    (returns how many). The merged weights change the model's weights fingerprint, so a plan
    then loads only with ``check_weights=False``."""
    n = 0
    for path, m in iter_sparse_modules(model):
        if not isinstance(m, MaskedLinear) or m.adapter is None:
            continue
        if not hasattr(m, "weight"):
            raise StateError(f"{path}: cannot merge a LoRA into a quantised linear")
        w = out_in_weight(m)
        w.add_(m.adapter.delta().to(w.dtype))
        m.adapter = None
        n += 1
    return n
