"""CATS: threshold ``|act(g)|`` per layer at the s-quantile (MLP only).

``h = act(g) * keep * u``: a zero at neuron i lets a kernel skip row i of up_proj and
column i of down_proj (gate stays dense).
"""
from __future__ import annotations

from dataclasses import dataclass

from actsparse.sparsify.calibration import Request, quantile_threshold
from actsparse.sparsify.registry import Assignment, Handler, SparsityConfig, register_handler, register_method


@register_method
@dataclass(frozen=True)
class CATS(SparsityConfig):
    METHOD = "cats"
    VERSION = 1
    sparsity: float = 0.5
    overrides: tuple[tuple[str, float | None], ...] = ()


@register_handler(CATS)
class _CATSHandler(Handler):
    def requests(self, t):
        t.require("mlp.act", "mlp.down")
        return [Request(f"{p}:output", p, "output") for p in (t.path(i, "mlp.act") for i in t.layers)]

    def assign(self, t, stats):
        out = []
        for layer in t.layers:
            path = t.path(layer, "mlp.act")
            s = t.sparsity(path)
            if s is None:
                continue
            thr = quantile_threshold(stats[f"{path}:output"], s)
            out.append(Assignment(path, "act", "mlp.act:output", threshold=thr, skips=t.act_skips(layer),
                                  width=t.in_features(layer, "mlp.down"), target=s))
        return out
