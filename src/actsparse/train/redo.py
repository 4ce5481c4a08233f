"""ReDo (recycling dormant neurons) and DrM (dormant-ratio-guided perturbation).

ReDo, every F steps:

    masks = dormant_masks(model, batches, sites=["fc1", "fc2"], tau=0.1)   # capture-based
    redo_reset_(model.fc1, model.fc2, masks["fc1:output"], optimizer)
    redo_reset_(model.fc2, model.head, masks["fc2:output"], optimizer)

A neuron is tau-dormant when ``s_i = E|v_i| / mean_k E|v_k| <= tau`` over the batch
(:func:`actsparse.measure.metrics.dormant_scores`). :func:`redo_reset_` re-initialises
the dormant neurons' incoming weights (rows of ``layer_in``, from nn.Linear / nn.ConvNd's
own initialiser: ``kaiming_uniform_(a=sqrt(5))``), zeroes their bias and their outgoing
weights (the matching columns of ``layer_out``), and zeroes the optimiser state of exactly
those entries (Adam ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq``, SGD
``momentum_buffer``: every state tensor shaped like its parameter). Nothing else changes.
For a gated MLP pass ``layer_in=(gate_proj, up_proj)`` and ``layer_out=down_proj``.

DrM: ``alpha = clip(1 - 2 * beta, alpha_min, alpha_max)`` with beta the dormant ratio
(tau = 0.025 in DrM), then ``theta = alpha * theta + (1 - alpha) * phi``
(:func:`drm_perturb_`, phi a fresh initialisation); exploration noise
``1 / (1 + exp(-10 (beta - 0.2)))`` (:func:`exploration_noise`).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = (nn.Linear,) + _CONV


def _as_list(m) -> list[nn.Module]:
    if m is None:
        return []
    if isinstance(m, nn.Module):
        return [m]
    return list(m)


def _check_layer(m: nn.Module, what: str) -> None:
    if not isinstance(m, _LAYERS):
        raise TypeError(f"{what} must be nn.Linear or nn.Conv1d/2d/3d, got {type(m).__name__}")
    if isinstance(m, _CONV) and m.groups != 1:
        raise ValueError(f"{what}: grouped convolutions (groups={m.groups}) are not supported")


def _mask_from(scores_or_mask, n: int, tau: float) -> torch.Tensor:
    t = torch.as_tensor(scores_or_mask)
    mask = t.bool() if t.dtype == torch.bool else (t <= tau)
    mask = mask.reshape(-1)
    if mask.numel() != n:
        raise ValueError(f"the mask / scores have {mask.numel()} entries but the layer has {n} neurons")
    return mask


def _out_index(layer_out: nn.Module, mask: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(dim, bool mask over that dim) of layer_out's weight fed by the masked neurons."""
    n = mask.numel()
    w = layer_out.weight
    width = w.shape[1]
    if width == n:
        return 1, mask
    if isinstance(layer_out, nn.Linear) and width % n == 0:  # flattened (channels, *spatial)
        return 1, mask.repeat_interleave(width // n)
    raise ValueError(
        f"layer_out takes {width} inputs, which does not match the {n} neurons of layer_in "
        f"(nor a flattened channels x positions layout)"
    )


def default_init_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """nn.Linear / nn.ConvNd's reset_parameters initialiser for the weight."""
    return nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)


def _zero_state(optimizer, param: torch.Tensor, dim: int, mask: torch.Tensor) -> None:
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            idx = [slice(None)] * value.ndim
            idx[dim] = mask.to(value.device)
            value[tuple(idx)] = 0


@torch.no_grad()
def redo_reset_(layer_in: nn.Module | Sequence[nn.Module], layer_out: nn.Module | Sequence[nn.Module] | None,
                scores_or_mask, optimizer: torch.optim.Optimizer | None = None, tau: float = 0.1, *,
                init_fn=default_init_, generator: torch.Generator | None = None) -> int:
    """Recycle the dormant neurons of ``layer_in`` (in place). Returns how many were reset.

    Args:
        layer_in: the layer(s) whose output neurons are scored (Linear or Conv; several for
            a gated MLP). Their rows (output channels) are re-initialised and biases zeroed.
        layer_out: the layer(s) reading those neurons; their columns (input channels; for
            a Linear after a flatten, each channel's block of positions) are zeroed.
        scores_or_mask: a bool mask (True = dormant) or dormant scores (dormant iff <= tau).
        optimizer: its state for exactly the touched entries is zeroed.
        init_fn: ``init_fn(weight, generator)`` fills a fresh weight tensor in place.
    """
    ins = _as_list(layer_in)
    outs = _as_list(layer_out)
    if not ins:
        raise ValueError("redo_reset_ needs at least one layer_in")
    for m in ins:
        _check_layer(m, "layer_in")
    for m in outs:
        _check_layer(m, "layer_out")
    n = ins[0].weight.shape[0]
    for m in ins:
        if m.weight.shape[0] != n:
            raise ValueError(f"layer_in modules disagree on the neuron count: {m.weight.shape[0]} vs {n}")
    mask = _mask_from(scores_or_mask, n, tau).to(ins[0].weight.device)
    count = int(mask.sum())
    if count == 0:
        return 0
    for m in ins:
        fresh = torch.empty_like(m.weight)
        init_fn(fresh, generator)
        m.weight[mask] = fresh[mask]
        _zero_state(optimizer, m.weight, 0, mask)
        if m.bias is not None:
            m.bias[mask] = 0
            _zero_state(optimizer, m.bias, 0, mask)
    for m in outs:
        dim, col = _out_index(m, mask)
        col = col.to(m.weight.device)
        m.weight[:, col] = 0
        _zero_state(optimizer, m.weight, dim, col)
    return count


@torch.no_grad()
def dormant_scores_by_site(model: nn.Module, batches: Iterable, sites) -> dict[str, torch.Tensor]:
    """ReDo scores ``E|v_i| / mean_k E|v_k|`` per site, from one pass of ``batches``
    through ``model`` inside an actsparse capture. Batches are tensors (``model(x)``) or
    dicts of keyword arguments (``model(**batch)``)."""
    from actsparse.measure.capture import capture
    from actsparse.measure.metrics import dormant_scores

    with capture(model, sites, temporal=False, eps=()) as cap:
        for batch in batches:
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(batch[0])
            else:
                model(batch)
    return {name: dormant_scores(st).float() for name, st in cap.stats().items()}


def dormant_masks(model: nn.Module, batches: Iterable, sites, tau: float = 0.1) -> dict[str, torch.Tensor]:
    """Bool masks (True = tau-dormant) per site; see :func:`dormant_scores_by_site`."""
    return {k: v <= tau for k, v in dormant_scores_by_site(model, batches, sites).items()}


def mask_ratio(masks: dict[str, torch.Tensor]) -> float:
    """Dormant / all neurons over every mask (the dormant ratio beta)."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else math.nan


# ------------------------------------------------------------------------ DrM
def drm_alpha(beta: float, alpha_min: float = 0.2, alpha_max: float = 0.9, k: float = 2.0) -> float:
    """DrM's perturbation factor ``clip(1 - k * beta, alpha_min, alpha_max)`` (k = 2)."""
    if alpha_min > alpha_max:
        raise ValueError(f"alpha_min {alpha_min} > alpha_max {alpha_max}")
    return float(min(max(1.0 - k * beta, alpha_min), alpha_max))


def exploration_noise(beta: float) -> float:
    """DrM's dormant-ratio-guided exploration noise ``1 / (1 + exp(-10 (beta - 0.2)))``."""
    return 1.0 / (1.0 + math.exp(-10.0 * (beta - 0.2)))


def fresh_init(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose submodules with ``reset_parameters`` are re-initialised."""
    phi = copy.deepcopy(module)
    for m in phi.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return phi


@torch.no_grad()
def drm_perturb_(module: nn.Module, alpha: float, phi: nn.Module | None = None) -> None:
    """``theta = alpha * theta + (1 - alpha) * phi`` for every parameter (in place);
    ``phi`` defaults to :func:`fresh_init` of the module. Parameters of modules without
    ``reset_parameters`` are unchanged (their phi equals theta)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    phi = fresh_init(module) if phi is None else phi
    fresh = dict(phi.named_parameters())
    for name, p in module.named_parameters():
        p.mul_(alpha).add_(fresh[name].to(p.dtype), alpha=1.0 - alpha)
