"""``sparsify_(model, config, stats=None, calibration=None)``: apply a method in place.

Each config type has a registered handler with two steps: ``requests`` (which calibration
statistics it needs) and ``assign`` (the sparse modules to install, computed from the
statistics). ``sparsify_`` gathers missing statistics from ``calibration`` windows, builds
the modules and swaps them into the model; ``desparsify_`` puts the originals back.
"""
from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from actsparse.config import SparsityConfig
from actsparse.errors import ConfigError, DataError
from actsparse.models.sitemaps import SiteMap, site_map
from actsparse.sparsify import calibration as calib
from actsparse.sparsify.calibration import Request
from actsparse.sparsify.modules import (MaskedLinear, SparseModule, ThresholdedActivation, TokenMask,
                                        iter_sparse_modules)

STATE_ATTR = "_actsparse_sparsity"


@dataclass
class Assignment:
    """One sparse module to install at ``path`` (a linear, or an MLP activation)."""

    path: str
    module: str  # "linear" or "act"
    site_kind: str
    threshold: float | torch.Tensor | None = None
    mode: str = "threshold"
    k: int | None = None
    skips: tuple[str, ...] = ()
    width: int | None = None  # for "act": neurons
    target: float | None = None  # nominal sparsity of this site


@dataclass
class SparsityState:
    config: SparsityConfig
    identity: dict
    assignments: list[Assignment]
    originals: dict[str, nn.Module]
    token_mask: TokenMask
    hook: object = None
    extra: dict = field(default_factory=dict)


@dataclass
class Handler:
    requests: Callable[[nn.Module, SiteMap, SparsityConfig], list[Request]]
    assign: Callable[..., list[Assignment]]


HANDLERS: dict[type, Handler] = {}


def register_handler(config_cls: type, *, requests, assign) -> None:
    HANDLERS[config_cls] = Handler(requests, assign)


def handler_for(config: SparsityConfig) -> Handler:
    for cls in type(config).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    from actsparse.config import method_names

    raise ConfigError(f"no handler for {type(config).__name__}; valid methods: {', '.join(method_names())}")


# ---------------------------------------------------------------- targeting
def _matches(pattern: str, path: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern)


def site_sparsity(config: SparsityConfig, path: str, default: float | None) -> float | None:
    """The sparsity for the module at ``path``: the last matching override, else ``default``.
    None means: leave dense."""
    s = default
    for pattern, value in getattr(config, "overrides", ()):
        if _matches(pattern, path):
            s = value
    return s


def is_sparsified(model: nn.Module) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


def sparsity_state(model: nn.Module) -> SparsityState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ConfigError("this model is not sparsified (call sparsify_ or load_plan first)")
    return state


def _role_path(smap: SiteMap, layer: int, role: str) -> str:
    return smap.module_path(layer, role)


def _need_map(smap: SiteMap) -> None:
    if smap.family == "generic" or not smap.gated and False:
        raise ConfigError("this method needs an architecture site map; the model has none (generic fallback)")


def _stats_key(path: str, io: str) -> str:
    return f"{path}:{io}"


# ---------------------------------------------------------------- TEAL
def _teal_requests(model, smap, config):
    from actsparse.sparsify.teal import INPUT_KINDS

    _need_map(smap)
    reqs = []
    for layer in range(smap.num_layers):
        for kind in config.kinds:
            if kind not in smap.roles:
                continue
            path = _role_path(smap, layer, kind)
            reqs.append(Request(_stats_key(path, "input"), path, "input"))
    return reqs


def _teal_assign(model, smap, config, stats, *, sparsities: dict | None = None):
    from actsparse.sparsify.teal import INPUT_KINDS, magnitude_threshold

    out = []
    for layer in range(smap.num_layers):
        for kind in config.kinds:
            if kind not in smap.roles:
                continue
            src = _role_path(smap, layer, kind)
            base = sparsities.get((layer, kind), config.sparsity) if sparsities else config.sparsity
            for role in INPUT_KINDS[kind]:
                if role not in smap.roles:
                    continue
                path = _role_path(smap, layer, role)
                s = site_sparsity(config, path, base)
                if s is None:
                    continue
                t = magnitude_threshold(stats[_stats_key(src, "input")], s)
                out.append(Assignment(path, "linear", f"{kind}:input", threshold=t, skips=(path,), target=s))
    return out


# ---------------------------------------------------------------- CATS / CHESS / Top-K on the activation
def _act_width(model, smap, layer) -> int:
    return model.get_submodule(_role_path(smap, layer, "mlp.down")).in_features


def _act_skips(smap, layer) -> tuple[str, ...]:
    roles = ("mlp.up", "mlp.down") if smap.gated else ("mlp.down",)
    return tuple(_role_path(smap, layer, r) for r in roles if r in smap.roles)


def _cats_requests(model, smap, config):
    _need_map(smap)
    return [Request(_stats_key(p, "output"), p, "output") for p in
            (_role_path(smap, i, "mlp.act") for i in range(smap.num_layers))]


def _cats_assign(model, smap, config, stats):
    from actsparse.sparsify.cats import act_threshold

    out = []
    for layer in range(smap.num_layers):
        path = _role_path(smap, layer, "mlp.act")
        s = site_sparsity(config, path, config.sparsity)
        if s is None:
            continue
        t = act_threshold(stats[_stats_key(path, "output")], s)
        out.append(Assignment(path, "act", "mlp.act:output", threshold=t, skips=_act_skips(smap, layer),
                              width=_act_width(model, smap, layer), target=s))
    return out


def _chess_requests(model, smap, config):
    _need_map(smap)
    if not smap.gated:
        raise ConfigError("CHESS needs a gated MLP (gate/up/down); this model's MLP is not gated")
    reqs = []
    for layer in range(smap.num_layers):
        up = _role_path(smap, layer, "mlp.up")
        act = _role_path(smap, layer, "mlp.act")
        reqs.append(Request(_stats_key(up, "output"), up, "output"))
        reqs.append(Request(f"{act}:chess", act, "output", scale_from=_stats_key(up, "output")))
        if config.selective:
            for role in config.attention:
                if role in smap.roles:
                    src = _role_path(smap, layer, "attn.q" if role in ("attn.k", "attn.v") else role)
                    reqs.append(Request(_stats_key(src, "input"), src, "input"))
    return reqs


def _chess_assign(model, smap, config, stats):
    from actsparse.sparsify.calibration import mean_abs
    from actsparse.sparsify.chess import channel_thresholds

    out = []
    for layer in range(smap.num_layers):
        act = _role_path(smap, layer, "mlp.act")
        up = _role_path(smap, layer, "mlp.up")
        s = site_sparsity(config, act, config.sparsity)
        if s is not None:
            T = 0.0 if s <= 0 else stats[f"{act}:chess"].abs_quantile(s)
            t = channel_thresholds(T, mean_abs(stats[_stats_key(up, "output")]))
            out.append(Assignment(act, "act", "mlp.act:output", threshold=t, skips=_act_skips(smap, layer),
                                  width=_act_width(model, smap, layer), target=s))
        if config.selective:
            base = config.attention_sparsity if config.attention_sparsity is not None else config.sparsity
            for role in config.attention:
                if role not in smap.roles:
                    continue
                path = _role_path(smap, layer, role)
                src_role = "attn.q" if role in ("attn.k", "attn.v") else role
                src = _role_path(smap, layer, src_role)
                sa = site_sparsity(config, path, base)
                if sa is None:
                    continue
                ta = 0.0 if sa <= 0 else stats[_stats_key(src, "input")].abs_quantile(sa)
                out.append(Assignment(path, "linear", f"{src_role}:input", threshold=ta, skips=(path,), target=sa))
    return out


def _topk_requests(model, smap, config):
    _need_map(smap)
    return []


def _topk_assign(model, smap, config, stats):
    from actsparse.sparsify.topk import keep_count

    out = []
    for layer in range(smap.num_layers):
        if config.site == "mlp.act":
            path = _role_path(smap, layer, "mlp.act")
            width = _act_width(model, smap, layer)
            s = site_sparsity(config, path, config.sparsity)
            if s is None:
                continue
            out.append(Assignment(path, "act", "mlp.act:output", mode="topk", k=keep_count(width, s),
                                  skips=_act_skips(smap, layer), width=width, target=s))
        else:
            path = _role_path(smap, layer, "mlp.down")
            width = model.get_submodule(path).in_features
            s = site_sparsity(config, path, config.sparsity)
            if s is None:
                continue
            out.append(Assignment(path, "linear", "mlp.down:input", mode="topk", k=keep_count(width, s),
                                  skips=(path,), target=s))
    return out


# ---------------------------------------------------------------- WINA
def _wina_requests(model, smap, config):
    from actsparse.sparsify.wina import column_norms

    _need_map(smap)
    reqs = []
    for layer in range(smap.num_layers):
        for role in config.kinds:
            if role not in smap.roles:
                continue
            path = _role_path(smap, layer, role)
            w = model.get_submodule(path).weight
            reqs.append(Request(f"{path}:wina", path, "input", scale=column_norms(w)))
    return reqs


def _wina_assign(model, smap, config, stats):
    from actsparse.sparsify.wina import column_norms, score_thresholds

    out = []
    for layer in range(smap.num_layers):
        for role in config.kinds:
            if role not in smap.roles:
                continue
            path = _role_path(smap, layer, role)
            s = site_sparsity(config, path, config.sparsity)
            if s is None:
                continue
            T = 0.0 if s <= 0 else stats[f"{path}:wina"].abs_quantile(s)
            src_role = {"attn.k": "attn.q", "attn.v": "attn.q", "mlp.up": "mlp.gate"}.get(role, role)
            t = score_thresholds(T, column_norms(model.get_submodule(path).weight))
            out.append(Assignment(path, "linear", f"{role}:input", threshold=t, skips=(path,), target=s))
    return out


# ---------------------------------------------------------------- CETT
def _cett_requests(model, smap, config):
    _need_map(smap)
    return [Request(f"{p}:sample", p, "input", sample_rows=config.sample_tokens)
            for p in (_role_path(smap, i, "mlp.down") for i in range(smap.num_layers))]


def _cett_assign(model, smap, config, stats):
    from actsparse.sparsify.cett import neuron_thresholds, threshold_for_cett

    out = []
    for layer in range(smap.num_layers):
        path = _role_path(smap, layer, "mlp.down")
        if site_sparsity(config, path, 0.0) is None:
            continue
        w = model.get_submodule(path).weight
        tau, reached = threshold_for_cett(stats[f"{path}:sample"], w, config.cett, dtype=torch.float32)
        out.append(Assignment(path, "linear", "mlp.down:input", threshold=neuron_thresholds(tau, w),
                              skips=(path,), target=None))
    return out


def _register_builtin() -> None:
    from actsparse.sparsify.cats import CATS
    from actsparse.sparsify.cett import CETT
    from actsparse.sparsify.chess import CHESS
    from actsparse.sparsify.teal import TEAL
    from actsparse.sparsify.topk import TopK
    from actsparse.sparsify.wina import WINA

    register_handler(TEAL, requests=_teal_requests, assign=_teal_assign)
    register_handler(CATS, requests=_cats_requests, assign=_cats_assign)
    register_handler(CHESS, requests=_chess_requests, assign=_chess_assign)
    register_handler(TopK, requests=_topk_requests, assign=_topk_assign)
    register_handler(WINA, requests=_wina_requests, assign=_wina_assign)
    register_handler(CETT, requests=_cett_requests, assign=_cett_assign)


_register_builtin()


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
        for r in handler_for(config).requests(model, smap, config):
            if r.key not in seen:
                seen.add(r.key)
                out.append(r)
    return out


def calibrate(model: nn.Module, configs, calibration, *, stats=None, batch_size: int = 4,
              progress: bool = False) -> dict:
    """Compute the calibration statistics that ``configs`` need on ``calibration`` windows."""
    if is_sparsified(model):
        raise ConfigError("calibrate a dense model: call desparsify_(model) first")
    reqs = required_stats(model, configs)
    out = calib.collect(model, calibration, reqs, batch_size=batch_size, progress=progress, have=_as_stats(stats))
    calib.check_enough(out, [r.key for r in reqs])
    return out


def plan_assignments(model: nn.Module, config: SparsityConfig, stats=None, calibration=None, *,
                     batch_size: int = 4, progress: bool = False) -> list[Assignment]:
    """What ``sparsify_`` would install, without installing it."""
    if not isinstance(config, SparsityConfig):
        raise ConfigError(f"config must be a method config (TEAL(...), CATS(...), ...), got {type(config).__name__}")
    smap = site_map(model, warn=False)
    handler = handler_for(config)
    stats = _as_stats(stats)
    reqs = handler.requests(model, smap, config)
    missing = [r for r in reqs if r.key not in stats]
    if missing:
        if calibration is None:
            raise DataError(
                f"{type(config).__name__} needs calibration statistics that were not given "
                f"(e.g. {missing[0].key}); pass calibration=Windows(...) or stats from calibrate()/profile()")
        stats = calibrate(model, config, calibration, stats=stats, batch_size=batch_size, progress=progress)
    calib.check_enough(stats, [r.key for r in reqs])
    return handler.assign(model, smap, config, stats)


def sparsify_(model: nn.Module, config: SparsityConfig, stats=None, calibration=None, *,
              filter_fn: Callable[[nn.Module, str], bool] | None = None, batch_size: int = 4,
              progress: bool = False) -> None:
    """Apply ``config`` to ``model`` in place (returns None).

    ``stats``: calibration statistics (a dict from :func:`calibrate`, or a Profile whose sites
    cover what the method needs); ``calibration``: :class:`~actsparse.data.text.Windows` to
    compute missing statistics. ``filter_fn(module, path)``: return False to leave a module dense.
    """
    if is_sparsified(model):
        raise ConfigError("the model is already sparsified; call desparsify_(model) first")
    assignments = plan_assignments(model, config, stats, calibration, batch_size=batch_size, progress=progress)
    if filter_fn is not None:
        assignments = [a for a in assignments if filter_fn(model.get_submodule(a.path), a.path)]
    install(model, config, assignments)


def install(model: nn.Module, config: SparsityConfig, assignments: list[Assignment], identity: dict | None = None) -> None:
    """Swap the sparse modules of ``assignments`` into ``model`` (all or nothing)."""
    from actsparse.models.loading import weights_identity

    if is_sparsified(model):
        raise ConfigError("the model is already sparsified; call desparsify_(model) first")
    identity = identity or weights_identity(model)
    token_mask = TokenMask()
    built: dict[str, nn.Module] = {}
    for a in assignments:
        if a.path in built:
            raise ConfigError(f"two sparse modules for {a.path}")
        original = model.get_submodule(a.path)
        if a.module == "linear":
            new = MaskedLinear(original, a.threshold, mode=a.mode, k=a.k, site_kind=a.site_kind, skips=a.skips)
        elif a.module == "act":
            new = ThresholdedActivation(original, a.width, a.threshold, mode=a.mode, k=a.k,
                                        site_kind=a.site_kind, skips=a.skips)
        else:
            raise ConfigError(f"unknown sparse module type {a.module!r}")
        p = next(iter(model.parameters()), None)
        if isinstance(new.threshold, torch.Tensor) and p is not None:
            new.threshold = new.threshold.to(p.device)
        new._token_mask = token_mask
        built[a.path] = new
    originals = {}
    for path, new in built.items():
        originals[path] = model.get_submodule(path)
        model.set_submodule(path, new)

    def root_hook(module, args, kwargs):
        m = kwargs.get("attention_mask")
        if m is None and len(args) >= 2 and isinstance(args[1], torch.Tensor):
            m = args[1]
        token_mask.mask = m if isinstance(m, torch.Tensor) and m.ndim == 2 else None

    hook = model.register_forward_pre_hook(root_hook, with_kwargs=True)
    object.__setattr__(model, STATE_ATTR, SparsityState(config, identity, list(assignments), originals, token_mask, hook))


def desparsify_(model: nn.Module) -> None:
    """Put back the original modules (the very objects that were wrapped). No-op if dense."""
    from actsparse.decode.accelerate import deaccelerate_

    deaccelerate_(model)
    state = getattr(model, STATE_ATTR, None)
    for path, original in (state.originals.items() if state else ()):
        model.set_submodule(path, original)
    for path, m in list(iter_sparse_modules(model)):  # modules installed by hand
        original = m.linear if isinstance(m, MaskedLinear) else m.act
        model.set_submodule(path, original)
    if state is not None:
        if state.hook is not None:
            state.hook.remove()
        object.__delattr__(model, STATE_ATTR)


def thresholds_table(model: nn.Module) -> list[dict]:
    """Per sparse module: path, kind, mode, scalar threshold (median for per-channel), k."""
    rows = []
    from actsparse.models.sitemaps import site_map as _sm

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
