"""Switching neurons and experts off or on at inference (MoTE), and what to switch."""
from actsparse.intervention.apply import active_intervention, intervene, intervene_, unintervene_
from actsparse.intervention.switches import Intervention, Switch

__all__ = ["Intervention", "Switch", "intervene", "intervene_", "unintervene_", "active_intervention",
           "from_contrast"]


def from_contrast(result, n: int, *, mode: str = "off", max_q: float | None = None, scale: float = 1.0) -> Intervention:
    """An intervention switching the top ``n`` units of a contrast (most active on A) off, or on
    (neurons: to ``scale`` x their mean on A where they fire; experts: always selected)."""
    row = {layer: i for i, layer in enumerate(result.layers)}
    switches = []
    for layer, index in result.top(n, max_q=max_q):
        value = None
        if mode == "on" and result.units == "neurons":
            value = scale * float(result.arrays["a_fired_mean"][row[layer], index])
        switches.append(Switch(layer, index, mode, value))
    return Intervention(result.units, switches, site=result.site,
                        meta={"from": "contrast", "top": n, "mode": mode, "statistic": result.statistic_kind})
