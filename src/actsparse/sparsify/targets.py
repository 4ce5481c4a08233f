"""What a method may touch in one model: the layer x role loop every handler walks.

A :class:`Target` wraps the model, its architecture site map and the method config, and
answers the questions handlers ask: which layers, which module plays a role, which linears
read the same input (q/k/v; gate/up), the sparsity of a path after the config's overrides,
and which weight rows a thresholded MLP activation lets a kernel skip.
"""
from __future__ import annotations

import difflib
import fnmatch
import re

from torch import nn

from actsparse.errors import ConfigError
from actsparse.models.sitemaps import FAMILIES, SiteMap, generic_linears, site_map
from actsparse.sparsify.modules import linear_features


def matches(pattern: str, path: str) -> bool:
    """``fnmatch`` glob, or a regular expression (searched) when prefixed ``re:``."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern)


def site_sparsity(config, path: str, default: float | None) -> float | None:
    """The sparsity for the module at ``path``: the last matching override, else ``default``.
    None means: leave dense."""
    s = default
    for pattern, value in getattr(config, "overrides", ()):
        if matches(pattern, path):
            s = value
    return s


class Target:
    def __init__(self, model: nn.Module, config, smap: SiteMap | None = None):
        self.model = model
        self.config = config
        self.smap = smap or site_map(model, warn=False)
        self.considered: dict[str, None] = {}  # paths whose sparsity a handler asked for, in order
        self.matched: set[str] = set()  # override patterns that matched one of them

    @property
    def generic(self) -> bool:
        """True for an unmapped model (the generic fallback: no roles, only its linears)."""
        return self.smap.family == "generic"

    def generic_linears(self) -> list[str]:
        """The linears a method may sparsify in an unmapped model (all but the LM head)."""
        return generic_linears(self.model)

    @property
    def layers(self) -> range:
        return range(self.smap.num_layers)

    def require(self, *roles: str, gated: bool = False) -> None:
        """Refuse a model whose site map lacks what the method needs, naming it."""
        name = type(self.config).__name__
        if self.generic:
            raise ConfigError(f"{name} needs an architecture site map (which module is the MLP activation, "
                              f"the down projection, ...); {type(self.model).__name__} has none (generic fallback). "
                              "TEAL (uniform) runs on an unmapped model's linears; the other methods need a "
                              f"FAMILIES entry in actsparse.models.sitemaps (known: {', '.join(FAMILIES)})")
        missing = [r for r in roles if r not in self.smap.roles]
        if missing:
            raise ConfigError(f"{name} needs the role(s) {', '.join(missing)}, which the {self.smap.family} "
                              f"site map does not have")
        if gated and not self.smap.gated:
            raise ConfigError(f"{name} needs a gated MLP (gate/up/down); this model's MLP is not gated")

    def has(self, role: str) -> bool:
        return role in self.smap.roles

    def path(self, layer: int, role: str) -> str:
        return self.smap.module_path(layer, role)

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    def in_features(self, layer: int, role: str) -> int:
        return linear_features(self.module(self.path(layer, role)))[0]

    def input_source(self, role: str) -> str | None:
        """The mapped role whose input is the input ``role`` names: itself; for ``mlp.gate`` in an
        MLP without a gate, ``mlp.up`` (the MLP input); for ``attn.q`` / ``mlp.gate`` in a block
        with one fused q/k/v or gate/up projection, ``attn.qkv`` / ``mlp.gate_up``; None if absent."""
        if role in self.smap.roles:
            return self.smap.input_source(role)
        if role == "mlp.gate" and not self.smap.gated and "mlp.up" in self.smap.roles:
            return "mlp.up"
        fused = {"attn.q": "attn.qkv", "mlp.gate": "mlp.gate_up"}.get(role)  # one fused projection (GPT-2, Phi-3)
        if fused in self.smap.roles:
            return fused
        return None

    def readers(self, role: str) -> tuple[str, ...]:
        """The linear roles reading the input of ``role`` (q/k/v, gate/up), source first."""
        src = self.input_source(role)
        return self.smap.input_readers(src) if src is not None else ()

    def sparsity(self, path: str, default: float | None = ...) -> float | None:
        """Sparsity of ``path`` after the overrides (default: the config's ``sparsity``)."""
        if default is ...:
            default = self.config.sparsity
        self.considered[path] = None
        self.matched.update(p for p, _ in getattr(self.config, "overrides", ()) if matches(p, path))
        return site_sparsity(self.config, path, default)

    def check_overrides(self) -> None:
        """Refuse override patterns that matched none of the sites the method considered
        (a typo would otherwise leave the intended sites at the default sparsity)."""
        unmatched = [p for p, _ in getattr(self.config, "overrides", ()) if p not in self.matched]
        if not unmatched:
            return
        name = type(self.config).__name__
        paths = list(self.considered)
        lines = []
        for pattern in unmatched:
            close = difflib.get_close_matches(pattern.removeprefix("re:"), paths, n=3, cutoff=0.3)
            hint = f"; closest: {', '.join(close)}" if close else ""
            lines.append(f"{pattern!r}{hint}")
        example = f" (e.g. {paths[0]})" if paths else ""
        raise ConfigError(f"override pattern(s) matched no module that {name} sparsifies in this model: "
                          f"{' | '.join(lines)}. Patterns are fnmatch globs (or re:REGEX) over module paths"
                          f"{example}; {len(paths)} paths were considered")

    def act_skips(self, layer: int) -> tuple[str, ...]:
        """Linears whose weight rows a zero at the MLP activation lets a kernel skip: up and
        down in a gated MLP (gate must be computed to know the zeros), down otherwise. A fused
        gate/up projection (Phi-3) is not listed: only half its rows could be skipped."""
        roles = ("mlp.up", "mlp.down") if self.smap.gated else ("mlp.down",)
        return tuple(self.path(layer, r) for r in roles if r in self.smap.roles)
