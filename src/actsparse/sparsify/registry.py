"""Method configs, their handlers and named presets: the registry of training-free methods.

A method is one module (torchao style): a frozen config class that says *what* (the
sparsity and the method's options), registered by name with :func:`register_method`, and a
:class:`Handler` registered for that class with :func:`register_handler` that says *how*:
which calibration statistics it needs (``requests``) and which sparse modules to install
from them (``assign``). A preset is a named config with fixed options (``teal-greedy`` is
TEAL with the greedy allocation); the CLI's ``--method`` takes method and preset names::

    @register_method
    @dataclass(frozen=True)
    class MyMethod(SparsityConfig):
        METHOD = "mine"
        sparsity: float = 0.5

    @register_handler(MyMethod)
    class _MyHandler(Handler):
        def requests(self, target): ...
        def assign(self, target, stats): ...

This module imports nothing above the sparsify layer and no method module: the built-in
methods register when the package :mod:`actsparse.sparsify` is imported, which Python does
before it imports this module, so they are always known here.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from actsparse.config import VersionedConfig
from actsparse.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from actsparse.sparsify.calibration import Request
    from actsparse.sparsify.targets import Target


def check_sparsity(value, what: str = "sparsity") -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number in [0, 1), got {value!r}") from None
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ConfigError(f"{what} must be in [0, 1), got {value!r}")
    return s


@dataclass(frozen=True)
class SparsityConfig(VersionedConfig):
    """Base of every method config. Subclasses set ``METHOD`` and ``VERSION`` and add fields.

    ``KNOB`` names the field a sweep or a PPL-p% search varies (``sparsity`` by default; CETT
    searches its ``cett`` value). Common field: ``overrides``, a tuple of ``(pattern,
    sparsity)`` pairs matched against module paths (``fnmatch`` glob, or a regular
    expression when prefixed ``re:``); the last matching pattern wins; ``sparsity=None``
    leaves the matched sites dense.
    """

    KIND_KEY: ClassVar[str] = "method"
    METHOD: ClassVar[str] = ""
    KNOB: ClassVar[str] = "sparsity"

    @classmethod
    def kind(cls) -> str:
        return cls.METHOD

    def __post_init__(self):
        if hasattr(self, "sparsity"):
            object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        ov = getattr(self, "overrides", ())
        if isinstance(ov, dict):
            ov = tuple(ov.items())
        clean = []
        for item in ov or ():
            if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
                raise ConfigError(f"overrides must be (pattern, sparsity or None) pairs, got {item!r}")
            pat, s = item
            clean.append((pat, None if s is None else check_sparsity(s, f"override sparsity for {pat!r}")))
        if hasattr(self, "overrides"):
            object.__setattr__(self, "overrides", tuple(clean))

    def with_knob(self, value: float) -> "SparsityConfig":
        return dataclasses.replace(self, **{self.KNOB: value})

    def with_sparsity(self, sparsity: float) -> "SparsityConfig":
        return dataclasses.replace(self, sparsity=sparsity)


@dataclass
class Assignment:
    """One sparse module to install at ``path``: a masked linear (``module="linear"``) or a
    thresholded MLP activation (``"act"``)."""

    path: str
    module: str  # "linear" or "act"
    site_kind: str
    threshold: float | torch.Tensor | None = None
    mode: str = "threshold"
    k: int | None = None
    skips: tuple[str, ...] = ()  # module paths whose weight rows a kernel can skip for masked entries
    width: int | None = None  # for "act": neurons
    target: float | None = None  # nominal sparsity of this site
    centre: torch.Tensor | None = None  # "linear" with compensation: per-input centre
    offset: torch.Tensor | None = None  # ... and per-output offset (see sparsify.compensation)
    factor_u: torch.Tensor | None = None  # "linear" with a low-rank remainder (R-Sparse): U_r, out x rank
    factor_v: torch.Tensor | None = None  # ... and S_r V_r^T, rank x in (see sparsify.rsparse)


class Handler:
    """How a method is applied. ``requests`` lists the calibration statistics it needs;
    ``assign`` turns them into the sparse modules to install. Both get a
    :class:`~actsparse.sparsify.targets.Target` (the model, its site map and the config)."""

    def requests(self, target: "Target") -> list["Request"]:
        return []

    def assign(self, target: "Target", stats: dict) -> list[Assignment]:  # pragma: no cover - abstract
        raise NotImplementedError


METHODS: dict[str, type[SparsityConfig]] = {}  # method name -> config class
HANDLERS: dict[type, Handler] = {}  # config class -> handler
PRESETS: dict[str, tuple[type[SparsityConfig], dict]] = {}  # preset name -> (config class, fixed options)


def register_method(cls):
    """Class decorator: make ``cls`` (a SparsityConfig with ``METHOD`` set) known by name; the
    name is also a preset without fixed options."""
    name = cls.METHOD
    if not name or name != name.lower():
        raise ValueError(f"{cls.__name__}.METHOD must be a lower-case name, got {name!r}")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"method {name!r} is already registered by {METHODS[name].__name__}")
    METHODS[name] = cls
    PRESETS.setdefault(name, (cls, {}))
    return cls


def register_handler(config_cls: type):
    """Class decorator: ``cls`` (a :class:`Handler`) applies ``config_cls`` configs."""
    def deco(cls):
        HANDLERS[config_cls] = cls()
        return cls
    return deco


def register_preset(name: str, config_cls: type[SparsityConfig], **options) -> None:
    """A named config with fixed ``options`` (e.g. ``teal-greedy`` = TEAL(allocation="greedy"))."""
    if name in PRESETS and PRESETS[name] != (config_cls, options):
        raise ValueError(f"preset {name!r} is already registered")
    PRESETS[name] = (config_cls, dict(options))


def method_names() -> list[str]:
    return sorted(METHODS)


def preset_names() -> list[str]:
    """Names the CLI's ``--method`` accepts: every method and every preset."""
    return list(PRESETS)


def config_class(method: str) -> type[SparsityConfig]:
    try:
        return METHODS[method.lower()]
    except KeyError:
        raise ConfigError(f"unknown method {method!r}; valid methods: {', '.join(sorted(METHODS))}") from None


def make_config(name: str, knob: float | None = None, **options) -> SparsityConfig:
    """The config of a method or preset ``name`` with its knob (the sparsity; CETT's value)
    set to ``knob`` when given, plus ``options``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown method {name!r}; valid: {', '.join(PRESETS)}")
    cls, fixed = PRESETS[name]
    kwargs = dict(fixed, **options)
    if knob is not None:
        kwargs[cls.KNOB] = knob
    return cls(**kwargs)


def handler_for(config: SparsityConfig) -> Handler:
    for cls in type(config).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    raise ConfigError(f"no handler is registered for {type(config).__name__}; valid methods: "
                      f"{', '.join(method_names())}")


def config_from_dict(d: dict) -> SparsityConfig:
    """Build the config named by ``d["method"]`` (strict)."""
    if not isinstance(d, dict) or "method" not in d:
        raise ConfigError(f"a config needs a 'method' key; valid methods: {', '.join(method_names())}")
    return config_class(str(d["method"])).from_dict(d)


def config_from_json(s: str) -> SparsityConfig:
    return config_from_dict(json.loads(s))
