"""Architecture site maps: which module inside a transformer block plays which role.

A site is a tensor a method reads or masks, named ``<module path>:<io>`` where io is
``input`` or ``output`` (e.g. ``model.layers.3.mlp.down_proj:input``). Roles name the
same tensor independently of the architecture (``mlp.down:input``), so methods can be
written once. One small declarative table per architecture family; no tracing and no
re-implemented models: the site map only points at the Hugging Face modules.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn
from actsparse.errors import SiteError

# role -> module path relative to one block
_LLAMA_ROLES = {
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
    "mlp.act": "mlp.act_fn",
}

# Norm layouts (block-relative paths; the first layout whose modules all exist wins; none: the
# family has no such norms, e.g. BERT's post-norm blocks). Roles: "norm.attn" feeds attention,
# "norm.mlp" feeds the MLP; sandwich blocks (Gemma 2/3) also norm each sublayer's output
# ("norm.attn_out", "norm.mlp_out"); "norm.q" / "norm.k" norm each query / key head (Qwen3,
# Gemma 3). ``norm_offset``: the norm's gain is ``offset + weight`` (Gemma: 1 + w).
# Model-level parts, relative to the module that holds the blocks: "final_norm", "rotary".
_PLAIN_NORMS = {"norm.attn": "input_layernorm", "norm.mlp": "post_attention_layernorm"}
_QK_NORMS = {"norm.q": "self_attn.q_norm", "norm.k": "self_attn.k_norm"}
_SANDWICH_NORMS = {"norm.attn": "input_layernorm", "norm.attn_out": "post_attention_layernorm",
                   "norm.mlp": "pre_feedforward_layernorm", "norm.mlp_out": "post_feedforward_layernorm"}

FAMILIES: dict[str, dict] = {
    "llama": {"model_types": ("llama", "mistral", "qwen2", "qwen3", "smollm", "smollm3"), "roles": _LLAMA_ROLES,
              "gated": True, "norm_layouts": ({**_PLAIN_NORMS, **_QK_NORMS}, _PLAIN_NORMS),
              "model": {"final_norm": "norm", "rotary": "rotary_emb"}},
    "gemma": {"model_types": ("gemma", "gemma2", "gemma3", "gemma3_text"), "roles": _LLAMA_ROLES, "gated": True,
              "norm_layouts": ({**_SANDWICH_NORMS, **_QK_NORMS}, _SANDWICH_NORMS, _PLAIN_NORMS), "norm_offset": 1.0,
              "model": {"final_norm": "norm", "rotary": "rotary_emb"}},
    "phi3": {"model_types": ("phi3",),
             "roles": {"attn.qkv": "self_attn.qkv_proj", "attn.o": "self_attn.o_proj", "mlp.gate_up": "mlp.gate_up_proj",
                       "mlp.down": "mlp.down_proj", "mlp.act": "mlp.activation_fn"},
             "gated": True, "norm_layouts": (_PLAIN_NORMS,), "model": {"final_norm": "norm", "rotary": "rotary_emb"}},
    "gpt2": {
        "model_types": ("gpt2",),
        "roles": {"attn.qkv": "attn.c_attn", "attn.o": "attn.c_proj", "mlp.up": "mlp.c_fc",
                  "mlp.down": "mlp.c_proj", "mlp.act": "mlp.act"},
        "gated": False, "norm_layouts": ({"norm.attn": "ln_1", "norm.mlp": "ln_2"},), "model": {"final_norm": "ln_f"},
    },
    "opt": {
        "model_types": ("opt",),
        "roles": {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
                  "attn.o": "self_attn.out_proj", "mlp.up": "fc1", "mlp.down": "fc2", "mlp.act": "activation_fn"},
        "gated": False, "norm_layouts": ({"norm.attn": "self_attn_layer_norm", "norm.mlp": "final_layer_norm"},),
        "model": {"final_norm": "final_layer_norm"},
    },
    "bert": {
        "model_types": ("bert",),
        "roles": {"attn.q": "attention.self.query", "attn.k": "attention.self.key",
                  "attn.v": "attention.self.value", "attn.o": "attention.output.dense",
                  "mlp.up": "intermediate.dense", "mlp.act": "intermediate.intermediate_act_fn",
                  "mlp.down": "output.dense"},
        "gated": False,
    },
}

# Linear roles in the order data flows through a block.
LINEAR_ROLES = ("attn.qkv", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate_up", "mlp.gate", "mlp.up", "mlp.down")

# Roles whose input is the same tensor: capture it once, under the first role's name.
# (In an MLP without a gate, mlp.up reads the MLP input itself: see SiteMap.input_source.)
SHARED_INPUT = {"attn.k": "attn.q", "attn.v": "attn.q", "mlp.up": "mlp.gate"}

# What a role with no explicit io means.
DEFAULT_IO = {"mlp.act": "output"}

ACTIVATION_CLASS_HINTS = ("relu", "gelu", "silu", "swish", "tanh", "sigmoid", "mish", "elu", "activation", "softplus")


@dataclass(frozen=True)
class Site:
    """One capture point: a module and whether its input or output is read."""

    module_path: str
    io: str  # "input" or "output"
    role: str | None = None  # e.g. "mlp.down:input"; None for generic sites
    layer: int | None = None

    @property
    def name(self) -> str:
        return f"{self.module_path}:{self.io}"

    @property
    def kind(self) -> str:
        """Role without the layer: what plots group by (falls back to the module class path)."""
        return self.role or self.name


@dataclass
class SiteMap:
    family: str  # a key of FAMILIES, or "generic"
    blocks_path: str | None
    num_layers: int
    roles: dict[str, str]
    gated: bool
    unmapped: list[str] = field(default_factory=list)
    norms: dict[str, str] = field(default_factory=dict)  # "norm.attn", "norm.mlp", ... -> block-relative path
    model_parts: dict[str, str] = field(default_factory=dict)  # "final_norm", "rotary" -> path
    norm_offset: float = 0.0  # a norm's gain is norm_offset + weight

    def module_path(self, layer: int, role: str) -> str:
        if role in self.norms:
            return f"{self.blocks_path}.{layer}.{self.norms[role]}"
        return f"{self.blocks_path}.{layer}.{self.roles[role]}"

    def part_path(self, part: str) -> str | None:
        """Path of a model-level part ("final_norm", "rotary"), None if the family has none."""
        return self.model_parts.get(part)

    def input_source(self, role: str) -> str:
        """The role under whose name the input of ``role`` is captured (k, v read q's input;
        up reads gate's input in a gated MLP)."""
        src = SHARED_INPUT.get(role, role)
        return src if src in self.roles else role

    def input_readers(self, role: str) -> tuple[str, ...]:
        """The mapped linear roles that read the same input as ``role`` (in LINEAR_ROLES order)."""
        src = self.input_source(role)
        return tuple(r for r in LINEAR_ROLES if r in self.roles and self.input_source(r) == src)

    def locate(self, path: str) -> tuple[int, str] | None:
        """``(layer, role)`` of a module path inside a block, None if it plays no mapped role."""
        prefix = f"{self.blocks_path}."
        if self.blocks_path is None or not path.startswith(prefix):
            return None
        layer_s, _, rel = path[len(prefix):].partition(".")
        if not layer_s.isdigit():
            return None
        for role, r in {**self.roles, **self.norms}.items():
            if r == rel:
                return int(layer_s), role
        return None

    def role_sites(self, role_spec: str, model: nn.Module | None = None) -> list[Site]:
        """Expand a role like ``mlp.down:input`` or ``attn.q:input`` into one Site per layer."""
        role, _, io = role_spec.partition(":")
        if self.family == "generic":
            raise SiteError(
                f"role {role_spec!r} needs an architecture site map, and this model has none "
                f"(generic fallback). Pass module paths instead, e.g. 'layers.0.fc:input', or 'act'."
            )
        if role not in self.roles:
            raise SiteError(
                f"role {role!r} does not exist for the {self.family} family; known roles: "
                f"{', '.join(sorted(self.roles))}"
            )
        io = io or DEFAULT_IO.get(role, "input")
        if io not in ("input", "output"):
            raise SiteError(f"site io must be 'input' or 'output', got {io!r} in {role_spec!r}")
        canonical = self.input_source(role) if io == "input" else role
        return [
            Site(self.module_path(i, canonical), io, role=f"{canonical}:{io}", layer=i)
            for i in range(self.num_layers)
        ]

    def linear_input_sites(self) -> list[Site]:
        """The input of every linear in every block, deduplicated where inputs are shared."""
        seen, out = set(), []
        for role in LINEAR_ROLES:
            if role not in self.roles:
                continue
            for site in self.role_sites(f"{role}:input"):
                if site.name not in seen:
                    seen.add(site.name)
                    out.append(site)
        return sorted(out, key=lambda s: (s.layer, LINEAR_ROLES.index(s.role.split(":")[0])))


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _find_blocks(model: nn.Module, roles: dict[str, str]) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList whose first element has every role's module."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            first = module[0]
            if all(_has_submodule(first, rel) for rel in roles.values()):
                return path, module
    return None


def _has_submodule(module: nn.Module, rel: str) -> bool:
    try:
        module.get_submodule(rel)
        return True
    except AttributeError:
        return False


def site_map(model: nn.Module, *, warn: bool = True) -> SiteMap:
    """The site map of ``model``: a known family matched on its config and module tree,
    or the generic fallback (activation modules and linear inputs) with a warning."""
    model_type = _model_type(model)
    candidates = [f for f, spec in FAMILIES.items() if model_type in spec["model_types"]]
    candidates += [f for f in FAMILIES if f not in candidates]
    for family in candidates:
        spec = FAMILIES[family]
        found = _find_blocks(model, spec["roles"])
        if found is not None:
            path, blocks = found
            norms = next((dict(layout) for layout in spec.get("norm_layouts", ())
                          if all(_has_submodule(blocks[0], rel) for rel in layout.values())), {})
            base = path.rpartition(".")[0]
            parts = {}
            for part, rel in spec.get("model", {}).items():
                full = f"{base}.{rel}" if base else rel
                if _has_submodule(model, full):
                    parts[part] = full
            return SiteMap(family, path, len(blocks), dict(spec["roles"]), spec["gated"], norms=norms,
                           model_parts=parts, norm_offset=spec.get("norm_offset", 0.0))
    generic = SiteMap("generic", None, 0, {}, False)
    acts = [p for p, _ in generic_activation_modules(model)]
    linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    generic.unmapped = [f"no site map for model type {model_type!r} ({type(model).__name__})"]
    if warn:
        warnings.warn(
            f"actsparse has no site map for {type(model).__name__} (model_type={model_type!r}); "
            f"using the generic fallback: {len(acts)} activation modules and {len(linears)} linear inputs. "
            f"Roles (mlp.act, mlp.down:input, attn.q:input, ...) are not available for this model; "
            f"pass module paths instead. Known families: {', '.join(FAMILIES)}.",
            stacklevel=2,
        )
    return generic


def generic_activation_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that look like elementwise activations (by class name), excluding containers."""
    out = []
    for path, module in model.named_modules():
        if not path or len(list(module.children())) > 0:
            continue
        name = type(module).__name__.lower()
        if any(h in name for h in ACTIVATION_CLASS_HINTS) and not isinstance(module, (nn.Linear, nn.Embedding)):
            out.append((path, module))
    return out


def generic_linears(model: nn.Module) -> list[str]:
    """Paths of the linears of an unmapped model that a method may sparsify: every ``nn.Linear``
    (or a sparse module wrapping one) but the output embedding (the LM head)."""
    head_fn = getattr(model, "get_output_embeddings", None)
    head = head_fn() if callable(head_fn) else None
    out = []
    for path, module in model.named_modules():
        inner = getattr(module, "linear", module)
        if isinstance(inner, nn.Linear) and head is not inner and head is not module:
            out.append(path)
    return out


def generic_sites(model: nn.Module) -> list[Site]:
    sites = [Site(p, "output", role=None) for p, _ in generic_activation_modules(model)]
    sites += [Site(p, "input", role=None) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    return sites
