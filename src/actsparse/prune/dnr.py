"""Dead-neuron tracking for ReLU networks, on top of ``actsparse.measure.capture``.

- dynamic dead neuron rate (DNR, AP paper): per ReLU layer, the mean over inputs of
  the fraction of the layer's outputs that are exactly 0 (conv: every channel at every
  spatial position counts as one output); ``dnr`` overall pools all ReLU outputs
  (total zeros / total outputs), ``dnr_layer_mean`` is the unweighted mean over layers.
- static dead neurons: neurons (conv: channels) whose output is never > 0 over the
  whole evaluated set. ``static_dead_frac`` = dead / all neurons of all ReLU layers.
"""
from __future__ import annotations

import torch
from torch import nn



def relu_sites(model: nn.Module) -> list[str]:
    """Module paths of every ``nn.ReLU`` in the model."""
    return [p for p, m in model.named_modules() if isinstance(m, nn.ReLU) and p]


@torch.no_grad()
def relu_dead_stats(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> dict:
    """DNR and static dead neurons of every ReLU layer over inputs ``x`` (eval mode, no grad).

    Returns ``{"dnr", "dnr_layer_mean", "static_dead", "static_dead_frac", "neurons",
    "layers": {path: {"dnr", "static_dead", "width"}}}``.
    """
    from actsparse.measure import metrics
    from actsparse.measure.capture import capture

    sites = relu_sites(model)
    if not sites:
        return {"dnr": float("nan"), "dnr_layer_mean": float("nan"), "static_dead": 0,
                "static_dead_frac": float("nan"), "neurons": 0, "layers": {}}
    was = model.training
    model.eval()
    try:
        with capture(model, sites=sites, temporal=False) as cap:
            for i in range(0, len(x), batch_size):
                model(x[i:i + batch_size])
        stats = cap.stats()
    finally:
        model.train(was)
    layers = {}
    zeros = outputs = dead = neurons = 0.0
    for name, st in stats.items():
        d = metrics.dynamic_dead_rate(st)
        sd = int(metrics.static_dead_neurons(st).sum())
        n_out = float(st.rows) * st.width
        zeros += d * n_out
        outputs += n_out
        dead += sd
        neurons += st.width
        layers[name.rsplit(":", 1)[0]] = {"dnr": d, "static_dead": sd, "width": st.width}
    return {
        "dnr": zeros / outputs if outputs else float("nan"),
        "dnr_layer_mean": sum(v["dnr"] for v in layers.values()) / len(layers),
        "static_dead": int(dead),
        "static_dead_frac": dead / neurons if neurons else float("nan"),
        "neurons": int(neurons),
        "layers": layers,
    }
