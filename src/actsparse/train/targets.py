"""Which modules the training-side swaps touch (the MLP activations, the norms feeding
attention and the MLP), and the record of one change. Shared by ``relufy_`` and ``fatrelu_``.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import nn

from actsparse.errors import ConfigError

OWNER = "relufy"  # the module-swap ledger's name for these changes (undo: swap.unwind(model, OWNER))


class Change(NamedTuple):
    """One module changed in place: its path, what it was, what it is now."""

    path: str
    before: str
    after: str


def activation_paths(model: nn.Module) -> list[str]:
    """Module paths of the MLP activations (site-map role ``mlp.act``, or the generic
    activation modules of an unmapped model)."""
    from actsparse.models.sitemaps import generic_activation_modules, site_map

    smap = site_map(model, warn=False)
    if smap.family == "generic" or "mlp.act" not in smap.roles:
        return [p for p, _ in generic_activation_modules(model)]
    return [smap.module_path(i, "mlp.act") for i in range(smap.num_layers)]


def norm_paths(model: nn.Module) -> list[str]:
    """Module paths of the norms feeding attention and the MLP (the site map's ``norm.attn``
    and ``norm.mlp`` roles)."""
    from actsparse.models.sitemaps import site_map

    smap = site_map(model, warn=False)
    if smap.family == "generic" or not {"norm.attn", "norm.mlp"} <= set(smap.norms):
        raise ConfigError(
            f"relufy_(after_norms=True) needs a pre-norm block (norms in front of attention and the MLP); this model's "
            f"site map ({smap.family!r}) has none (post-norm like BERT, or unmapped). Use after_norms=False."
        )
    return [smap.module_path(i, r) for i in range(smap.num_layers) for r in ("norm.attn", "norm.mlp")]
