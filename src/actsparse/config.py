"""One base for every serialised config: frozen, typed, versioned, strict JSON round trip.

A config is a frozen dataclass. ``to_dict()`` writes ``{KIND_KEY: kind, "version": VERSION,
**fields}`` (tuples as lists, nested configs as dicts); ``from_dict()`` checks the kind and
the version, refuses unknown keys and converts each value to its annotated type (lists to
tuples, nested dicts to nested configs) strictly, then the class's ``__post_init__``
validates the values. Subclasses set ``KIND`` (and ``KIND_KEY`` if the JSON key is not
"kind") and ``VERSION``.

    @dataclass(frozen=True)
    class Schedule(VersionedConfig):
        KIND: ClassVar[str] = "constant"
        value: float = 0.0

    assert Schedule.from_dict(Schedule(0.3).to_dict()) == Schedule(0.3)

A dict without a ``version`` key is read as the current version (files written before
configs carried one).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from actsparse.errors import ConfigError


def _coerce(value, tp, name: str):
    """Convert a JSON value to the annotated type ``tp``, strictly."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} does not match {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], name) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{name}: expected {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args))
    if isinstance(tp, type) and issubclass(tp, VersionedConfig):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected an object for {tp.__name__}, got {value!r}")
        return tp.from_dict(value)
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
    if isinstance(value, VersionedConfig):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class VersionedConfig:
    """Base of every serialised config (see the module docstring)."""

    KIND_KEY: ClassVar[str] = "kind"
    KIND: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    @classmethod
    def kind(cls) -> str:
        return cls.KIND

    def fields_dict(self) -> dict:
        """The fields only (no kind or version), JSON-ready."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_dict(self) -> dict:
        return {self.KIND_KEY: self.kind(), "version": self.VERSION, **self.fields_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ConfigError(f"a {cls.__name__} config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        kind = d.pop(cls.KIND_KEY, cls.kind())
        if kind != cls.kind():
            raise ConfigError(f"config is for {cls.KIND_KEY} {kind!r}, not {cls.kind()!r} ({cls.__name__})")
        version = d.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise ConfigError(f"{cls.__name__} config version {version!r} is not supported "
                              f"(this is version {cls.VERSION})")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown key(s) for {cls.__name__}: {', '.join(unknown)}; "
                              f"valid: {', '.join(sorted(names))}")
        return cls(**{k: _coerce(v, hints[k], f"{cls.__name__}.{k}") for k, v in d.items()})

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))
