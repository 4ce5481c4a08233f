"""The MoTE experiment: does switching off the top contrast units move the targeted text more
than switching off as many random units, while the other text stays put?

Measures, on held-out windows: the targeted one, the mean log-probability per token of text A
(``-NLL``; switching off A-specific units should lower it), and the off-target one, the
perplexity of text B (it should not move). Every intervention is compared with the dense model
on the same windows. ``targeted_ratio`` = the fall of A's log-prob under the top-N switch-off
over the mean |fall| under the random switch-offs of the same size (seeds): the issue's target is
>= 3, with B's perplexity within 2% of dense.
"""
from __future__ import annotations

import math
import time

import numpy as np
from torch import nn

from actsparse.eval.perplexity import perplexity
from actsparse.intervention import Intervention, from_contrast, intervene, random_units


def measure(model: nn.Module, windows_a, windows_b, *, batch_size: int = 4,
            intervention: Intervention | None = None, progress: bool = False) -> dict:
    """A's mean log-prob per token and B's perplexity (under ``intervention`` when given)."""
    def run():
        a = perplexity(model, windows_a, batch_size=batch_size, progress=progress, desc="text A")
        b = perplexity(model, windows_b, batch_size=batch_size, progress=progress, desc="text B")
        return {"a_logprob": -a.nll, "b_ppl": b.ppl, "a_tokens": a.tokens, "b_tokens": b.tokens}

    if intervention is None:
        return run()
    with intervene(model, intervention):
        return run()


def _against(dense: dict, m: dict) -> dict:
    return {**m, "a_drop": dense["a_logprob"] - m["a_logprob"], "b_ppl_ratio": m["b_ppl"] / dense["b_ppl"]}


def _spread(values) -> dict:
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


CONTROLS = {"uniform": False, "layer_matched": True}


def switch_experiment(model: nn.Module, result, windows_a, windows_b, *, tops=(10, 50, 200), mode: str = "off",
                      controls: dict | None = None, scale: float = 1.0, batch_size: int = 4,
                      dense: dict | None = None, progress: bool = True) -> dict:
    """For each N in ``tops``: the top-N units of ``result`` switched (``mode``), and N random
    units per seed of each control (``controls``: ``{"uniform": seeds, "layer_matched": seeds}``;
    uniform draws over all units, layer-matched ones as many per layer as the top N), each
    measured against the dense model (``dense``: a :func:`measure` result already taken on these
    windows)."""
    from tqdm.auto import tqdm

    controls = {"uniform": (0, 1, 2)} if controls is None else controls
    unknown = set(controls) - set(CONTROLS)
    if unknown:
        raise ValueError(f"unknown control(s) {sorted(unknown)}; use {', '.join(CONTROLS)}")
    start = time.perf_counter()
    dense = dense or measure(model, windows_a, windows_b, batch_size=batch_size)
    rows = []
    evals = len(tops) * (1 + sum(len(s) for s in controls.values()))
    bar = tqdm(total=evals, desc=f"switch {mode}", unit="eval", disable=not progress)
    for n in tops:
        top = _against(dense, measure(model, windows_a, windows_b, batch_size=batch_size,
                                      intervention=from_contrast(result, n, mode=mode, scale=scale)))
        bar.update(1)
        row = {"n": n, "top": top, "controls": {}}
        for name, seeds in controls.items():
            runs = []
            for seed in seeds:
                iv = random_units(result, n, seed=seed, mode=mode, scale=scale, layer_matched=CONTROLS[name])
                runs.append({"seed": seed, **_against(dense, measure(model, windows_a, windows_b,
                                                                     batch_size=batch_size, intervention=iv))})
                bar.update(1)
            mean_abs = float(np.mean([abs(r["a_drop"]) for r in runs]))
            row["controls"][name] = {
                "runs": runs, "a_drop": _spread([r["a_drop"] for r in runs]), "a_drop_mean_abs": mean_abs,
                "b_ppl_ratio": _spread([r["b_ppl_ratio"] for r in runs]),
                "targeted_ratio": top["a_drop"] / mean_abs if mean_abs > 0 else math.inf,
                "meets_targets": bool(mean_abs > 0 and top["a_drop"] >= 3 * mean_abs
                                      and abs(top["b_ppl_ratio"] - 1) <= 0.02)}
        rows.append(row)
    bar.close()
    return {"mode": mode, "dense": dense, "rows": rows, "controls": {k: list(v) for k, v in controls.items()},
            "scale": scale, "seconds": time.perf_counter() - start}
