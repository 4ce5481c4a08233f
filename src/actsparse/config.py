"""Base class for method configs, the method registry and strict (de)serialisation.

A config is a frozen, typed dataclass that says *what* to do (torchao style); a handler
registered for its type says *how* (see :mod:`actsparse.sparsify.api`). Configs carry a
version and round-trip through JSON; loading is strict: unknown keys raise.

    cfg = TEAL(sparsity=0.5)
    d = cfg.to_dict()               # {"method": "teal", "version": 1, "sparsity": 0.5, ...}
    assert config_from_dict(d) == cfg
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from actsparse.errors import ConfigError

# method name -> config class
CONFIGS: dict[str, type["SparsityConfig"]] = {}


def register_config(cls):
    """Class decorator: make ``cls`` (a SparsityConfig subclass with METHOD set) loadable by name."""
    name = cls.METHOD
    if name in CONFIGS and CONFIGS[name] is not cls:
        raise ValueError(f"method {name!r} is already registered by {CONFIGS[name].__name__}")
    CONFIGS[name] = cls
    return cls


def _ensure_methods_loaded() -> None:
    import actsparse.sparsify  # noqa: F401  (registers every built-in method)


def method_names() -> list[str]:
    _ensure_methods_loaded()
    return sorted(CONFIGS)


def config_class(method: str) -> type["SparsityConfig"]:
    _ensure_methods_loaded()
    try:
        return CONFIGS[method.lower()]
    except KeyError:
        raise ConfigError(f"unknown method {method!r}; valid methods: {', '.join(sorted(CONFIGS))}") from None


def check_sparsity(value, what: str = "sparsity") -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number in [0, 1), got {value!r}") from None
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ConfigError(f"{what} must be in [0, 1), got {value!r}")
    return s


def _coerce(value, tp, name: str):
    """Convert a JSON value to the annotated field type (tuples from lists), strictly."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}: {value!r} does not match {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], name) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{name}: expected {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class SparsityConfig:
    """Base of every method config. Subclasses set ``METHOD`` and ``VERSION`` and add fields.

    Common field: ``overrides``, a tuple of ``(pattern, sparsity)`` pairs matched against
    module paths (``fnmatch`` glob, or a regular expression when prefixed ``re:``); the
    last matching pattern wins; ``sparsity=None`` leaves the matched sites dense.
    """

    METHOD: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

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

    # ----------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        out = {"method": self.METHOD, "version": self.VERSION}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "SparsityConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        method = d.pop("method", cls.METHOD)
        if method != cls.METHOD:
            raise ConfigError(f"config is for method {method!r}, not {cls.METHOD!r}")
        version = d.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise ConfigError(f"{cls.__name__} config version {version!r} is not supported (this is version {cls.VERSION})")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown key(s) for {cls.__name__}: {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        kwargs = {k: _coerce(v, hints[k], f"{cls.__name__}.{k}") for k, v in d.items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, s: str) -> "SparsityConfig":
        return cls.from_dict(json.loads(s))

    def with_sparsity(self, sparsity: float) -> "SparsityConfig":
        return dataclasses.replace(self, sparsity=sparsity)


def config_from_dict(d: dict) -> SparsityConfig:
    """Build the config named by ``d["method"]`` (strict)."""
    if not isinstance(d, dict) or "method" not in d:
        raise ConfigError(f"a config needs a 'method' key; valid methods: {', '.join(method_names())}")
    return config_class(str(d["method"])).from_dict(d)


def config_from_json(s: str) -> SparsityConfig:
    return config_from_dict(json.loads(s))
