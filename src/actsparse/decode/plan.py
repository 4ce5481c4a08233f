"""The typed decode plan: what the compiled decode step does with every linear of every layer.

:meth:`DecodePlan.from_model` reads a (possibly sparsified) model through its architecture
site map, never through hard-coded module names, and decides per layer:

* for each linear (:class:`Role`), its :class:`Mode`: dense on the model's own weight
  (no copy), input-sparse (threshold or top-k) on a transposed copy, or computed together
  with the linear it shares an input test with (``FUSED``: k and v with q, up with gate).
  A fused projection of the model (Phi-3's ``qkv_proj``, ``gate_up_proj``) gives each role
  its rows of the one weight (views, no copy);
* the MLP activation site's test (CATS / CHESS / Top-K thresholds, a ReLU model's exact
  zeros, or none), after which only the kept rows of up and down are read;
* the weight format of every matrix (:class:`~actsparse.kernels.formats.WeightFormat`);
* the architecture's pieces (:class:`Architecture`): norm gains (``1 + w`` for Gemma), sandwich
  norms around each sublayer, per-head q/k norms, sliding-window layers, one RoPE table per
  layer type, partial rotary dimensions, attention and final-logit soft-capping, the
  embedding scale.

:meth:`DecodePlan.kernel_args` turns it into the grouped arguments of
:func:`actsparse.decode.step.decode_token`. Host and kernel share the enums' values.
Features the step does not implement are refused up front (:func:`check_model`), never
decoded wrongly.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from actsparse.decode import codes as K
from actsparse.decode.accelerate import ZeroSkipLinear
from actsparse.decode.codes import FUSED_GROUPS, ROLE_NAMES, SITE_ROLE, Mode, Role
from actsparse.errors import ConfigError, UnsupportedError
from actsparse.kernels.formats import WeightFormat, empty_weights, numpy_view, weight_format
from actsparse.kernels.quant_formats import FORMAT_CODES, FORMATS, ROWS, TRANSPOSED, QuantWeight, quantize_weight
from actsparse.kernels.reference import ACT_CODES
from actsparse.models.sitemaps import SiteMap, site_map
from actsparse.quant.modules import QuantLinear
from actsparse.sparsify.modules import MaskedLinear, ThresholdedActivation, activation_name, iter_sparse_modules

# model types whose decoder the compiled step implements
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3")
# RoPE variants whose tables depend only on the position (HF computes them once); "dynamic" and
# "longrope" rescale with the current sequence length, which a table over max_len cannot follow
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
# roles of a model's fused projections: the kernel role -> (fused site role, which part)
FUSED_SOURCES = {Role.Q: ("attn.qkv", 0), Role.K: ("attn.qkv", 1), Role.V: ("attn.qkv", 2),
                 Role.GATE: ("mlp.gate_up", 0), Role.UP: ("mlp.gate_up", 1)}


@dataclass
class InputTest:
    """The test of one input site: ``mode``, thresholds (fp32, one or one per channel with
    ``stride`` 1), ``k`` for top-k."""

    mode: Mode = Mode.DENSE
    threshold: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    stride: int = 0
    k: int = 0

    @classmethod
    def of(cls, m) -> "InputTest":
        """The test of a sparse module (MaskedLinear / ThresholdedActivation)."""
        if m.mode == "topk":
            return cls(Mode.TOPK, np.empty(0, np.float32), 0, int(m.k))
        if m.per_channel:
            return cls(Mode.THRESHOLD, m.threshold.detach().float().contiguous().numpy(), 1, 0)
        return cls(Mode.THRESHOLD, np.array([m.threshold], np.float32), 0, 0)

    @classmethod
    def zeros(cls) -> "InputTest":
        """Skip exact zeros (threshold 0): the same result as dense, fewer rows read."""
        return cls(Mode.THRESHOLD, np.zeros(1, np.float32), 0, 0)

    def same_as(self, other: "InputTest") -> bool:
        return (self.mode == other.mode and self.stride == other.stride and self.k == other.k
                and np.array_equal(self.threshold, other.threshold))


@dataclass
class LinearPlan:
    role: Role
    path: str
    linear: nn.Module  # the model's own nn.Linear or QuantLinear (its weight memory is read, not copied)
    test: InputTest
    mode: Mode = Mode.DENSE
    group: tuple[Role, ...] = ()  # roles computed in this linear's GEMV (itself first)
    rows: slice | None = None  # this role's rows of a fused projection's weight

    @property
    def sparse(self) -> bool:
        return self.mode in (Mode.THRESHOLD, Mode.TOPK)

    @property
    def quantized(self) -> bool:
        return isinstance(self.linear, QuantLinear)

    @property
    def weight(self) -> torch.Tensor:
        """The fp weight (a QuantLinear's is dequantised on every access)."""
        w = self.linear.weight.detach()
        return w if self.rows is None else w[self.rows]

    def packed(self) -> QuantWeight:
        """A QuantLinear's packed weight (this role's rows of a fused projection: row views)."""
        qw = self.linear.quant_weight()
        if self.rows is None:
            return qw
        if qw.layout != ROWS:
            raise UnsupportedError(f"{self.path}: a fused projection quantised in the {qw.layout} layout cannot be "
                                   "split into its roles without a copy; quantise it in the rows layout")
        r = self.rows
        return QuantWeight(qw.fmt, ROWS, (r.stop - r.start, qw.shape[1]), qw.codes[r], qw.scales[r],
                           None if qw.mins is None else qw.mins[r])

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.linear.bias
        return None if b is None else (b.detach() if self.rows is None else b.detach()[self.rows])

    @property
    def in_features(self) -> int:
        return self.linear.in_features


@dataclass
class LayerPlan:
    index: int
    linears: dict[Role, LinearPlan]
    act: InputTest
    norms: dict[str, np.ndarray]  # "norm.attn", "norm.mlp" (+ "norm.attn_out", "norm.mlp_out", "norm.q", "norm.k")
    window: int  # sliding-window length of this layer's attention (0: every position)
    rope_table: int  # which RoPE table this layer uses


@dataclass
class Architecture:
    """The architecture-level pieces the step needs beyond the block's linears."""

    norm_offset: float  # a norm's gain is offset + weight
    eps: float
    embed_scale: float  # the embedding is multiplied by this (Gemma: sqrt(hidden))
    attn_softcap: float  # tanh soft-capping of attention scores (0: none)
    final_softcap: float  # of the final logits (0: none)
    rope_types: tuple[str, ...]  # the layer types with a RoPE table of their own ("" for one table)


@dataclass
class DecodePlan:
    """Everything the compiled decode step reads, described per layer (see the module docstring)."""

    model: nn.Module
    smap: SiteMap
    fmt: WeightFormat
    act_name: str
    layers: list[LayerPlan]
    arch: Architecture
    n_heads: int
    n_kv: int
    head_dim: int
    hidden: int
    scale: float
    dense: bool
    sparse_modules: dict = field(default_factory=dict)  # path -> the sparse module the plan was read from
    # the block linears' format as decoded: "fp32" / "bf16" (the model's), "int8" / "q4" (the model's
    # QuantLinears, or the decoder's own copy when ``own_quant``)
    weights: str = ""
    own_quant: object = None  # the QuantConfig the decoder quantises its own copy with (None: the model's weights)

    # -------------------------------------------------------------- building
    @classmethod
    def from_model(cls, model: nn.Module, *, dense: bool = False, skip_zeros: bool | None = None,
                   weights=None) -> "DecodePlan":
        """The plan of ``model``: its sparse modules decide (``dense=True`` ignores them: the
        dense baseline); ``skip_zeros`` (default: on for a ReLU MLP) reads only the rows of up
        and down whose activation is non-zero. ``weights``: None (the model's own weights: fp, or
        its QuantLinears), or "int8" / "q4" / an Int8Config / Q4Config: the decoder quantises its
        own copy of the block linears (RTN; each in the layout its mode reads)."""
        cfg, fmt = check_model(model)
        own = _own_quant_config(weights)
        smap = site_map(model, warn=False)
        n_heads = cfg.num_attention_heads
        n_kv = cfg.num_key_value_heads or n_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        attn = [model.get_submodule(smap.module_path(i, "attn.o").rpartition(".")[0]) for i in range(smap.num_layers)]
        acts = [model.get_submodule(smap.module_path(i, "mlp.act")) for i in range(smap.num_layers)]
        names = {a.act_name if isinstance(a, ThresholdedActivation) else activation_name(a) for a in acts}
        if len(names) != 1 or next(iter(names)) not in ACT_CODES:
            raise UnsupportedError(f"unsupported MLP activation {sorted(names)}; FastDecoder runs "
                                   f"{', '.join(ACT_CODES)}")
        act_name = next(iter(names))
        relu = act_name == "relu"
        zero_skip = (skip_zeros if skip_zeros is not None else relu) and not dense
        if zero_skip and not relu:
            raise ConfigError(f"skip_zeros needs a ReLU MLP (its exact zeros); this model's activation is {act_name}")
        arch = _architecture(model, cfg, smap, attn)
        sizes = {"attn.qkv": (n_heads * head_dim, n_kv * head_dim, n_kv * head_dim)}
        layers = []
        for i in range(smap.num_layers):
            sizes["mlp.gate_up"] = (_down_width(model, smap, i),) * 2
            layers.append(cls._layer(model, smap, i, acts[i], attn[i], cfg, arch, sizes, dense, zero_skip))
        scales = {float(getattr(a, "scaling", head_dim ** -0.5)) for a in attn}
        if len(scales) != 1:
            raise UnsupportedError(f"attention scales differ between layers ({sorted(scales)}); FastDecoder uses one")
        quant = _block_quant_format(layers, model, own)
        for layer in layers:
            if quant is None:  # fusing concatenates transposed copies: the fp path only (quantised: one copy)
                _fuse(layer.linears, Role.Q)
                if layer.act.mode == Mode.DENSE:
                    _fuse(layer.linears, Role.GATE)
            elif own is None:
                _check_layouts(layer)
        return cls(model, smap, fmt, act_name, layers, arch, n_heads, n_kv, head_dim, cfg.hidden_size,
                   scales.pop(), dense, {} if dense else dict(iter_sparse_modules(model)),
                   weights=quant or fmt.name.lower(), own_quant=own)

    @staticmethod
    def _layer(model, smap: SiteMap, li: int, act, attn, cfg, arch: Architecture, sizes: dict, dense: bool,
               zero_skip: bool) -> LayerPlan:
        if isinstance(act, ThresholdedActivation) and not dense:
            act_test = InputTest.of(act)
        elif zero_skip:
            act_test = InputTest.zeros()
        else:
            act_test = InputTest()
        linears = {}
        for role in Role:
            site_role, rows = SITE_ROLE[role], None
            if site_role not in smap.roles:
                site_role, part = FUSED_SOURCES[role]
                cuts = np.cumsum((0,) + sizes[site_role])
                rows = slice(int(cuts[part]), int(cuts[part + 1]))
            path = smap.module_path(li, site_role)
            mod = model.get_submodule(path)
            lin = mod.linear if isinstance(mod, (MaskedLinear, ZeroSkipLinear)) else mod
            if not isinstance(lin, (nn.Linear, QuantLinear)):
                raise UnsupportedError(f"{path} is a {type(lin).__name__}; FastDecoder needs nn.Linear or QuantLinear")
            if isinstance(mod, MaskedLinear) and getattr(mod, "adapter", None) is not None:
                raise UnsupportedError(f"{path} carries a LoRA adapter (recovery training), which FastDecoder does "
                                       "not run: merge it first (actsparse.train.lora.merge_lora_(model))")
            if isinstance(mod, MaskedLinear) and not dense:
                if mod.rank:
                    raise UnsupportedError(
                        f"{path} carries a rank-{mod.rank} low-rank remainder (R-Sparse); the FastDecoder step does "
                        "not compute it yet: decode with accelerate_(model) and model.generate (`actsparse generate "
                        "--engine hf`), which runs the sparse kernel plus the factors' GEMVs")
                if mod.compensated:
                    raise UnsupportedError(
                        f"{path} carries compensation (a centre / offset, TEAL's centre or bias_correction); the "
                        "FastDecoder step does not apply it yet: decode with accelerate_(model) and model.generate "
                        "(`actsparse generate --engine hf`), or calibrate without compensation")
                test = InputTest.of(mod)
            elif role == Role.DOWN and act_test.mode != Mode.DENSE:
                test = InputTest.zeros()  # the masked neurons are exact zeros: skip their rows
            else:
                test = InputTest()
            linears[role] = LinearPlan(role, path, lin, test, test.mode, (role,), rows)
        norms = {r: _gain(model.get_submodule(smap.module_path(li, r)), arch.norm_offset) for r in smap.norms}
        window = _window(attn, cfg)
        layer_type = (getattr(cfg, "layer_types", None) or [""] * smap.num_layers)[li]
        table = arch.rope_types.index(layer_type) if layer_type in arch.rope_types else 0
        return LayerPlan(li, linears, act_test, norms, window, table)

    # -------------------------------------------------------------- views
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def modes(self) -> np.ndarray:
        """(layers, 7) table of each linear's :class:`Mode` code."""
        return np.array([[int(l.linears[r].mode) for r in Role] for l in self.layers], np.int64)

    def act_modes(self) -> np.ndarray:
        return np.array([int(l.act.mode) for l in self.layers], np.int64)

    def widths(self) -> np.ndarray:
        """Input width of each role, then the MLP width (for the sparsity counters)."""
        lin = self.layers[0].linears
        return np.array([lin[r].in_features for r in Role] + [lin[Role.DOWN].in_features], np.int64)

    def sparse_roles(self) -> dict[str, int]:
        """Number of layers in which each linear reads a sparse input (and the MLP site)."""
        modes = self.modes()
        out = {n: int((modes[:, r] != Mode.DENSE).sum()) for r, n in zip(Role, ROLE_NAMES)}
        out["mlp.act"] = int((self.act_modes() != Mode.DENSE).sum())
        return out

    def weight_bytes(self) -> dict:
        """Bytes read per decoded token by part (in the format decoded: codes + scales + mins for
        quantised weights): block linears per role, and the lm_head."""
        per_role = {n: sum(self._linear_bytes(l.linears[r]) for l in self.layers) for r, n in zip(Role, ROLE_NAMES)}
        return {"roles": per_role, "lm_head": self._head_bytes()}

    def _linear_bytes(self, lp: LinearPlan) -> int:
        if lp.quantized:
            return lp.packed().nbytes
        if self.own_quant is not None:
            return quant_nbytes(tuple(lp.weight.shape), self.own_quant.fmt)
        return _nbytes(lp.weight)

    def _head_bytes(self) -> int:
        head = self.model.get_output_embeddings()
        if isinstance(head, QuantLinear):
            return head.quant_weight().nbytes
        if self.own_quant is not None and self.own_quant.lm_head:
            return quant_nbytes(tuple(head.weight.shape), self.own_quant.head_fmt)
        return _nbytes(head.weight)

    def format_weight_bytes(self) -> int:
        """The model's weights stored once in the decoded format: every block linear (and a
        quantised lm_head) in its format, every other tensor as the model holds it. The
        reference of the one-copy target (resident weights within 5% of this)."""
        model = self.model
        total = unique_bytes(list(model.parameters()) + list(model.buffers()))
        linears = [l.linears[r].linear for l in self.layers for r in Role]
        total -= unique_bytes([t for m in linears for t in _weight_tensors(m)])
        total += sum(self.weight_bytes()["roles"].values())
        if self.quantized_head:
            head = model.get_output_embeddings()
            tied = not isinstance(head, QuantLinear) and _same_storage(head.weight, model.get_input_embeddings().weight)
            if not tied:  # an untied head is replaced by its quantised form; a tied one stays the embedding
                total -= unique_bytes(_weight_tensors(head))
            total += self._head_bytes()
        return total

    @property
    def quantized_head(self) -> bool:
        head = self.model.get_output_embeddings()
        return isinstance(head, QuantLinear) or (self.own_quant is not None and self.own_quant.lm_head)

    def model_matches(self) -> bool:
        """True while the model's sparse modules are the very ones this plan was read from (so
        the model's own forward computes what the plan does)."""
        return dict(iter_sparse_modules(self.model)) == self.sparse_modules

    # -------------------------------------------------------------- kernel arguments
    def kernel_args(self, max_len: int):
        """The grouped arguments of the compiled step (and the tensors their arrays point
        into, which must stay alive), plus the bytes of the transposed copies."""
        from numba.typed import List

        keep: list = []
        copy_bytes = 0
        w, wt, bias, thr = List(), List(), List(), List()
        L = self.num_layers
        quant = self.weights in FORMATS
        fmts = np.full((L, len(Role)), FORMAT_CODES[self.weights] if quant else int(self.fmt), np.int64)
        modes = self.modes()
        strides = np.zeros((L, len(Role)), np.int64)
        ks = np.zeros((L, len(Role)), np.int64)
        empty_w = _empty_packed(self.weights) if quant else empty_weights(self.fmt)
        empty_f = np.empty(0, np.float32)
        for li, layer in enumerate(self.layers):
            for role in Role:
                lp = layer.linears[role]
                strides[li, role], ks[li, role] = lp.test.stride, lp.test.k
                thr.append(lp.test.threshold)
                keep.append(lp.test.threshold)
                if lp.mode == Mode.FUSED:
                    w.append(empty_w)
                    wt.append(empty_w)
                    bias.append(empty_f)
                    continue
                members = [layer.linears[g] for g in lp.group]
                bias.append(_bias(members))
                if quant:  # one stored copy, in the layout its mode reads (rows: dense / kept rows)
                    qw = self._packed_for(lp)
                    keep.append(qw)
                    if self.own_quant is not None:
                        copy_bytes += qw.nbytes
                    arrays = qw.numpy()
                    w.append(arrays if qw.layout == ROWS else empty_w)
                    wt.append(arrays if qw.layout == TRANSPOSED else empty_w)
                    continue
                if lp.mode == Mode.DENSE:
                    weight = lp.weight
                    if not weight.is_contiguous():
                        raise UnsupportedError(f"{lp.path}: weight is not contiguous")
                    keep.append(weight)
                    w.append(numpy_view(weight))
                    wt.append(empty_w)
                else:
                    t = torch.cat([m.weight for m in members]).t().contiguous()
                    keep.append(t)
                    copy_bytes += _nbytes(t)
                    w.append(numpy_view(lp.weight) if role == Role.UP else empty_w)  # up rows of kept neurons
                    wt.append(numpy_view(t))
        a_thr = List()
        for layer in self.layers:
            a_thr.append(layer.act.threshold)
        act = K.ActTests(ACT_CODES[self.act_name], self.act_modes(),
                         a_thr, np.array([l.act.stride for l in self.layers], np.int64),
                         np.array([l.act.k for l in self.layers], np.int64))
        norms = K.Norms(*(self._norm_table(r) for r in ("norm.attn", "norm.mlp", "norm.attn_out", "norm.mlp_out",
                                                          "norm.q", "norm.k")),
                        self._final_norm(), float(self.arch.eps))
        emb = self.model.get_input_embeddings().weight.detach()
        head, head_copy = self._head_arrays()
        copy_bytes += head_copy
        keep += [emb, head]
        cos, sin = self._rope(max_len)
        args = K.StepArgs(
            weights=K.Weights(fmts, w, wt, bias),
            tests=K.Tests(modes, thr, strides, ks),
            act=act, norms=norms,
            attn=K.AttentionShape(self.n_heads, self.n_kv, self.head_dim, np.float32(self.scale),
                                  np.float32(self.arch.attn_softcap),
                                  np.array([l.window for l in self.layers], np.int64)),
            rope=K.Rope(cos, sin, np.array([l.rope_table for l in self.layers], np.int64)),
            emb=K.Embeddings(numpy_view(emb), head.numpy() if isinstance(head, QuantWeight) else numpy_view(head),
                             np.float32(self.arch.embed_scale),
                             np.float32(self.arch.final_softcap)),
        )
        return args, keep, copy_bytes

    def _packed_for(self, lp: LinearPlan) -> QuantWeight:
        """The quantised weight a linear is decoded with: the model's QuantLinear (shared, no
        copy), or the decoder's own RTN copy in the layout its mode reads."""
        if lp.quantized:
            return lp.packed()
        return quantize_weight(lp.weight, self.own_quant.fmt, TRANSPOSED if lp.sparse else ROWS)

    def _head_arrays(self):
        """(the lm_head's weight as decoded: a tensor or a QuantWeight, bytes of a copy made)."""
        head = self.model.get_output_embeddings()
        if isinstance(head, QuantLinear):
            qw = head.quant_weight()
            if qw.layout != ROWS:
                raise UnsupportedError(f"the lm_head is quantised in the {qw.layout} layout; the decoder reads it "
                                       "densely (rows layout): quantise it with lm_head=True (rows)")
            return qw, 0
        if self.own_quant is not None and self.own_quant.lm_head:
            qw = quantize_weight(head.weight.detach(), self.own_quant.head_fmt, ROWS)
            return qw, qw.nbytes
        return head.weight.detach(), 0

    def _norm_table(self, role: str) -> np.ndarray:
        """(layers, width) gains of one norm role; (0, 0) when the architecture has none."""
        if role not in self.layers[0].norms:
            return np.empty((0, 0), np.float32)
        return np.ascontiguousarray(np.stack([l.norms[role] for l in self.layers]))

    def _final_norm(self) -> np.ndarray:
        module = self.model.get_submodule(self.smap.part_path("final_norm"))
        return np.ascontiguousarray(_gain(module, self.arch.norm_offset))

    def _rope(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(tables, max_len, rotary dims) cos and sin, one table per RoPE layer type."""
        rotary = self.model.get_submodule(self.smap.part_path("rotary"))
        with torch.no_grad():
            pos = torch.arange(max_len)[None]
            probe = torch.zeros(1, 1, self.head_dim, dtype=torch.float32)
            tables = [rotary(probe, pos, t) if t else rotary(probe, pos) for t in self.arch.rope_types]
        cos = np.stack([c[0].float().numpy() for c, _ in tables])
        sin = np.stack([s[0].float().numpy() for _, s in tables])
        return np.ascontiguousarray(cos), np.ascontiguousarray(sin)


def check_model(model: nn.Module):
    """The config and weight format of a model FastDecoder can run; a clear refusal naming what
    is missing otherwise."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    smap = site_map(model, warn=False)
    if smap.family == "generic":
        raise UnsupportedError(
            f"FastDecoder needs an architecture site map; {type(model).__name__} (model_type {mtype!r}) has none, "
            "so none of its pieces is mapped: the attention projections (q, k, v, o), the MLP (gate, up, down), "
            "the norms and the rotary embedding. Decode it with model.generate (actsparse generate --engine hf), "
            "or map it with an entry in actsparse.models.sitemaps.FAMILIES")
    if mtype not in SUPPORTED_TYPES or not smap.part_path("rotary") or "norm.attn" not in smap.norms:
        raise UnsupportedError(
            f"FastDecoder runs pre-norm RMSNorm decoders with rotary positions and gated MLPs (LLaMA-style: "
            f"{', '.join(SUPPORTED_TYPES)}), not {mtype!r} ({smap.family} family: "
            f"{_missing_pieces(smap, mtype)}). Use accelerate_(model) and model.generate "
            "(actsparse generate --engine hf)")
    _refuse_unsupported_features(model, cfg, smap)
    if getattr(model, "device", torch.device("cpu")).type != "cpu":
        raise UnsupportedError("FastDecoder runs on the CPU; move the model with model.to('cpu')")
    dtype = model.get_input_embeddings().weight.dtype
    try:
        fmt = weight_format(dtype)
    except UnsupportedError:
        raise UnsupportedError(f"FastDecoder needs fp32 or bf16 weights, the model has {dtype}; "
                               "load it with dtype='float32' or 'bfloat16'") from None
    return cfg, fmt


def _missing_pieces(smap: SiteMap, mtype) -> str:
    pieces = []
    if not smap.gated:
        pieces.append("a non-gated MLP")
    if not smap.part_path("rotary"):
        pieces.append("learned position embeddings instead of RoPE")
    if smap.family in ("gpt2", "opt"):
        pieces.append("LayerNorm with bias instead of RMSNorm")
    if "norm.attn" not in smap.norms:
        pieces.append("post-norm blocks")
    return ", ".join(pieces) or f"the model type {mtype!r} is not implemented"


def rope_types(cfg) -> set:
    """The RoPE variants a config asks for (one per layer type for Gemma 3)."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    dicts = [params] if "rope_type" in params or "type" in params else [v for v in params.values()
                                                                         if isinstance(v, dict)]
    return {d.get("rope_type", d.get("type", "default")) for d in dicts} or {"default"}


def _refuse_unsupported_features(model, cfg, smap: SiteMap) -> None:
    """Config features the step does not implement: refused before any decoding."""
    bad = [t for t in rope_types(cfg) if t not in STATIC_ROPE]
    if bad:
        raise UnsupportedError(f"RoPE scaling {', '.join(sorted(bad))} depends on the current sequence length; "
                               f"FastDecoder implements the static variants ({', '.join(STATIC_ROPE)})")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UnsupportedError("bidirectional attention (use_bidirectional_attention=True) is not causal "
                               "decoding; FastDecoder implements causal attention only")
    if getattr(cfg, "no_rope_layers", None) is not None and not all(getattr(cfg, "no_rope_layers")):
        raise UnsupportedError("layers without RoPE (no_rope_layers) are not implemented by FastDecoder")
    for name in ("num_experts", "num_local_experts"):
        if getattr(cfg, name, None):
            raise UnsupportedError("mixture-of-experts MLPs are not implemented by FastDecoder")
    extra = [r for r in smap.norms if r not in ("norm.attn", "norm.mlp", "norm.attn_out", "norm.mlp_out",
                                                  "norm.q", "norm.k")]
    if extra:
        raise UnsupportedError(f"norms {extra} are not implemented by FastDecoder")


def _architecture(model, cfg, smap: SiteMap, attn: list) -> Architecture:
    norm = model.get_submodule(smap.module_path(0, "norm.attn"))
    eps = _eps(norm)
    for r in smap.norms:
        e = _eps(model.get_submodule(smap.module_path(0, r)))
        if not math.isclose(e, eps):
            raise UnsupportedError(f"the norms use different eps ({r}: {e} vs {eps}); FastDecoder uses one")
    caps = {float(getattr(a, "attn_logit_softcapping", None) or 0.0) for a in attn}
    rotary = model.get_submodule(smap.part_path("rotary"))
    per_type = "layer_type" in inspect.signature(rotary.forward).parameters
    types = tuple(sorted(set(cfg.layer_types))) if per_type else ("",)
    return Architecture(norm_offset=smap.norm_offset, eps=eps,
                        embed_scale=float(getattr(model.get_input_embeddings(), "scalar_embed_scale", 1.0)),
                        attn_softcap=caps.pop() if len(caps) == 1 else _refuse("per-layer attention soft-capping"),
                        final_softcap=float(getattr(cfg, "final_logit_softcapping", None) or 0.0),
                        rope_types=types)


def _refuse(what: str):
    raise UnsupportedError(f"{what} is not implemented by FastDecoder")


def _eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise UnsupportedError(f"{type(norm).__name__} has no eps; FastDecoder needs an RMSNorm")


def _gain(norm: nn.Module, offset: float) -> np.ndarray:
    if getattr(norm, "bias", None) is not None:
        raise UnsupportedError(f"{type(norm).__name__} has a bias (LayerNorm); FastDecoder implements RMSNorm")
    return (norm.weight.detach().float() + offset).contiguous().numpy()


def _window(attn: nn.Module, cfg) -> int:
    """The layer's sliding-window length (0: attends to every position). Per layer for the
    families that mix sliding and global layers (the attention module's own attribute),
    else the config's for every layer (Mistral, Phi-3)."""
    w = getattr(attn, "sliding_window", None) if hasattr(attn, "sliding_window") else getattr(cfg, "sliding_window", None)
    return int(w or 0)


def _down_width(model, smap: SiteMap, layer: int) -> int:
    m = model.get_submodule(smap.module_path(layer, "mlp.down"))
    return m.in_features if hasattr(m, "in_features") else m.weight.shape[-1]


def _fuse(linears: dict[Role, LinearPlan], first: Role) -> None:
    """Let ``first`` compute its whole group in one GEMV over the concatenated transposed
    weights when every member is sparse with the same test (and all or none have a bias)."""
    group = FUSED_GROUPS[first]
    head = linears[first]
    if not head.sparse:
        return
    has_bias = head.linear.bias is not None
    if all(linears[r].sparse and linears[r].test.same_as(head.test) and (linears[r].linear.bias is not None) == has_bias
           for r in group[1:]):
        head.group = group
        for r in group[1:]:
            linears[r].mode = Mode.FUSED


def _own_quant_config(weights):
    """The QuantConfig of ``FastDecoder(weights=...)`` (None: decode the model's own weights)."""
    from actsparse.quant.config import CONFIGS, QuantConfig

    if weights is None or weights == "model":
        return None
    if isinstance(weights, str):
        if weights not in CONFIGS:
            raise ConfigError(f"weights must be one of {', '.join(FORMATS)} or an Int8Config / Q4Config, got "
                              f"{weights!r} (fp32 / bf16 weights are the model's own: load it with that dtype)")
        return CONFIGS[weights]()
    if not isinstance(weights, QuantConfig):
        raise ConfigError(f"weights must be one of {', '.join(FORMATS)} or an Int8Config / Q4Config, got "
                          f"{type(weights).__name__}")
    if weights.awq:
        raise ConfigError("the decoder quantises its own copy by plain rounding; for AWQ quantise the model with "
                          "quantize_(model, Q4Config(awq=True), calibration=...) and pass it without weights=")
    if weights.transposed:
        raise ConfigError("the decoder picks each linear's layout from its plan; leave the config's transposed "
                          "empty here")
    return weights


def _block_quant_format(layers: list[LayerPlan], model, own) -> str | None:
    """The quantised format of the block linears (None: fp), refusing a mix the step cannot hold."""
    lps = [l.linears[r] for l in layers for r in Role]
    fmts = {lp.linear.fmt for lp in lps if lp.quantized}
    n_quant = sum(lp.quantized for lp in lps)
    if n_quant and own is not None:
        raise ConfigError(f"the model's linears are already quantised ({', '.join(sorted(fmts))}); pass the model "
                          "without weights= (the decoder reads its QuantLinears), or the dense model to quantise")
    if n_quant and n_quant != len(lps):
        dense = next(lp.path for lp in lps if not lp.quantized)
        raise UnsupportedError(f"{n_quant} of {len(lps)} block linears are quantised ({dense} is not); FastDecoder "
                               "decodes all block linears in one format: quantise all of them (quantize_)")
    if len(fmts) > 1:
        raise UnsupportedError(f"the block linears mix the formats {sorted(fmts)}; quantise them in one format")
    if not n_quant and own is not None:
        return own.fmt
    return fmts.pop() if fmts else None  # the lm_head may be in any format: it is its own step argument


def _check_layouts(layer: LayerPlan) -> None:
    """An input-sparse linear needs the transposed layout (one quantised copy, no repacking)."""
    for lp in layer.linears.values():
        if lp.sparse and lp.linear.layout != TRANSPOSED:
            raise UnsupportedError(
                f"{lp.path} is quantised in the {lp.linear.layout} layout, but the plan reads its input sparsely, "
                "which needs the transposed layout; quantise the model for this plan: quantize_(model, config, "
                "plan=PLAN_DIR) (CLI: actsparse quantize --plan PLAN_DIR), or pass the dense model with "
                "FastDecoder(model, weights=...)")


def _empty_packed(fmt: str) -> tuple:
    codes = np.empty((0, 0), np.int8 if fmt == "int8" else np.uint8)
    return codes, np.empty((0, 0), np.uint16), np.empty((0, 0), np.uint16)


def quant_nbytes(shape, fmt: str) -> int:
    """Bytes of an (out, in) weight packed in ``fmt`` (codes + scales [+ mins]), either layout."""
    n = int(shape[0]) * int(shape[1])
    blocks = n // 32
    return (n if fmt == "int8" else n // 2) + blocks * 2 * (1 if fmt == "int8" else 2)  # fp16 scales (+ mins)


def _weight_tensors(m: nn.Module) -> list:
    return [t for t in (m.codes, m.scales, m.mins) if t is not None] if isinstance(m, QuantLinear) else [m.weight]


def unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if t.numel() and key not in seen:
            seen.add(key)
            total += _nbytes(t)
    return total


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _bias(members: list[LinearPlan]) -> np.ndarray:
    if members[0].bias is None:
        return np.empty(0, np.float32)
    return torch.cat([m.bias.float() for m in members]).contiguous().numpy()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
