"""TEAL: magnitude thresholds on the input of every linear in each block.

Keep ``v`` iff ``|v| > t``; per layer and per input kind, ``t`` is the s-quantile of ``|v|``
on calibration data. q/k/v share one input (one threshold), gate/up share one input (in an
MLP without a gate, the up projection reads the MLP input under the ``mlp.gate`` kind).
``allocation="uniform"``: the same s for every kind of every block. ``allocation="greedy"``:
the paper's block-wise greedy allocation (see :mod:`actsparse.sparsify.allocation`): per
block, the kinds' sparsities are raised one ``greedy_step`` at a time, always the kind whose
step adds the least block error per skipped parameter, until the block's parameter-weighted
sparsity is s, the block error measured on the true block output of a few calibration
sequences (``greedy_error="block"``) or on the block's linear outputs (``"linear"``).
"""
from __future__ import annotations

from dataclasses import dataclass

from actsparse.errors import ConfigError
from actsparse.models.sitemaps import SHARED_INPUT
from actsparse.sparsify.allocation import ERROR_NORMS, row_key
from actsparse.sparsify.calibration import MIN_CALIBRATION_TOKENS, Request, quantile_threshold
from actsparse.sparsify.registry import (Assignment, Handler, SparsityConfig, register_handler, register_method,
                                         register_preset)

KINDS = ("attn.q", "attn.o", "mlp.gate", "mlp.down")
# input kind -> the linears that read that input (the kind's role first)
INPUT_KINDS = {k: (k,) + tuple(r for r, src in SHARED_INPUT.items() if src == k) for k in KINDS}
ALLOCATIONS = ("uniform", "greedy")


@register_method
@dataclass(frozen=True)
class TEAL(SparsityConfig):
    """``sparsity``: target fraction of zeroed inputs; ``kinds``: which input kinds to sparsify;
    ``allocation``: "uniform" or "greedy" (block-wise, parameter-weighted sparsity = ``sparsity``
    per block); ``greedy_step``: the greedy's increment of one kind's sparsity;
    ``greedy_error``: how the greedy measures the block error: "block" (the true decoder-layer
    output on ``greedy_sequences`` whole calibration windows, each cut to
    ``greedy_sequence_tokens``) or a row-based error ("linear", ...) on ``greedy_tokens``
    calibration token rows per block (see :mod:`actsparse.sparsify.allocation`; all ignored
    by "uniform"); ``centre`` / ``bias_correction``: the compensations of
    :mod:`actsparse.sparsify.compensation` (median-centred inputs; the dropped entries' expected
    product folded into an offset), fitted on ``compensation_rows`` raw calibration rows per
    input (presets ``teal-centre``, ``teal-bias``, ``teal-centre-bias``)."""

    METHOD = "teal"
    VERSION = 1
    sparsity: float = 0.5
    kinds: tuple[str, ...] = KINDS
    allocation: str = "uniform"
    greedy_step: float = 0.05
    greedy_tokens: int = 512
    greedy_error: str = "block"
    greedy_sequences: int = 2
    greedy_sequence_tokens: int = 128
    overrides: tuple[tuple[str, float | None], ...] = ()
    centre: bool = False
    bias_correction: bool = False
    compensation_rows: int = 1024

    def __post_init__(self):
        super().__post_init__()
        for name in ("centre", "bias_correction"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.compensated and self.allocation != "uniform":
            raise ConfigError("centre / bias_correction are fitted per input with the uniform allocation; the greedy "
                              "allocation measures block errors without them: use allocation='uniform'")
        rows = self.compensation_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < MIN_CALIBRATION_TOKENS:
            raise ConfigError(f"compensation_rows must be an integer >= {MIN_CALIBRATION_TOKENS}, got {rows!r}")
        object.__setattr__(self, "kinds", tuple(self.kinds))
        bad = [k for k in self.kinds if k not in INPUT_KINDS]
        if bad:
            raise ConfigError(f"unknown TEAL input kind(s) {bad}; valid: {', '.join(INPUT_KINDS)}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        step = self.greedy_step
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 0.5:
            raise ConfigError(f"greedy_step must be in (0, 0.5], got {step!r}")
        object.__setattr__(self, "greedy_step", float(step))
        if isinstance(self.greedy_tokens, bool) or not isinstance(self.greedy_tokens, int) \
                or self.greedy_tokens < MIN_CALIBRATION_TOKENS:
            raise ConfigError(f"greedy_tokens must be an integer >= {MIN_CALIBRATION_TOKENS}, got {self.greedy_tokens!r}")
        if self.greedy_error not in ERROR_NORMS:
            raise ConfigError(f"greedy_error must be one of {', '.join(ERROR_NORMS)}, got {self.greedy_error!r}")
        for name in ("greedy_sequences", "greedy_sequence_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")


    @property
    def compensated(self) -> bool:
        return self.centre or self.bias_correction


register_preset("teal-greedy", TEAL, allocation="greedy")
register_preset("teal-greedy-linear", TEAL, allocation="greedy", greedy_error="linear")
register_preset("teal-bias", TEAL, bias_correction=True)
register_preset("teal-centre", TEAL, centre=True)
register_preset("teal-centre-bias", TEAL, centre=True, bias_correction=True)


def input_key(target, layer: int, kind: str) -> str:
    """Stats key of the input of ``kind`` in ``layer`` (captured under its source role)."""
    return f"{target.path(layer, target.input_source(kind))}:input"


@register_handler(TEAL)
class _TEALHandler(Handler):
    def requests(self, t):
        if t.generic:
            return [Request(f"{path}:input", path, "input") for path in _generic_paths(t)]
        t.require()
        reqs = []
        rows = t.config.compensation_rows
        for layer in t.layers:
            for kind in t.config.kinds:
                if t.input_source(kind) is None:
                    continue
                if t.config.allocation == "uniform" and all(
                        t.sparsity(t.path(layer, r), t.config.sparsity) is None for r in t.readers(kind)):
                    continue  # every reader kept dense by an override: nothing reads this input's statistics
                path = t.path(layer, t.input_source(kind))
                reqs.append(Request(f"{path}:input", path, "input"))
                if t.config.compensated:
                    reqs.append(Request(row_key(path, rows), path, "input", sample_rows=rows))
        if t.config.allocation == "greedy":
            from actsparse.sparsify.allocation import greedy_requests

            reqs += greedy_requests(t)
        return reqs

    def assign(self, t, stats):
        if t.generic:
            return _generic_assignments(t, stats)
        per_kind = None
        if t.config.allocation == "greedy":
            from actsparse.sparsify.allocation import greedy_sparsities

            per_kind = greedy_sparsities(t, stats)
        out = []
        for layer in t.layers:
            for kind in t.config.kinds:
                src = t.input_source(kind)
                if src is None:
                    continue
                base = per_kind.get((layer, kind), t.config.sparsity) if per_kind else t.config.sparsity
                for role in t.readers(kind):
                    path = t.path(layer, role)
                    s = t.sparsity(path, base)
                    if s is None:
                        continue
                    thr = quantile_threshold(stats[input_key(t, layer, kind)], s)
                    a = Assignment(path, "linear", f"{src}:input", threshold=thr, skips=(path,), target=s)
                    if t.config.compensated:
                        _compensate(a, t, stats[row_key(t.path(layer, src), t.config.compensation_rows)], s)
                    out.append(a)
        return out


def _compensate(a: Assignment, t, rows, sparsity: float) -> None:
    from actsparse.sparsify.compensation import fit_input
    from actsparse.sparsify.modules import out_in_weight

    cfg = t.config
    fit = fit_input(rows, sparsity, centre=cfg.centre, bias_correction=cfg.bias_correction, threshold=a.threshold)
    a.threshold, a.centre = fit.threshold, fit.centre
    a.offset = fit.offset(out_in_weight(t.module(a.path)))


def _generic_paths(t) -> list[str]:
    """An unmapped model: every linear but the LM head, each with its own input threshold
    (without a site map, which linears share an input is unknown). Input kinds and the greedy
    allocation are defined by roles, so they are refused here."""
    name = type(t.config).__name__
    if t.config.allocation != "uniform":
        raise ConfigError(f"{name}(allocation={t.config.allocation!r}) needs an architecture site map (the block "
                          f"and its input kinds); {type(t.model).__name__} has none: use allocation='uniform'")
    if t.config.compensated:
        raise ConfigError(f"{name}(centre / bias_correction) needs an architecture site map (which linears share "
                          f"an input); {type(t.model).__name__} has none: leave them off")
    if t.config.kinds != KINDS:
        raise ConfigError(f"{name}(kinds=...) selects roles, and {type(t.model).__name__} has no site map; leave "
                          "kinds at its default and keep linears dense with overrides=[('<path glob>', None)]")
    paths = t.generic_linears()
    if not paths:
        raise ConfigError(f"{type(t.model).__name__} has no nn.Linear besides its LM head: nothing for {name}")
    return paths


def _generic_assignments(t, stats) -> list[Assignment]:
    out = []
    for path in _generic_paths(t):
        s = t.sparsity(path)
        if s is None:
            continue
        thr = quantile_threshold(stats[f"{path}:input"], s)
        out.append(Assignment(path, "linear", "linear:input", threshold=thr, skips=(path,), target=s))
    return out
