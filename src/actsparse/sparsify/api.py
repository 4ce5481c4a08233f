"""``sparsify_(model, config, stats=None, calibration=None)``: apply a method in place.

The config's registered handler (see :mod:`actsparse.sparsify.registry`) says which
calibration statistics it needs (``requests``) and which sparse modules to install
(``assign``). ``sparsify_`` gathers missing statistics from ``calibration`` windows, builds
the modules and swaps them into the model through the module-swap ledger
(:mod:`actsparse.models.swap`); ``desparsify_`` unwinds the ledger, which also removes
whatever was built on top of the sparse modules (``accelerate_``).
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from actsparse.errors import ConfigError, DataError, StateError
from actsparse.measure.hooks import MaskTracker
from actsparse.models import swap
from actsparse.models.sitemaps import site_map
from actsparse.sparsify import calibration as calib
from actsparse.sparsify.calibration import Request
from actsparse.sparsify.modules import MaskedLinear, ThresholdedActivation, iter_sparse_modules
from actsparse.sparsify.registry import Assignment, SparsityConfig, handler_for
from actsparse.sparsify.targets import Target

STATE_ATTR = "_actsparse_sparsity"
OWNER = "sparsify"


@dataclass
class SparsityState:
    config: SparsityConfig
    identity: dict
    assignments: list[Assignment]
    token_mask: MaskTracker
    extra: dict = field(default_factory=dict)


def is_sparsified(model: nn.Module) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


def sparsity_state(model: nn.Module) -> SparsityState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise StateError("this model is not sparsified (call sparsify_ or load_plan first)")
    return state


# ---------------------------------------------------------------- entry points
def _as_stats(stats) -> dict:
    if stats is None:
        return {}
    if hasattr(stats, "stats") and isinstance(stats.stats, dict):  # a Profile
        return dict(stats.stats)
    if isinstance(stats, dict):
        return dict(stats)
    raise TypeError(f"stats must be a dict of SiteStats or a Profile, got {type(stats).__name__}")


def required_stats(model: nn.Module, configs) -> list[Request]:
    """The calibration requests of several configs together (deduplicated by key), so one
    calibration pass serves a whole sweep."""
    smap = site_map(model, warn=False)
    seen, out = set(), []
    for config in (configs if isinstance(configs, (list, tuple)) else [configs]):
        for r in handler_for(config).requests(Target(model, config, smap)):
            if r.key not in seen:
                seen.add(r.key)
                out.append(r)
    return out


def calibrate(model: nn.Module, configs, calibration, *, stats=None, batch_size: int = 4,
              progress: bool = False, world=None) -> dict:
    """Compute the calibration statistics that ``configs`` need on ``calibration`` windows.

    ``world``: a :class:`~actsparse.measure.distributed.World` of several ranks (torchrun):
    each rank runs its shard of the windows and the statistics are merged, so every rank
    returns what one process would (see :mod:`actsparse.measure.distributed`)."""
    if is_sparsified(model):
        raise StateError("calibrate a dense model: call desparsify_(model) first")
    reqs = required_stats(model, configs)
    description = None
    if world is not None and world.active:
        from actsparse.models.loading import weights_identity

        cfgs = configs if isinstance(configs, (list, tuple)) else [configs]
        dtype = next((str(p.dtype) for p in model.parameters()), None)
        description = {"configs": [c.to_dict() for c in cfgs], "model": weights_identity(model), "dtype": dtype}
    out = calib.collect(model, calibration, reqs, batch_size=batch_size, progress=progress, have=_as_stats(stats),
                        world=world, description=description)
    calib.check_enough(out, reqs)
    return out


def plan_assignments(model: nn.Module, config: SparsityConfig, stats=None, calibration=None, *,
                     batch_size: int = 4, progress: bool = False, world=None) -> list[Assignment]:
    """What ``sparsify_`` would install, without installing it."""
    if not isinstance(config, SparsityConfig):
        raise ConfigError(f"config must be a method config (TEAL(...), CATS(...), ...), got {type(config).__name__}")
    target = Target(model, config)
    handler = handler_for(config)
    stats = _as_stats(stats)
    reqs = handler.requests(target)
    missing = [r for r in reqs if r.key not in stats and r.required]
    if missing and calibration is None:
        raise DataError(
            f"{type(config).__name__} needs calibration statistics that were not given "
            f"(e.g. {missing[0].key}); pass calibration=Windows(...) or stats from calibrate()/profile()")
    if calibration is not None and any(r.key not in stats for r in reqs):
        stats = calibrate(model, config, calibration, stats=stats, batch_size=batch_size, progress=progress,
                          world=world)
    calib.check_enough(stats, reqs)
    assignments = handler.assign(target, stats)
    target.check_overrides()
    return assignments


def sparsify_(model: nn.Module, config: SparsityConfig, stats=None, calibration=None, *,
              filter_fn: Callable[[nn.Module, str], bool] | None = None, batch_size: int = 4,
              progress: bool = False, world=None) -> None:
    """Apply ``config`` to ``model`` in place (returns None).

    ``stats``: calibration statistics (a dict from :func:`calibrate`, or a Profile whose sites
    cover what the method needs); ``calibration``: :class:`~actsparse.data.text.Windows` to
    compute missing statistics. ``filter_fn(module, path)``: return False to leave a module dense.
    ``world``: data-parallel calibration across torchrun ranks (see :func:`calibrate`).
    """
    if is_sparsified(model):
        raise StateError("the model is already sparsified; call desparsify_(model) first")
    assignments = plan_assignments(model, config, stats, calibration, batch_size=batch_size, progress=progress,
                                   world=world)
    if filter_fn is not None:
        assignments = [a for a in assignments if filter_fn(model.get_submodule(a.path), a.path)]
    install(model, config, assignments)


def _build(model: nn.Module, a: Assignment) -> nn.Module:
    original = model.get_submodule(a.path)
    if a.module == "linear":
        return MaskedLinear(original, a.threshold, mode=a.mode, k=a.k, site_kind=a.site_kind, skips=a.skips,
                            centre=a.centre, offset=a.offset, factor_u=a.factor_u, factor_v=a.factor_v)
    if a.module == "act":
        return ThresholdedActivation(original, a.width, a.threshold, mode=a.mode, k=a.k, site_kind=a.site_kind,
                                     skips=a.skips)
    raise ConfigError(f"unknown sparse module type {a.module!r}")


def check_paths(model: nn.Module, paths) -> None:
    """Refuse sparse-module paths that name no module of ``model`` (a damaged plan, or one
    made for another architecture), naming the closest paths."""
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules]
    if missing:
        close = difflib.get_close_matches(missing[0], list(modules), n=3, cutoff=0.3)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise ConfigError(f"{len(missing)} sparse-module path(s) are not modules of this {type(model).__name__}: "
                          f"{missing[0]!r}{hint}{' and others' if len(missing) > 1 else ''}")


def install(model: nn.Module, config: SparsityConfig, assignments: list[Assignment], identity: dict | None = None) -> None:
    """Swap the sparse modules of ``assignments`` into ``model`` (all or nothing)."""
    from actsparse.models.loading import weights_identity

    if is_sparsified(model):
        raise StateError("the model is already sparsified; call desparsify_(model) first")
    identity = identity or weights_identity(model)
    check_paths(model, [a.path for a in assignments])
    tracker = MaskTracker()
    device = next((p.device for p in model.parameters()), None)
    built: dict[str, nn.Module] = {}
    for a in assignments:
        if a.path in built:
            raise ConfigError(f"two sparse modules for {a.path}")
        new = _build(model, a)
        if isinstance(new.threshold, torch.Tensor) and device is not None:
            new.threshold = new.threshold.to(device)
        new._token_mask = tracker
        built[a.path] = new
    for path, new in built.items():
        swap.swap_module(model, path, new, owner=OWNER)
    swap.add_hook(model, tracker.attach(model), owner=OWNER)
    object.__setattr__(model, STATE_ATTR, SparsityState(config, identity, list(assignments), tracker))


def desparsify_(model: nn.Module) -> None:
    """Put back the original modules (the very objects that were wrapped), undoing whatever
    was built on top of them too (``accelerate_``). No-op if dense."""
    swap.unwind(model, OWNER)
    for path, m in list(iter_sparse_modules(model)):  # modules installed by hand
        swap.set_module(model, path, m.linear if isinstance(m, MaskedLinear) else m.act)
    if STATE_ATTR in model.__dict__:
        object.__delattr__(model, STATE_ATTR)


def thresholds_table(model: nn.Module) -> list[dict]:
    """Per sparse module: path, kind, mode, scalar threshold (median for per-channel), k."""
    rows = []
    for path, m in iter_sparse_modules(model):
        layer = None
        mt = re.search(r"\.(\d+)\.", path)
        if mt:
            layer = int(mt.group(1))
        thr = None
        if m.mode == "threshold":
            thr = float(m.threshold.float().median()) if m.per_channel else float(m.threshold)
        rows.append({"path": path, "layer": layer, "kind": m.site_kind, "mode": m.mode, "threshold": thr,
                     "per_channel": m.per_channel, "k": m.k, "width": m.width})
    return rows
