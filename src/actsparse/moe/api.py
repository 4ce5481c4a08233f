"""``moefy``: turn a dense model's MLPs into top-k expert MLPs from its activations (Read-ME style).

1. one pass over calibration windows: per layer, the co-activation counts of the down
   projection's input (:mod:`actsparse.measure.coactivation`) and an evenly spread sample of
   token rows of the MLP input ``x`` and of ``h = act(gate(x)) * up(x)``;
2. per layer, balanced k-means of the neurons' co-activation profiles into E experts and the
   permutation that makes each expert contiguous (:mod:`actsparse.moe.clustering`);
3. per layer, a linear router fitted on the sampled rows to predict each expert's activation
   mass for the token (:mod:`actsparse.moe.router`); the top-k predicted experts are computed;
4. the router's recall of the oracle top-k experts on held-out (validation) rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from actsparse.errors import ConfigError, DataError
from actsparse.moe.clustering import balanced_kmeans, check_experts, expert_permutation
from actsparse.moe.plan import MoEPlan, mlp_paths
from actsparse.moe.router import expert_mass, recall, train_router

DEFAULT_RATE = 0.25  # co-activation: the top quarter of |h| per token counts as active


@dataclass
class LayerSamples:
    """Per MLP path: token rows of its input ``x`` (rows, hidden) and of ``h`` (rows, width);
    ``coactivation`` per path when collected."""

    x: dict[str, torch.Tensor]
    h: dict[str, torch.Tensor]
    coactivation: dict
    tokens: int
    protocol: dict


@torch.no_grad()
def collect(model: nn.Module, windows, *, rows: int, rate: float | None = DEFAULT_RATE, batch_size: int = 4,
            progress: bool = False) -> LayerSamples:
    """One pass over ``windows``: row samples of every MLP's input and of its down projection's
    input (the same tokens at both), and (``rate`` not None) the co-activation counts."""
    from actsparse.measure.capture import Probe, capture, run
    from actsparse.measure.coactivation import coactivation_hooks
    from actsparse.models.sitemaps import Site

    paths = mlp_paths(model)
    probes = []
    for p in paths:
        probes.append(Probe(f"{p}|x", Site(f"{p}.gate_proj", "input"), "rows", rows=rows))
        probes.append(Probe(f"{p}|h", Site(f"{p}.down_proj", "input"), "rows", rows=rows))
    hooks, coact = coactivation_hooks(
        model, {p: Site(f"{p}.down_proj", "input") for p in paths} if rate is not None else {}, rate)
    with capture(model, probes=probes, total_tokens=windows.tokens) as cap, hooks:
        tokens = run(model, windows.batches(batch_size), progress=progress, desc="moefy: activations",
                     total=windows.num_batches(batch_size))
    got = cap.stats()
    for p in paths:
        bad = sum(int((~torch.isfinite(got[f"{p}|{k}"])).sum()) for k in "xh")
        if bad:
            raise DataError(f"{p}: {bad} NaN/inf activations in the sampled rows; check the weights and the dtype")
    return LayerSamples({p: got[f"{p}|x"] for p in paths}, {p: got[f"{p}|h"] for p in paths}, coact, tokens,
                        windows.protocol)


def cluster(samples: LayerSamples, experts: int, *, seed: int = 0, progress: bool = False) -> dict[str, torch.Tensor]:
    """Per MLP path, the permutation (new position -> old neuron) of its balanced experts."""
    from tqdm.auto import tqdm

    if not samples.coactivation:
        raise DataError("these samples hold no co-activation counts: collect them with a rate")
    out = {}
    for p, acc in tqdm(samples.coactivation.items(), desc=f"moefy: clustering (E={experts})", disable=not progress):
        check_experts(acc.width, experts)
        out[p] = expert_permutation(balanced_kmeans(acc.correlation(), experts, seed=seed), experts)
    return out


def train_routers(samples: LayerSamples, perms: dict[str, torch.Tensor], experts: int, *, ridge: float = 0.1,
                  progress: bool = False) -> dict[str, tuple]:
    """Per MLP path, the router (weight, bias) for the experts of ``perms`` (independent of top-k)."""
    from tqdm.auto import tqdm

    out = {}
    for p, perm in tqdm(perms.items(), desc=f"moefy: routers (E={experts})", disable=not progress):
        out[p] = train_router(samples.x[p], expert_mass(samples.h[p], perm, experts), ridge=ridge)
    return out


def router_recall(plan: MoEPlan, samples: LayerSamples) -> dict:
    """The routers' recall of the oracle top-k experts on ``samples`` (e.g. validation rows):
    per layer and the mean over layers (see :func:`actsparse.moe.router.recall`)."""
    per_layer = {}
    for p, t in plan.layers.items():
        mass = expert_mass(samples.h[p], t["perm"], plan.experts)
        chosen = (samples.x[p] @ t["router_weight"].T + t["router_bias"]).topk(plan.top_k, dim=1).indices
        per_layer[p] = recall(chosen, mass, plan.top_k)
    keys = next(iter(per_layer.values())).keys()
    mean = {k: sum(v[k] for v in per_layer.values()) / len(per_layer) for k in keys}
    return {**mean, "tokens": samples.x[next(iter(samples.x))].shape[0], "per_layer": per_layer}


def build(model: nn.Module, samples: LayerSamples, experts: int, top_k: int, *, perms=None, routers=None,
          seed: int = 0, ridge: float = 0.1, progress: bool = False) -> MoEPlan:
    """The plan for ``experts`` / ``top_k`` from collected samples (``perms``, ``routers``: reuse a
    clustering and its routers, e.g. for another top-k)."""
    from actsparse.models.loading import weights_identity

    width = next(iter(samples.h.values())).shape[1]
    check_experts(width, experts, top_k)
    perms = perms or cluster(samples, experts, seed=seed, progress=progress)
    routers = routers or train_routers(samples, perms, experts, ridge=ridge, progress=progress)
    layers = {p: {"perm": perms[p], "router_weight": routers[p][0], "router_bias": routers[p][1]} for p in perms}
    rate = next(iter(samples.coactivation.values())).rate if samples.coactivation else None
    meta = {"coactivation_rate": rate, "seed": seed, "router_ridge": ridge,
            "calibration": {**samples.protocol, "router_rows": next(iter(samples.x.values())).shape[0]}}
    return MoEPlan(experts, top_k, weights_identity(model), layers, meta)


def moefy(model: nn.Module, tokenizer, data="wiki", *, experts: int = 16, top_k: int = 8, tokens: int = 8192,
          router_rows: int = 4096, validation_tokens: int = 2048, window: int = 512, rate: float = DEFAULT_RATE,
          seed: int = 0, ridge: float = 0.1, batch_size: int = 4, progress: bool = False,
          text_options: dict | None = None) -> MoEPlan:
    """Build an :class:`MoEPlan` for ``model`` from ``data``'s calibration split (``tokens``
    tokens; ``router_rows`` of them train the routers) and measure the routers' recall on
    ``validation_tokens`` of its validation split (0: skip), stored in ``plan.meta["validation"]``.
    ``text_options``: how ``data``'s files are read (``text_field``, ``encoding``, ``doc_separator``)."""
    from actsparse.data.text import text, token_windows
    from actsparse.models.loading import check_window, require_causal_lm

    require_causal_lm(model, what="moefy")
    check_window(model, window)
    if router_rows < experts:
        raise ConfigError(f"router_rows must be at least the number of experts ({experts}), got {router_rows}")
    width = model.get_submodule(mlp_paths(model)[0]).gate_proj.weight.shape[0]
    check_experts(width, experts, top_k)
    cal = token_windows(tokenizer, text(data, "calibration", **(text_options or {})), window=window, max_tokens=tokens)
    samples = collect(model, cal, rows=router_rows, rate=rate, batch_size=batch_size, progress=progress)
    plan = build(model, samples, experts, top_k, seed=seed, ridge=ridge, progress=progress)
    plan.meta["data"] = data if isinstance(data, str) else "documents"
    if validation_tokens:
        val = token_windows(tokenizer, text(data, "validation", **(text_options or {})), window=window, max_tokens=validation_tokens)
        held = collect(model, val, rows=validation_tokens, rate=None, batch_size=batch_size, progress=progress)
        r = router_recall(plan, held)
        plan.meta["validation"] = {k: v for k, v in r.items() if k != "per_layer"}
        plan.meta["validation"]["per_layer_recall"] = [v["recall"] for v in r["per_layer"].values()]
    return plan
