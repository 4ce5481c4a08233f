"""MoE routers: where a model's expert routers are, and how each turns logits into its top-k.

The routed-expert counterpart of the site maps: one table entry per router class of the
transformers MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE). Every listed router returns
``(router_logits, routing_weights, selected_experts)`` from ``forward(hidden)``; the entry's
``route`` function repeats the router's own logits -> (weights, indices) step, so an
intervention can change the logits (an expert at -inf is never selected) and route again
exactly as the model would. ``tests/intervene`` checks that ``route`` on unchanged logits gives
the router's own output, bit for bit, for every entry.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def _top_k(probs: torch.Tensor, k: int, forced: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's top-k; ``forced`` (a bool mask over experts) are chosen first, each with
    its own probability, and the rest of the k slots go to the most probable others."""
    if forced is None:
        return torch.topk(probs, k, dim=-1)
    _, idx = torch.topk(probs + 2.0 * forced.to(probs.dtype), k, dim=-1)  # probabilities are <= 1
    return probs.gather(-1, idx), idx


def _route_mixtral(router: nn.Module, logits: torch.Tensor, forced: torch.Tensor | None = None):
    """Mixtral: softmax in fp32, top-k, the k weights renormalised to sum 1."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = _top_k(probs, router.top_k, forced)
    return top / top.sum(dim=-1, keepdim=True), idx


def _route_qwen(router: nn.Module, logits: torch.Tensor, forced: torch.Tensor | None = None):
    """Qwen2-MoE, Qwen3-MoE, OLMoE: softmax in fp32, top-k, renormalised if ``norm_topk_prob``,
    back to the logits' dtype."""
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    top, idx = _top_k(probs, router.top_k, forced)
    if router.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(logits.dtype), idx


@dataclass(frozen=True)
class RouterKind:
    family: str
    route: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (router, logits, forced=None) -> (weights, idx)


ROUTERS: dict[str, RouterKind] = {
    "MixtralTopKRouter": RouterKind("mixtral", _route_mixtral),
    "Qwen2MoeTopKRouter": RouterKind("qwen2_moe", _route_qwen),
    "Qwen3MoeTopKRouter": RouterKind("qwen3_moe", _route_qwen),
    "OlmoeTopKRouter": RouterKind("olmoe", _route_qwen),
}


@dataclass(frozen=True)
class Router:
    """One layer's expert router."""

    path: str
    layer: int
    num_experts: int
    top_k: int
    kind: RouterKind


def routers(model: nn.Module) -> list[Router]:
    """The model's expert routers in layer order (empty for a dense model). The layer is the
    index of the block that holds the router (``...layers.<i>.mlp.gate``)."""
    out = []
    for path, module in model.named_modules():
        kind = ROUTERS.get(type(module).__name__)
        if kind is None:
            continue
        layer = next((int(p) for p in reversed(path.split(".")) if p.isdigit()), None)
        if layer is None:
            continue
        out.append(Router(path, layer, int(module.num_experts), int(module.top_k), kind))
    return sorted(out, key=lambda r: r.layer)


def supported_routers() -> str:
    return ", ".join(sorted(ROUTERS))
