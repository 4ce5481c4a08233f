"""What an intervention switches: a list of (layer, neuron or expert, off / on), as strict JSON.

    iv = Intervention("neurons", [Switch(3, 17, "off"), Switch(5, 2, "on", value=1.5)])
    iv.save("iv.json", model)                 # records the model's layers, widths, weights identity
    iv = Intervention.load("iv.json", model)  # refuses another model

Neurons are the MLP neurons at ``site`` (``mlp.down:input``, default, or ``mlp.act``): "off"
sets the neuron to 0, "on" to ``value`` at every token. Experts are routed MoE experts: "off"
puts the expert's router logit at -inf before the top-k (it is never selected), "on" always
selects it (with its own routing probability).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from actsparse.errors import ConfigError

FORMAT = "actsparse.intervention/1"
MODES = ("off", "on")
UNITS = ("neurons", "experts")
SITES = ("mlp.down:input", "mlp.act")
_KEYS = {"format", "actsparse", "units", "site", "model", "switches", "meta"}
_SWITCH_KEYS = {"layer", "index", "mode", "value"}


@dataclass(frozen=True)
class Switch:
    layer: int
    index: int  # neuron or expert index within the layer
    mode: str  # "off" or "on"
    value: float | None = None  # neurons, mode "on": the value set

    def to_dict(self) -> dict:
        return {"layer": self.layer, "index": self.index, "mode": self.mode, "value": self.value}


@dataclass
class Intervention:
    units: str
    switches: list[Switch]
    site: str | None = "mlp.down:input"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.units not in UNITS:
            raise ConfigError(f"intervention units must be one of {', '.join(UNITS)}, got {self.units!r}")
        if self.units == "experts":
            self.site = None
        elif self.site not in SITES:
            raise ConfigError(f"neuron intervention site must be one of {', '.join(SITES)}, got {self.site!r}")
        self.switches = [s if isinstance(s, Switch) else Switch(**s) for s in self.switches]
        if not self.switches:
            raise ConfigError("an intervention needs at least one switch")
        seen = set()
        for s in self.switches:
            if not (isinstance(s.layer, int) and isinstance(s.index, int)) or s.layer < 0 or s.index < 0:
                raise ConfigError(f"switch {s}: layer and index must be integers >= 0")
            if s.mode not in MODES:
                raise ConfigError(f"switch {s}: mode must be 'off' or 'on'")
            if self.units == "neurons" and s.mode == "on" and (s.value is None or not math.isfinite(s.value)):
                raise ConfigError(f"switch {s}: forcing a neuron on needs a finite value")
            if (self.units == "experts" or s.mode == "off") and s.value is not None:
                raise ConfigError(f"switch {s}: only a neuron forced on takes a value")
            if (s.layer, s.index) in seen:
                raise ConfigError(f"switch {s}: layer {s.layer} unit {s.index} is switched twice")
            seen.add((s.layer, s.index))

    def by_layer(self) -> dict[int, list[Switch]]:
        out: dict[int, list[Switch]] = {}
        for s in self.switches:
            out.setdefault(s.layer, []).append(s)
        return dict(sorted(out.items()))

    def check(self, model: nn.Module) -> None:
        """Refuse switches that do not exist on ``model`` (a layer or a unit index out of range)."""
        from actsparse.models.units import unit_widths

        widths = unit_widths(model, self.units)
        for s in self.switches:
            if s.layer not in widths:
                raise ConfigError(f"switch {s}: {type(model).__name__} has no {self.units} in layer {s.layer} "
                                  f"(layers with {self.units}: {min(widths)}..{max(widths)})")
            if s.index >= widths[s.layer]:
                raise ConfigError(f"switch {s}: layer {s.layer} has {widths[s.layer]} {self.units}")

    def save(self, path: str | Path, model: nn.Module) -> Path:
        """Write the intervention as JSON, with ``model``'s shape and identity to check on load."""
        from actsparse.io import write_text
        from actsparse.models.units import model_shape
        from actsparse.version import __version__

        self.check(model)
        doc = {"format": FORMAT, "actsparse": __version__, "units": self.units, "site": self.site,
               "model": model_shape(model, self.units, self.site),
               "switches": [s.to_dict() for s in self.switches], "meta": self.meta}
        return write_text(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, *, check_weights: bool = True) -> "Intervention":
        """Read an intervention; with ``model``, refuse it if it was made for another model."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path} is not a readable intervention JSON ({err})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ConfigError(f"{path} has format {doc.get('format') if isinstance(doc, dict) else None!r}, "
                              f"expected {FORMAT!r}")
        unknown = set(doc) - _KEYS
        if unknown:
            raise ConfigError(f"{path} has unknown key(s): {', '.join(sorted(unknown))}")
        switches = doc.get("switches")
        if not isinstance(switches, list) or not all(isinstance(s, dict) and {"layer", "index", "mode"} <= set(s) <= _SWITCH_KEYS
                                                    for s in switches):
            raise ConfigError(f"{path}: 'switches' must be a list of objects with keys {sorted(_SWITCH_KEYS)}")
        iv = cls(doc.get("units"), [Switch(**s) for s in switches], site=doc.get("site"), meta=doc.get("meta") or {})
        if model is not None:
            from actsparse.models.units import check_model

            check_model(model, doc.get("model") or {}, f"intervention {path}", check_weights=check_weights)
            iv.check(model)
        return iv
