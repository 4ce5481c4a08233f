"""Which units to switch: the top of a contrast, or the same number drawn at random (the control)."""
from __future__ import annotations

import numpy as np

from actsparse.errors import ConfigError
from actsparse.intervention.switches import Intervention, Switch


def _switches(result, units: list[tuple[int, int]], mode: str, scale: float) -> list[Switch]:
    row = {layer: i for i, layer in enumerate(result.layers)}
    out = []
    for layer, index in units:
        value = None
        if mode == "on" and result.units == "neurons":
            value = scale * float(result.arrays["a_fired_mean"][row[layer], index])
        out.append(Switch(layer, index, mode, value))
    return out


def from_contrast(result, n: int, *, mode: str = "off", max_q: float | None = None,
                  scale: float = 1.0) -> Intervention:
    """Switch the top ``n`` units of a contrast (most active on A) off, or on (neurons: to
    ``scale`` x their mean on A where they fire; experts: always selected)."""
    return Intervention(result.units, _switches(result, result.top(n, max_q=max_q), mode, scale), site=result.site,
                        meta={"from": "contrast", "top": n, "mode": mode, "statistic": result.statistic_kind})


def random_units(result, n: int, *, seed: int, mode: str = "off", scale: float = 1.0,
                 layer_matched: bool = False) -> Intervention:
    """``n`` units drawn uniformly without replacement over every unit of the contrast's layers
    (``layer_matched``: as many per layer as the top ``n`` has, so depth is not what differs).
    Forced on, each takes its own value from the contrast (as the top units do)."""
    rng = np.random.default_rng(seed)
    width, layers = result.width, result.layers
    if n > width * len(layers):
        raise ConfigError(f"cannot draw {n} of {width * len(layers)} units")
    if layer_matched:
        counts: dict[int, int] = {}
        for layer, _ in result.top(n):
            counts[layer] = counts.get(layer, 0) + 1
        units = [(layer, int(i)) for layer, c in sorted(counts.items()) for i in rng.choice(width, c, replace=False)]
    else:
        flat = rng.choice(width * len(layers), n, replace=False)
        units = [(layers[int(i) // width], int(i) % width) for i in np.sort(flat)]
    return Intervention(result.units, _switches(result, units, mode, scale), site=result.site,
                        meta={"from": "random", "n": n, "seed": seed, "mode": mode, "layer_matched": layer_matched})
