"""Switching neurons / experts off or on at inference: owned hooks, scoped or persistent.

    with intervene(model, iv):        # hooks removed on exit and on error
        model(ids)
    intervene_(model, iv)             # persistent (recorded in the module-swap ledger)
    unintervene_(model)               # removes it

Neurons: a forward pre-hook on the down projection (site ``mlp.down:input``) or a forward hook
on the activation (``mlp.act``) returns the tensor with the switched neurons set to 0 (off) or
to their value (on), out of place. Experts: a forward hook on each router re-routes from its
logits with the switched-off experts at -inf (never selected) and the forced ones always in
the top-k, the same way the router itself routes (``models/routers.py``).

The hooks sit on the modules present when the intervention is applied. If a module is replaced
later (``sparsify_``, ``accelerate_``, ``relufy_`` after the intervention), the intervention
would silently stop acting: a hook on the root module checks every forward and raises instead.
Interventions act on the PyTorch forward; ``FastDecoder``'s compiled step does not run hooks.
"""
from __future__ import annotations

import torch
from torch import nn

from actsparse.errors import ConfigError, StateError
from actsparse.intervention.switches import Intervention
from actsparse.models import swap
from actsparse.models.routers import routers
from actsparse.models.sitemaps import site_map

OWNER = "intervene"


def _neuron_hooks(model: nn.Module, iv: Intervention) -> list[tuple[str, str, object]]:
    smap = site_map(model, warn=False)
    role = iv.site.split(":")[0]
    out = []
    for layer, switches in iv.by_layer().items():
        idx = torch.tensor([s.index for s in switches])
        values = torch.tensor([0.0 if s.mode == "off" else s.value for s in switches], dtype=torch.float64)

        def apply(t: torch.Tensor, idx=idx, values=values) -> torch.Tensor:
            out_t = t.clone()
            out_t[..., idx.to(t.device)] = values.to(device=t.device, dtype=t.dtype)
            return out_t

        path = smap.module_path(layer, role)
        if iv.site == "mlp.down:input":
            def pre_hook(module, args, apply=apply):
                return (apply(args[0]), *args[1:])
            out.append((path, "pre", pre_hook))
        else:
            def hook(module, args, output, apply=apply):
                return apply(output)
            out.append((path, "post", hook))
    return out


def _expert_hooks(model: nn.Module, iv: Intervention) -> list[tuple[str, str, object]]:
    by_layer = {r.layer: r for r in routers(model)}
    out = []
    for layer, switches in iv.by_layer().items():
        r = by_layer[layer]
        off = torch.zeros(r.num_experts, dtype=torch.bool)
        on = torch.zeros(r.num_experts, dtype=torch.bool)
        for s in switches:
            (off if s.mode == "off" else on)[s.index] = True
        if int(on.sum()) > r.top_k:
            raise ConfigError(f"layer {layer}: {int(on.sum())} experts forced on, but the router selects only "
                              f"{r.top_k} per token")
        if r.num_experts - int(off.sum()) < r.top_k:
            raise ConfigError(f"layer {layer}: {int(off.sum())} of {r.num_experts} experts switched off leaves fewer "
                              f"than the {r.top_k} the router selects per token")

        def hook(module, args, output, r=r, off=off, on=on):
            logits = output[0]
            masked = logits.masked_fill(off.to(logits.device), float("-inf")) if off.any() else logits
            weights, idx = r.kind.route(module, masked, on.to(logits.device) if on.any() else None)
            return masked, weights, idx
        out.append((r.path, "post", hook))
    return out


def _hooks(model: nn.Module, iv: Intervention):
    iv.check(model)
    return _neuron_hooks(model, iv) if iv.units == "neurons" else _expert_hooks(model, iv)


def _register(model: nn.Module, iv: Intervention) -> list:
    """Register the intervention's hooks and the root guard; returns the handles."""
    planned = _hooks(model, iv)
    hooked = {path: model.get_submodule(path) for path, _, _ in planned}

    def guard(module, args, kwargs):
        for path, m in hooked.items():
            if model.get_submodule(path) is not m:
                raise StateError(f"{path} was replaced after the intervention was applied (by sparsify_, "
                                 "accelerate_, relufy_ ...?), so the intervention no longer acts there: remove it "
                                 "and apply it again after changing the model")
        return None

    handles = []
    try:
        handles.append(model.register_forward_pre_hook(guard, with_kwargs=True))
        for path, kind, fn in planned:
            m = hooked[path]
            handles.append(m.register_forward_pre_hook(fn) if kind == "pre" else m.register_forward_hook(fn))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles


class intervene:
    """Context manager: the intervention acts inside the block; its hooks (and only them) are
    removed on exit and on error."""

    def __init__(self, model: nn.Module, iv: Intervention):
        self.model = model
        self.iv = iv
        self._handles: list = []

    def __enter__(self) -> "intervene":
        if self._handles:
            raise StateError("this intervention session is already active")
        self._handles = _register(self.model, self.iv)
        return self

    def __exit__(self, *exc) -> None:
        while self._handles:
            self._handles.pop().remove()


def intervene_(model: nn.Module, iv: Intervention) -> None:
    """Apply ``iv`` to ``model`` until :func:`unintervene_` (one persistent intervention at a time)."""
    if swap.has(model, OWNER):
        raise StateError("the model already has a persistent intervention; remove it with unintervene_(model) first")
    for h in _register(model, iv):
        swap.add_hook(model, h, owner=OWNER)
    object.__setattr__(model, "_actsparse_intervention", iv)


def unintervene_(model: nn.Module) -> None:
    """Remove the persistent intervention (a no-op when there is none)."""
    swap.unwind(model, OWNER)
    model.__dict__.pop("_actsparse_intervention", None)


def active_intervention(model: nn.Module) -> Intervention | None:
    """The persistent intervention of ``model``, if any."""
    return model.__dict__.get("_actsparse_intervention") if swap.has(model, OWNER) else None
