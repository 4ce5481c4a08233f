"""The top-k expert MLP that replaces a gated (LLaMA-family) MLP, and its masked-dense reference.

The MLP's neurons are permuted so that expert e owns the contiguous block of neurons
``[e * m, (e + 1) * m)`` (rows of gate / up, columns of down). A linear router on the MLP's
input scores the experts; each token computes only its top-k experts' neurons. The
specification is :meth:`ExpertMLP.masked_dense`: the whole (permuted) MLP with every neuron
outside the token's chosen experts zeroed before the down projection.
"""
from __future__ import annotations

import torch
from torch import nn

from actsparse.errors import ConfigError
from actsparse.moe.clustering import check_experts


def permuted_mlp_weights(mlp: nn.Module, perm: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Copies of a gated MLP's weights with neuron ``perm[j]`` moved to position j:
    gate / up rows (and biases) and down columns. The MLP's function is unchanged."""
    perm = perm.to(torch.int64).to(mlp.gate_proj.weight.device)
    pick = lambda t: None if t is None else t.detach()[perm].clone()  # noqa: E731
    return {"gate": pick(mlp.gate_proj.weight), "gate_bias": pick(mlp.gate_proj.bias),
            "up": pick(mlp.up_proj.weight), "up_bias": pick(mlp.up_proj.bias),
            "down": mlp.down_proj.weight.detach()[:, perm].contiguous(),
            "down_bias": None if mlp.down_proj.bias is None else mlp.down_proj.bias.detach().clone()}


def permute_mlp_(mlp: nn.Module, perm: torch.Tensor) -> None:
    """Permute a gated MLP's neurons in place (function preserving)."""
    w = permuted_mlp_weights(mlp, perm)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(w["gate"])
        mlp.up_proj.weight.copy_(w["up"])
        mlp.down_proj.weight.copy_(w["down"])
        for lin, key in ((mlp.gate_proj, "gate_bias"), (mlp.up_proj, "up_bias")):
            if lin.bias is not None:
                lin.bias.copy_(w[key])


class ExpertMLP(nn.Module):
    """A gated MLP split into ``experts`` contiguous experts, ``top_k`` of them computed per token.

    Built from the original MLP (kept as ``.original``, unchanged, for the undo), the
    permutation (new position -> old neuron) and the router's (experts, hidden) weight and bias.
    ``routing = "oracle"`` (analysis only: it computes every neuron to choose) picks each token's
    top-k experts by their true activation mass instead of the router's scores."""

    ROUTINGS = ("router", "oracle")

    def __init__(self, mlp: nn.Module, perm: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor,
                 top_k: int):
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(mlp, name):
                raise ConfigError(f"{type(mlp).__name__} is not a gated MLP (no {name}): the expert MLP replaces "
                                  f"LLaMA-family MLPs (gate_proj, up_proj, down_proj, act_fn)")
        width, hidden = mlp.gate_proj.weight.shape
        experts = router_weight.shape[0]
        self.expert_size = check_experts(width, experts, top_k)
        if tuple(router_weight.shape) != (experts, hidden) or tuple(router_bias.shape) != (experts,):
            raise ConfigError(f"router of shape {tuple(router_weight.shape)} / {tuple(router_bias.shape)} does not fit "
                              f"a {hidden}-wide MLP input with {experts} experts")
        if not torch.equal(torch.sort(perm.to(torch.int64).cpu()).values, torch.arange(width)):
            raise ConfigError(f"the neuron permutation is not a permutation of the {width} neurons")
        self.experts, self.top_k, self.width = experts, top_k, width
        self.original = mlp
        self.act_fn = mlp.act_fn
        dtype, device = mlp.gate_proj.weight.dtype, mlp.gate_proj.weight.device
        for k, v in permuted_mlp_weights(mlp, perm).items():
            self.register_buffer(k, v, persistent=False)
        self.register_buffer("perm", perm.to(torch.int64).cpu().clone(), persistent=False)
        self.router = nn.Linear(hidden, experts)
        with torch.no_grad():
            self.router.weight.copy_(router_weight)
            self.router.bias.copy_(router_bias)
        self.router.to(device=device, dtype=dtype)
        self.router.requires_grad_(False)
        self.routing = "router"

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, top_k) indices of the chosen experts for (rows, hidden) inputs."""
        if self.routing not in self.ROUTINGS:
            raise ConfigError(f"routing must be one of {', '.join(self.ROUTINGS)}, got {self.routing!r}")
        if self.routing == "oracle":
            h = self.act_fn(self._lin(x, self.gate, self.gate_bias)) * self._lin(x, self.up, self.up_bias)
            scores = h.abs().reshape(x.shape[0], self.experts, self.expert_size).sum(-1)
        else:
            scores = self.router(x)
        return scores.topk(self.top_k, dim=-1).indices

    def _lin(self, x, w, b):
        return nn.functional.linear(x, w, b)

    def masked_dense(self, x: torch.Tensor, chosen: torch.Tensor | None = None) -> torch.Tensor:
        """The reference: the full permuted MLP, neurons outside the chosen experts zeroed
        before the down projection."""
        flat = x.reshape(-1, x.shape[-1])
        chosen = self.route(flat) if chosen is None else chosen
        keep = torch.zeros(flat.shape[0], self.experts, dtype=flat.dtype, device=flat.device)
        keep.scatter_(1, chosen, 1.0)
        h = self.act_fn(self._lin(flat, self.gate, self.gate_bias)) * self._lin(flat, self.up, self.up_bias)
        h = h * keep.repeat_interleave(self.expert_size, dim=1)
        return self._lin(h, self.down, self.down_bias).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        chosen = self.route(flat)
        out = torch.zeros_like(flat)
        m = self.expert_size
        for e in torch.unique(chosen).tolist():
            rows = (chosen == e).any(1).nonzero().squeeze(1)
            xe = flat.index_select(0, rows)
            s = slice(e * m, (e + 1) * m)
            gb = None if self.gate_bias is None else self.gate_bias[s]
            ub = None if self.up_bias is None else self.up_bias[s]
            h = self.act_fn(self._lin(xe, self.gate[s], gb)) * self._lin(xe, self.up[s], ub)
            out.index_add_(0, rows, self._lin(h, self.down[:, s], None))
        if self.down_bias is not None:
            out = out + self.down_bias
        return out.reshape(x.shape)

    @property
    def weight_fraction(self) -> float:
        """The fraction of the MLP's weights a token reads: its experts' rows and columns, plus
        the router."""
        hidden = self.gate.shape[1]
        return (self.top_k * self.expert_size * 3 * hidden + self.experts * hidden) / (3 * self.width * hidden)

    def extra_repr(self) -> str:
        return f"experts={self.experts}, top_k={self.top_k}, expert_size={self.expert_size}"
