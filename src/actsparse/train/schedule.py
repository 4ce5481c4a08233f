"""Schedules for regulariser weights: ``step -> lambda`` callables with strict JSON configs.

ProSparse (progressive L1): constant ``lambdas[0]`` until ``steps[0]``; in stage i
(i >= 1), from ``steps[i-1]`` to ``steps[i]``, a sine-shaped rise

    eta = (sin(-pi/2 + pi * (t - T_{i-1}) / (T_i - T_{i-1})) + 1) / 2
    lambda = lambda_{i-1} + eta * (lambda_i - lambda_{i-1})

and ``lambdas[-1]`` from the last step on. A flat stage is a stage whose lambda equals
the previous one. ``Constant(value)`` and ``LinearDecay(initial, steps)`` (the weight of
the ReLU-balance regulariser, which decays to 0 over the warm-up) complete the set.

    sched = ProSparse(lambdas=(1e-4, 5e-4, 1e-3), steps=(100, 300, 600))
    lam = sched(step)
    assert schedule_from_dict(sched.to_dict()) == sched
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from actsparse.config import VersionedConfig
from actsparse.errors import ConfigError

SCHEDULES: dict[str, type] = {}


def _register(cls):
    SCHEDULES[cls.KIND] = cls
    return cls


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return v


def _integer(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Schedule(VersionedConfig):
    """Base: frozen, versioned, strict ``to_dict`` / ``from_dict`` (the one config base of
    :mod:`actsparse.config`); call with a step."""

    def __call__(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


@_register
@dataclass(frozen=True)
class Constant(Schedule):
    """The same value at every step (``Constant(0.0)`` is "no regulariser")."""

    KIND: ClassVar[str] = "constant"
    value: float = 0.0

    def __post_init__(self):
        v = _number(self.value, "Constant.value")
        if v < 0:
            raise ConfigError(f"lambda must be >= 0, got {v}")
        object.__setattr__(self, "value", v)

    def __call__(self, step: int) -> float:
        return self.value


@_register
@dataclass(frozen=True)
class ProSparse(Schedule):
    """ProSparse's progressive lambda. ``lambdas[i]`` is reached at ``steps[i]``; the first
    stage (until ``steps[0]``) is the constant warm-up at ``lambdas[0]``."""

    KIND: ClassVar[str] = "prosparse"
    lambdas: tuple[float, ...] = (1e-4,)
    steps: tuple[int, ...] = (0,)

    def __post_init__(self):
        if isinstance(self.lambdas, (int, float)) or isinstance(self.steps, (int, float)):
            raise ConfigError("ProSparse lambdas and steps must be sequences (one entry per stage)")
        lambdas = tuple(_number(v, f"ProSparse.lambdas[{i}]") for i, v in enumerate(self.lambdas))
        steps = tuple(_integer(v, f"ProSparse.steps[{i}]") for i, v in enumerate(self.steps))
        if not lambdas:
            raise ConfigError("ProSparse needs at least one stage")
        if len(lambdas) != len(steps):
            raise ConfigError(f"ProSparse needs one end step per lambda: {len(lambdas)} lambdas, {len(steps)} steps")
        for i, lam in enumerate(lambdas):
            if lam < 0:
                raise ConfigError(f"ProSparse lambdas must be >= 0; lambdas[{i}] = {lam}")
        if steps[0] < 0:
            raise ConfigError(f"ProSparse steps must be >= 0; steps[0] = {steps[0]}")
        for i in range(1, len(steps)):
            if steps[i] <= steps[i - 1]:
                raise ConfigError(
                    f"ProSparse stage end steps must strictly increase; steps[{i - 1}] = {steps[i - 1]} "
                    f">= steps[{i}] = {steps[i]}"
                )
        object.__setattr__(self, "lambdas", lambdas)
        object.__setattr__(self, "steps", steps)

    def __call__(self, step: int) -> float:
        t = step
        lambdas, steps = self.lambdas, self.steps
        if t < steps[0]:
            return lambdas[0]
        for i in range(1, len(steps)):
            if t < steps[i]:
                lo, hi = steps[i - 1], steps[i]
                eta = (math.sin(-math.pi / 2 + math.pi * (t - lo) / (hi - lo)) + 1) / 2
                return lambdas[i - 1] + eta * (lambdas[i] - lambdas[i - 1])
        return lambdas[-1]

    @classmethod
    def even(cls, lam: float, total_steps: int, stages: int = 4, warmup_frac: float = 0.1) -> "ProSparse":
        """A default schedule reaching ``lam``: warm-up at ``lam / 2**(stages-1)`` for
        ``warmup_frac`` of the steps, then ``stages - 1`` sine rises, each doubling lambda,
        spread evenly over the next 80% of the remaining steps; ``lam`` for the rest."""
        if total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
        if stages < 1:
            raise ConfigError(f"stages must be >= 1, got {stages}")
        lam = _number(lam, "lambda")
        warm = int(round(warmup_frac * total_steps))
        rise_end = warm + int(round(0.8 * (total_steps - warm)))
        if stages == 1 or rise_end - warm < stages - 1:
            return cls(lambdas=(lam,), steps=(0,))
        lambdas = tuple(lam / 2 ** (stages - 1 - i) for i in range(stages))
        ends = [warm] + [warm + round((rise_end - warm) * i / (stages - 1)) for i in range(1, stages)]
        return cls(lambdas=lambdas, steps=tuple(int(e) for e in ends))


@_register
@dataclass(frozen=True)
class LinearDecay(Schedule):
    """``initial * max(0, 1 - step / steps)``: decays linearly to 0 at ``steps`` (the
    ReLU-balance regulariser's weight over the warm-up). ``steps = 0`` means always 0."""

    KIND: ClassVar[str] = "linear_decay"
    initial: float = 0.5
    steps: int = 1000

    def __post_init__(self):
        v = _number(self.initial, "LinearDecay.initial")
        n = _integer(self.steps, "LinearDecay.steps")
        if v < 0:
            raise ConfigError(f"LinearDecay.initial must be >= 0, got {v}")
        if n < 0:
            raise ConfigError(f"LinearDecay.steps must be >= 0, got {n}")
        object.__setattr__(self, "initial", v)
        object.__setattr__(self, "steps", n)

    def __call__(self, step: int) -> float:
        if self.steps == 0:
            return 0.0
        return self.initial * max(0.0, 1.0 - step / self.steps)


def schedule_from_dict(d: dict) -> Schedule:
    """Build the schedule named by ``d["kind"]`` (strict: unknown keys raise)."""
    if not isinstance(d, dict) or "kind" not in d:
        raise ConfigError(f"a schedule needs a 'kind' key; valid kinds: {', '.join(sorted(SCHEDULES))}")
    cls = SCHEDULES.get(d["kind"])
    if cls is None:
        raise ConfigError(f"unknown schedule kind {d['kind']!r}; valid kinds: {', '.join(sorted(SCHEDULES))}")
    return cls.from_dict(d)
