"""AP (Activating-while-Pruning): a mask post-processor for any host pruner.

In a pruning cycle with rate ``p`` and AP fraction ``a`` (``0 <= a <= p``), with
``S`` surviving weights at the start of the cycle:

- ``n_total = floor(p * S)`` weights are removed in all (the same as the host alone),
- AP removes ``n_ap = floor(a * S)`` of them,
- the host removes the other ``n_host = n_total - n_ap`` first (so "p - a" of ``S``).

AP then removes, globally across layers, the ``n_ap`` surviving weights that are
NEGATIVE now (``w_end < 0``) and moved least over the cycle, ``|w_end - w_start|``;
ties are broken by global flat index (parameter order, row-major), the smaller first.
Removing negative inputs raises pre-activations, so fewer ReLUs are dead.
If fewer than ``n_ap`` negative survivors exist, AP removes all of them and reports
the shortfall (it never takes positive weights). A pruned weight is never revived:
masks compose through ``prune.custom_from_mask`` / ``PruningContainer``.

Two interfaces:
- ``ap_prune(model, n_or_fraction, w_start)``: global over the prunable parameters.
- ``ActivatingWhilePruning``: a ``prune.BasePruningMethod`` for one tensor
  (``ActivatingWhilePruning.apply(module, "weight", amount, start=tensor)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from actsparse.errors import ConfigError
from actsparse.prune.hosts import (NORM_TYPES, Host, Param, apply_masks, count_surviving, count_total, current_mask,
                                   effective_weight, ensure_pruned, resolve_count, resolve_parameters,
                                   select_lowest)


def param_names(model: nn.Module, params: Sequence[Param]) -> list[str]:
    """Canonical dotted names (``net.1.weight``) of ``params``."""
    names = {id(m): p for p, m in model.named_modules()}
    out = []
    for m, n in params:
        if id(m) not in names:
            raise ConfigError("a parameter's module is not part of the model")
        prefix = names[id(m)]
        out.append(f"{prefix}.{n}" if prefix else n)
    return out


def snapshot_weights(model: nn.Module, parameters: Sequence[Param] | None = None) -> dict[str, torch.Tensor]:
    """Effective weights (``orig * mask``) of the prunable parameters, by canonical name.
    Take one at the start of a cycle and pass it as ``w_start`` to ``ap_prune``."""
    params = resolve_parameters(model, parameters)
    return {k: effective_weight(m, n) for k, (m, n) in zip(param_names(model, params), params)}


def _aligned(model, params, w: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], what: str):
    if isinstance(w, Mapping):
        names = param_names(model, params)
        missing = [k for k in names if k not in w]
        if missing:
            raise ConfigError(f"{what} lacks weights for {missing[:3]}")
        w = [w[k] for k in names]
    w = list(w)
    if len(w) != len(params):
        raise ConfigError(f"{what} has {len(w)} tensors for {len(params)} parameters")
    for t, (m, n) in zip(w, params):
        if tuple(t.shape) != tuple(getattr(m, n).shape):
            raise ConfigError(f"{what}: shape {tuple(t.shape)} != {tuple(getattr(m, n).shape)}")
    return [t.detach() for t in w]


def ap_select(w_end: Sequence[torch.Tensor], w_start: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
              count: int) -> tuple[list[torch.Tensor], int]:
    """Pure math: new masks removing ``count`` negative survivors with least movement.
    Returns (masks, removed) with ``removed = min(count, negative survivors)``."""
    eligible = [(e < 0) & (mk > 0) for e, mk in zip(w_end, masks)]
    n_neg = int(sum(int(x.sum()) for x in eligible))
    k = min(count, n_neg)
    moved = [(e.to(torch.float64) - s.to(torch.float64)).abs() for e, s in zip(w_end, w_start)]
    return select_lowest(moved, masks, k, eligible=eligible), k


@dataclass
class APResult:
    requested: int
    pruned: int
    survivors_before: int
    survivors_after: int
    total: int

    @property
    def shortfall(self) -> int:
        return self.requested - self.pruned


def ap_prune(model: nn.Module, amount: float | int, w_start, *, w_end=None,
             parameters: Sequence[Param] | None = None) -> APResult:
    """Remove ``amount`` (int count, or fraction of current survivors, rounded down) of the
    surviving weights: the negative ones that moved least since ``w_start``.

    ``w_start``/``w_end``: dict by canonical name (see ``snapshot_weights``) or a list
    aligned with ``parameters``; ``w_end`` defaults to the current effective weights.
    """
    params = resolve_parameters(model, parameters)
    ensure_pruned(params)
    before = count_surviving(params)
    count = resolve_count(amount, before, "ap amount")
    start = _aligned(model, params, w_start, "w_start")
    end = _aligned(model, params, w_end, "w_end") if w_end is not None else [effective_weight(m, n) for m, n in params]
    masks = [current_mask(m, n) for m, n in params]
    new, k = ap_select(end, start, masks, count)
    if k:
        apply_masks(params, new)
    return APResult(count, k, before, count_surviving(params), count_total(params))


def split_counts(survivors: int, rate: float, ap: float) -> tuple[int, int]:
    """``(n_host, n_ap)`` for one cycle: ``n_ap = floor(ap*S)``, ``n_host = floor(rate*S) - n_ap``."""
    check_rates(rate, ap)
    n_total = resolve_count(float(rate), survivors, "rate")
    n_ap = resolve_count(float(ap), survivors, "ap")
    return n_total - n_ap, n_ap


def check_rates(rate: float, ap: float) -> None:
    if not 0.0 < rate < 1.0:
        raise ConfigError(f"pruning rate must be in (0, 1), got {rate}")
    if ap < 0:
        raise ConfigError(f"AP fraction must be >= 0, got {ap}")
    if ap > rate:
        raise ConfigError(f"AP fraction a={ap} must not exceed the pruning rate p={rate} "
                          f"(the host prunes p - a, AP the remaining a)")


@dataclass
class CycleResult:
    survivors_before: int
    host_pruned: int
    ap_requested: int
    ap_pruned: int
    survivors_after: int
    total: int
    host_fill: int = 0  # weights the host removed because AP found too few negative survivors

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def prune_cycle(model: nn.Module, host: Host, *, rate: float | None = None, ap: float = 0.0,
                n_host: int | None = None, n_ap: int | None = None, w_start=None, w_end=None,
                batch=None, parameters: Sequence[Param] | None = None, fill_shortfall: bool = True) -> CycleResult:
    """One pruning step: the host removes ``n_host`` survivors, then AP ``n_ap``.

    Give ``rate`` and ``ap`` (fractions of the current survivors, see ``split_counts``)
    or the exact counts ``n_host`` / ``n_ap``. ``w_start`` (weights at the start of the
    cycle) is required when AP removes anything; ``w_end`` defaults to the weights as
    they are *before* the host prunes (so hosts that score at a rewind point can be
    combined: pass the trained weights here). If AP finds fewer than ``n_ap`` negative
    survivors, the host removes the shortfall (``fill_shortfall``), so the cycle always
    removes ``n_host + n_ap`` weights.
    """
    params = resolve_parameters(model, parameters)
    ensure_pruned(params)
    before = count_surviving(params)
    if rate is not None:
        if n_host is not None or n_ap is not None:
            raise ConfigError("give either rate/ap or n_host/n_ap, not both")
        n_host, n_ap = split_counts(before, rate, ap)
    else:
        if n_host is None:
            raise ConfigError("give rate (and ap) or n_host (and n_ap)")
        n_ap = n_ap or 0
        if n_host < 0 or n_ap < 0 or n_host + n_ap > before:
            raise ConfigError(f"bad counts n_host={n_host}, n_ap={n_ap} for {before} survivors")
    if n_ap and w_start is None:
        raise ConfigError("AP needs w_start, the weights at the start of the cycle")
    end = (_aligned(model, params, w_end, "w_end") if w_end is not None
           else [effective_weight(m, n) for m, n in params])
    hres = host.prune(model, n_host, parameters=params, batch=batch)
    ap_pruned = fill = 0
    if n_ap:
        ap_pruned = ap_prune(model, n_ap, w_start, w_end=end, parameters=params).pruned
        if fill_shortfall and ap_pruned < n_ap:
            fill = host.prune(model, n_ap - ap_pruned, parameters=params, batch=batch).pruned
    return CycleResult(before, hres.pruned, n_ap, ap_pruned, count_surviving(params), count_total(params), fill)


class ActivatingWhilePruning(prune.BasePruningMethod):
    """AP for a single tensor, as a ``torch.nn.utils.prune`` method.

    ``amount``: int count or fraction of the tensor's current survivors (rounded down);
    ``start``: the tensor's values at the start of the cycle. Among survivors with
    ``t < 0`` the ones with least ``|t - start|`` are removed, ties by flat index.
    Composes with earlier pruning through ``PruningContainer`` (``PRUNING_TYPE = "global"``:
    the whole tensor is seen, earlier zeros are kept).
    """

    PRUNING_TYPE = "global"

    def __init__(self, amount: float | int, start: torch.Tensor):
        self.amount = amount
        self.start = start.detach().clone()

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        mask = default_mask.clone()
        survivors = int((mask > 0).sum())
        count = resolve_count(self.amount, survivors, "ap amount")
        new, _ = ap_select([t.detach()], [self.start.to(t.device)], [mask], count)
        return new[0]

    @classmethod
    def apply(cls, module: nn.Module, name: str, amount: float | int, start: torch.Tensor):
        if "bias" in name or isinstance(module, NORM_TYPES):
            raise ConfigError(f"biases and normalisation parameters are never pruned: {name}")
        return super().apply(module, name, amount=amount, start=start)


def activating_while_pruning(module: nn.Module, name: str, amount: float | int, start: torch.Tensor) -> nn.Module:
    """Functional form, like ``prune.l1_unstructured``."""
    ActivatingWhilePruning.apply(module, name, amount, start)
    return module
