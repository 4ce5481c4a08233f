"""The switchable units of a model, and the check that a saved artefact fits them.

Units are either the MLP neurons of every layer (the width of the down projection's input) or
the routed experts of every MoE router. A contrast or an intervention records the model's
shape (layers, widths or expert counts) and weights identity; loading it refuses another model.
"""
from __future__ import annotations

from torch import nn

from actsparse.errors import ConfigError, UnsupportedError
from actsparse.models.routers import routers, supported_routers
from actsparse.models.sitemaps import site_map


def _in_width(module: nn.Module) -> int:
    inner = getattr(module, "linear", module)  # a sparse or kernel wrapper holds the linear
    if isinstance(inner, nn.Linear):
        return inner.in_features
    weight = getattr(inner, "weight", None)
    if weight is not None and weight.ndim == 2:  # GPT-2's Conv1D stores (in, out)
        return int(weight.shape[0])
    raise UnsupportedError(f"cannot read the input width of {type(module).__name__}")


def unit_widths(model: nn.Module, units: str) -> dict[int, int]:
    """``{layer: number of units}``: MLP neurons (``units="neurons"``) or routed experts."""
    if units == "experts":
        found = routers(model)
        if not found:
            raise UnsupportedError(f"{type(model).__name__} has no expert routers actsparse knows ({supported_routers()})")
        return {r.layer: r.num_experts for r in found}
    smap = site_map(model, warn=False)
    if smap.family == "generic" or "mlp.down" not in smap.roles:
        raise UnsupportedError(f"{type(model).__name__} has no mapped MLP (family {smap.family}); neuron switches need "
                               "an entry in models/sitemaps.py FAMILIES")
    return {i: _in_width(model.get_submodule(smap.module_path(i, "mlp.down"))) for i in range(smap.num_layers)}


def model_shape(model: nn.Module, units: str, site: str | None = None) -> dict:
    """What an artefact about ``model``'s units records: identity, layer count and widths."""
    from actsparse.models.loading import weights_identity

    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    return {**weights_identity(model), "num_layers": layers, "units": units, "site": site,
            "widths": {str(k): v for k, v in unit_widths(model, units).items()}}


def check_model(model: nn.Module, expected: dict, where: str, *, check_weights: bool = True) -> None:
    """Refuse ``model`` if it is not the one ``expected`` (a :func:`model_shape`) describes:
    other layer count, widths or expert counts, architecture, or (with ``check_weights``) other
    weights of the same shapes, where unit indices would name other neurons."""
    if not expected:
        raise ConfigError(f"{where} records no model; it cannot be checked against this one")
    from actsparse.models.loading import weights_identity

    def differing(actual, keys):
        return [f"{k}: saved {expected.get(k)!r}, model {actual.get(k)!r}"
                for k in keys if k in expected and expected.get(k) != actual.get(k)]

    actual = weights_identity(model)
    diffs = differing(actual, ("class", "model_type"))  # another architecture may have no such units at all
    if not diffs:
        actual = model_shape(model, expected.get("units", "neurons"), expected.get("site"))
        diffs = differing(actual, ("num_layers", "widths", "shape_hash"))
    if diffs:
        raise ConfigError(f"{where} was made for another model ({'; '.join(diffs)})")
    fe, fa = expected.get("weights_fingerprint"), actual.get("weights_fingerprint")
    if check_weights and fe and fa and fe != fa:
        raise ConfigError(f"{where} was made on other weights of the same architecture (weights fingerprint {fe} vs "
                          f"this model's {fa}): its neuron / expert indices would name other units. Make it on this "
                          "model, or load it anyway with check_weights=False (CLI: --ignore-weights)")
