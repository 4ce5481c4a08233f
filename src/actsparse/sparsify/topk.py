"""Top-K: keep the k largest ``|v|`` per token (constant per-token sparsity).

``k = width - round(s * width)``. Sites: the MLP activation output (``mlp.act``: zeros let
a kernel skip up rows and down columns, Lazy Neuron style) or the down_proj input
(``mlp.down:input``).
"""
from __future__ import annotations

from dataclasses import dataclass

from actsparse.config import SparsityConfig, register_config
from actsparse.errors import ConfigError

SITES = ("mlp.act", "mlp.down:input")


@register_config
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
