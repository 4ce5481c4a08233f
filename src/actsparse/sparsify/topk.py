"""Top-K: keep the k largest ``|v|`` per token (constant per-token sparsity).

``k = width - round(s * width)``. Sites: the MLP activation output (``mlp.act``: zeros let
a kernel skip up rows and down columns, Lazy Neuron style) or the down_proj input
(``mlp.down:input``).
"""
from __future__ import annotations

from dataclasses import dataclass

from actsparse.errors import ConfigError
from actsparse.sparsify.calibration import Request
from actsparse.sparsify.registry import Assignment, Handler, SparsityConfig, register_handler, register_method

SITES = ("mlp.act", "mlp.down:input")


@register_method
@dataclass(frozen=True)
class TopK(SparsityConfig):
    METHOD = "topk"
    VERSION = 1
    sparsity: float = 0.5
    site: str = "mlp.act"
    overrides: tuple[tuple[str, float | None], ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if self.site not in SITES:
            raise ConfigError(f"Top-K site must be one of {', '.join(SITES)}, got {self.site!r}")


def keep_count(width: int, sparsity: float) -> int:
    return width - int(round(sparsity * width))


@register_handler(TopK)
class _TopKHandler(Handler):
    def requests(self, t):
        """None that a threshold reads (k is fixed); with calibration data, the activations of the
        site are still checked for NaN/inf."""
        t.require("mlp.act", "mlp.down")
        if t.config.site == "mlp.act":
            return [Request(f"{t.path(i, 'mlp.act')}:output", t.path(i, "mlp.act"), "output", required=False)
                    for i in t.layers]
        return [Request(f"{t.path(i, 'mlp.down')}:input", t.path(i, "mlp.down"), "input", required=False)
                for i in t.layers]

    def assign(self, t, stats):
        out = []
        for layer in t.layers:
            width = t.in_features(layer, "mlp.down")
            if t.config.site == "mlp.act":
                path = t.path(layer, "mlp.act")
                s = t.sparsity(path)
                if s is None:
                    continue
                out.append(Assignment(path, "act", "mlp.act:output", mode="topk", k=keep_count(width, s),
                                      skips=t.act_skips(layer), width=width, target=s))
            else:
                path = t.path(layer, "mlp.down")
                s = t.sparsity(path)
                if s is None:
                    continue
                out.append(Assignment(path, "linear", "mlp.down:input", mode="topk", k=keep_count(width, s),
                                      skips=(path,), target=s))
        return out
