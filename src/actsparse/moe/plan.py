"""The MoE artefact: per layer the neuron permutation and the router, saved as JSON + safetensors.

    plan = moefy(model, tok, "wiki", experts=16, top_k=8)
    plan.save("moe/")              # moe.json + moe.safetensors (no pickle), written atomically
    plan = MoEPlan.load("moe/")
    apply_moe_(model, plan)        # refuses a plan made for other weights or shapes
    remove_moe_(model)             # the original MLP modules, exactly
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from actsparse.errors import ConfigError, DataError, StateError
from actsparse.models import swap

FORMAT = "actsparse-moe"
VERSION = 1
OWNER = "moe"
JSON_NAME, TENSORS_NAME = "moe.json", "moe.safetensors"


@dataclass
class MoEPlan:
    """``layers``: {MLP module path: {"perm": (n,) int64, "router_weight": (E, d), "router_bias": (E,)}}."""

    experts: int
    top_k: int
    identity: dict
    layers: dict[str, dict[str, torch.Tensor]]
    meta: dict = field(default_factory=dict)

    @property
    def neuron_fraction(self) -> float:
        return self.top_k / self.experts

    def with_top_k(self, top_k: int, routers: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> "MoEPlan":
        """The same experts with another top-k (and, if given, routers trained for it)."""
        layers = {p: dict(v) for p, v in self.layers.items()}
        for p, (w, b) in (routers or {}).items():
            layers[p].update(router_weight=w, router_bias=b)
        return MoEPlan(self.experts, top_k, self.identity, layers, dict(self.meta))

    # ------------------------------------------------------------ save / load
    def save(self, directory) -> Path:
        from actsparse.io import write_json, write_safetensors

        d = Path(directory)
        tensors = {f"{p}/{k}": v.contiguous().cpu() for p, layer in self.layers.items() for k, v in layer.items()}
        write_safetensors(d / TENSORS_NAME, tensors, metadata={"format": FORMAT})
        write_json(d / JSON_NAME, {"format": FORMAT, "version": VERSION, "experts": self.experts,
                                   "top_k": self.top_k, "identity": self.identity, "layers": list(self.layers),
                                   "meta": self.meta})
        return d

    @classmethod
    def load(cls, directory) -> "MoEPlan":
        from safetensors.torch import load_file

        from actsparse.io import read_json

        d = Path(directory)
        for name in (JSON_NAME, TENSORS_NAME):
            if not (d / name).is_file():
                raise DataError(f"{d} is not an MoE plan directory: {name} is missing (write one with "
                                f"`actsparse moefy --out {d}` or MoEPlan.save)")
        doc = read_json(d / JSON_NAME)
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise DataError(f"{d / JSON_NAME} is not a version-{VERSION} {FORMAT} file "
                            f"(format {doc.get('format')!r}, version {doc.get('version')!r})")
        tensors = load_file(str(d / TENSORS_NAME))
        layers = {}
        for p in doc["layers"]:
            try:
                layers[p] = {k: tensors[f"{p}/{k}"] for k in ("perm", "router_weight", "router_bias")}
            except KeyError as err:
                raise DataError(f"{d / TENSORS_NAME} lacks tensor {err.args[0]} named by {JSON_NAME}") from None
        return cls(int(doc["experts"]), int(doc["top_k"]), doc["identity"], layers, doc.get("meta", {}))


# ---------------------------------------------------------------- applying
def mlp_paths(model: nn.Module) -> list[str]:
    """The gated MLP module of every layer (the parent of the mlp.gate / up / down / act roles)."""
    from actsparse.errors import UnsupportedError
    from actsparse.models.sitemaps import site_map

    smap = site_map(model, warn=False)
    need = ("mlp.gate", "mlp.up", "mlp.down", "mlp.act")
    if smap.family == "generic" or not smap.gated or any(r not in smap.roles for r in need):
        raise UnsupportedError(f"{type(model).__name__} ({smap.family} family) has no separate gate / up / down "
                               f"MLP projections: the expert MLP supports the LLaMA and Gemma families")
    out = []
    for layer in range(smap.num_layers):
        parents = {smap.module_path(layer, r).rpartition(".")[0] for r in need}
        if len(parents) != 1:
            raise UnsupportedError(f"layer {layer}'s MLP projections do not share one parent module: {sorted(parents)}")
        out.append(parents.pop())
    return out


def is_moefied(model: nn.Module) -> bool:
    return OWNER in swap.ledger(model).owners()


def check_plan(model: nn.Module, plan: MoEPlan, *, check_weights: bool = True) -> None:
    """Refuse a plan made for another model: architecture, shapes and (unless
    ``check_weights=False``) the weights' fingerprint, then every layer's tensor shapes."""
    from actsparse.models.loading import weights_identity

    ident = weights_identity(model)
    keys = ("class", "model_type", "shape_hash") + (("weights_fingerprint",) if check_weights else ())
    diff = [k for k in keys if plan.identity.get(k) != ident.get(k)]
    if diff:
        raise ConfigError(f"this MoE plan was made for another model: {', '.join(diff)} differ "
                          f"(plan: {[plan.identity.get(k) for k in diff]}, model: {[ident.get(k) for k in diff]}); "
                          f"build a plan for this model with `actsparse moefy`")
    paths = mlp_paths(model)
    if sorted(plan.layers) != sorted(paths):
        raise ConfigError(f"the plan's MLP paths do not match the model's ({len(plan.layers)} vs {len(paths)} layers)")
    for p in paths:
        mlp = model.get_submodule(p)
        width, hidden = mlp.gate_proj.weight.shape
        t = plan.layers[p]
        if tuple(t["perm"].shape) != (width,) or tuple(t["router_weight"].shape) != (plan.experts, hidden) \
                or tuple(t["router_bias"].shape) != (plan.experts,):
            raise ConfigError(f"{p}: plan tensors of shapes {[tuple(v.shape) for v in t.values()]} do not fit an MLP "
                              f"of {width} neurons on {hidden} inputs with {plan.experts} experts")


def apply_moe_(model: nn.Module, plan: MoEPlan, *, check_weights: bool = True) -> None:
    """Replace every layer's MLP by an :class:`~actsparse.moe.modules.ExpertMLP` (all or nothing)."""
    from actsparse.moe.modules import ExpertMLP

    if is_moefied(model):
        raise StateError("the model already has expert MLPs; call remove_moe_(model) first")
    if swap.ledger(model).entries:
        raise StateError(f"the model carries other changes ({', '.join(swap.ledger(model).owners())}); apply the MoE "
                         f"plan to the plain dense model")
    check_plan(model, plan, check_weights=check_weights)
    built = {p: ExpertMLP(model.get_submodule(p), t["perm"], t["router_weight"], t["router_bias"], plan.top_k)
             for p, t in plan.layers.items()}
    for p, m in built.items():
        swap.swap_module(model, p, m, owner=OWNER)


def remove_moe_(model: nn.Module) -> None:
    """Put back the original MLP modules. No-op on a model without expert MLPs."""
    swap.unwind(model, OWNER)
