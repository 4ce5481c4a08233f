"""CHESS: channel-wise thresholds for the MLP activation.

Importance of neuron i: ``|act(g_i)| * E|u_i|``; ``T`` = per-layer s-quantile of the
importance on calibration data; per-neuron threshold on ``|act(g_i)|``: ``t_i = T / E|u_i|``.
The "selective" variant also thresholds the inputs of chosen attention projections
(per-layer quantile of ``|v|``, as TEAL).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from actsparse.errors import ConfigError
from actsparse.sparsify.calibration import Request, mean_abs, quantile_threshold
from actsparse.sparsify.registry import (Assignment, Handler, SparsityConfig, check_sparsity, register_handler,
                                         register_method, register_preset)

ATTENTION_KINDS = ("attn.q", "attn.k", "attn.v", "attn.o")


@register_method
@dataclass(frozen=True)
class CHESS(SparsityConfig):
    """``selective``: also sparsify the inputs of the ``attention`` projections, at
    ``attention_sparsity`` (defaults to ``sparsity``)."""

    METHOD = "chess"
    VERSION = 1
    sparsity: float = 0.5
    selective: bool = False
    attention: tuple[str, ...] = ("attn.q", "attn.o")
    attention_sparsity: float | None = None
    overrides: tuple[tuple[str, float | None], ...] = ()

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "attention", tuple(self.attention))
        bad = [k for k in self.attention if k not in ATTENTION_KINDS]
        if bad:
            raise ConfigError(f"unknown CHESS attention projection(s) {bad}; valid: {', '.join(ATTENTION_KINDS)}")
        if self.attention_sparsity is not None:
            object.__setattr__(self, "attention_sparsity", check_sparsity(self.attention_sparsity, "attention_sparsity"))


def channel_thresholds(T: float, mean_abs_u: torch.Tensor) -> torch.Tensor:
    """``t_i = T / E|u_i|`` (fp32); a neuron with ``E|u_i| = 0`` never contributes and gets +inf
    (unless T = 0: then 0, i.e. nothing is dropped)."""
    u = mean_abs_u.to(torch.float64)
    if T <= 0:
        return torch.zeros_like(u, dtype=torch.float32)
    t = torch.where(u > 0, T / u.clamp_min(1e-300), torch.full_like(u, float("inf")))
    return t.to(torch.float32)


register_preset("chess-selective", CHESS, selective=True)


@register_handler(CHESS)
class _CHESSHandler(Handler):
    def requests(self, t):
        t.require("mlp.act", "mlp.up", "mlp.down", gated=True)
        reqs = []
        for layer in t.layers:
            up = t.path(layer, "mlp.up")
            act = t.path(layer, "mlp.act")
            reqs.append(Request(f"{up}:output", up, "output"))
            reqs.append(Request(f"{act}:chess", act, "output", scale_from=f"{up}:output"))
            if t.config.selective:
                for role in t.config.attention:
                    if t.has(role):
                        src = t.path(layer, t.input_source(role))
                        reqs.append(Request(f"{src}:input", src, "input"))
        return reqs

    def assign(self, t, stats):
        cfg = t.config
        out = []
        for layer in t.layers:
            act = t.path(layer, "mlp.act")
            up = t.path(layer, "mlp.up")
            s = t.sparsity(act)
            if s is not None:
                T = quantile_threshold(stats[f"{act}:chess"], s)
                thr = channel_thresholds(T, mean_abs(stats[f"{up}:output"]))
                out.append(Assignment(act, "act", "mlp.act:output", threshold=thr, skips=t.act_skips(layer),
                                      width=t.in_features(layer, "mlp.down"), target=s))
            if cfg.selective:
                base = cfg.attention_sparsity if cfg.attention_sparsity is not None else cfg.sparsity
                for role in cfg.attention:
                    if not t.has(role):
                        continue
                    path = t.path(layer, role)
                    src_role = t.input_source(role)
                    sa = t.sparsity(path, base)
                    if sa is None:
                        continue
                    ta = quantile_threshold(stats[f"{t.path(layer, src_role)}:input"], sa)
                    out.append(Assignment(path, "linear", f"{src_role}:input", threshold=ta, skips=(path,),
                                          target=sa))
        return out
