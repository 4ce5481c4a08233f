"""The typed decode plan: what the compiled decode step does with every linear of every layer.

:meth:`DecodePlan.from_model` reads a (possibly sparsified) model through its architecture
site map, never through hard-coded module names, and decides per layer:

* for each linear (:class:`Role`), its :class:`Mode`: dense on the model's own weight
  (no copy), input-sparse (threshold or top-k) on a transposed copy, or computed together
  with the linear it shares an input test with (``FUSED``: k and v with q, up with gate);
* the MLP activation site's test (CATS / CHESS / Top-K thresholds, a ReLU model's exact
  zeros, or none), after which only the kept rows of up and down are read;
* the weight format of every matrix (:class:`~actsparse.kernels.formats.WeightFormat`).

:meth:`DecodePlan.kernel_args` turns it into the grouped arguments of
:func:`actsparse.decode.step.decode_token` (weights, input tests, activation tests, norms,
attention shape, RoPE tables, embeddings). Host and kernel share the enums' values.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from actsparse.decode import codes as K
from actsparse.decode.codes import FUSED_GROUPS, ROLE_NAMES, SITE_ROLE, Mode, Role
from actsparse.errors import ConfigError, UnsupportedError
from actsparse.kernels.formats import WeightFormat, empty_weights, numpy_view, weight_format
from actsparse.kernels.reference import ACT_CODES
from actsparse.models.sitemaps import SiteMap, site_map
from actsparse.sparsify.modules import MaskedLinear, ThresholdedActivation, activation_name, iter_sparse_modules


SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


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
    linear: nn.Linear  # the model's own module (its weight memory is read for dense rows)
    test: InputTest
    mode: Mode = Mode.DENSE
    group: tuple[Role, ...] = ()  # roles computed in this linear's GEMV (itself first)

    @property
    def sparse(self) -> bool:
        return self.mode in (Mode.THRESHOLD, Mode.TOPK)


@dataclass
class LayerPlan:
    index: int
    linears: dict[Role, LinearPlan]
    act: InputTest
    norm_attn: np.ndarray
    norm_mlp: np.ndarray


@dataclass
class DecodePlan:
    """Everything the compiled decode step reads, described per layer (see the module docstring)."""

    model: nn.Module
    smap: SiteMap
    fmt: WeightFormat
    act_name: str
    layers: list[LayerPlan]
    n_heads: int
    n_kv: int
    head_dim: int
    hidden: int
    eps: float
    scale: float
    dense: bool
    sparse_modules: dict = field(default_factory=dict)  # path -> the sparse module the plan was read from

    # -------------------------------------------------------------- building
    @classmethod
    def from_model(cls, model: nn.Module, *, dense: bool = False, skip_zeros: bool | None = None) -> "DecodePlan":
        """The plan of ``model``: its sparse modules decide (``dense=True`` ignores them: the
        dense baseline); ``skip_zeros`` (default: on for a ReLU MLP) reads only the rows of up
        and down whose activation is non-zero."""
        cfg, fmt = check_model(model)
        smap = site_map(model, warn=False)
        attn = model.get_submodule(smap.module_path(0, "attn.q").rpartition(".")[0])
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
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
        layers = [cls._layer(model, smap, i, acts[i], dense, zero_skip) for i in range(smap.num_layers)]
        return cls(model, smap, fmt, act_name, layers, n_heads, cfg.num_key_value_heads or n_heads, head_dim,
                   cfg.hidden_size, float(cfg.rms_norm_eps), float(getattr(attn, "scaling", head_dim ** -0.5)), dense,
                   {} if dense else dict(iter_sparse_modules(model)))

    def model_matches(self) -> bool:
        """True while the model's sparse modules are the very ones this plan was read from (so
        the model's own forward computes what the plan does)."""
        return dict(iter_sparse_modules(self.model)) == self.sparse_modules

    @staticmethod
    def _layer(model, smap: SiteMap, li: int, act, dense: bool, zero_skip: bool) -> LayerPlan:
        if isinstance(act, ThresholdedActivation) and not dense:
            act_test = InputTest.of(act)
        elif zero_skip:
            act_test = InputTest.zeros()
        else:
            act_test = InputTest()
        linears = {}
        for role in Role:
            path = smap.module_path(li, SITE_ROLE[role])
            mod = model.get_submodule(path)
            lin = mod.linear if isinstance(mod, MaskedLinear) else mod
            if not isinstance(lin, nn.Linear):
                raise UnsupportedError(f"{path} is a {type(lin).__name__}; FastDecoder needs nn.Linear")
            if isinstance(mod, MaskedLinear) and not dense:
                test = InputTest.of(mod)
            elif role == Role.DOWN and act_test.mode != Mode.DENSE:
                test = InputTest.zeros()  # the masked neurons are exact zeros: skip their rows
            else:
                test = InputTest()
            linears[role] = LinearPlan(role, path, lin, test, test.mode, (role,))
        _fuse(linears, Role.Q)
        if act_test.mode == Mode.DENSE:
            _fuse(linears, Role.GATE)
        norm = lambda r: model.get_submodule(smap.module_path(li, r)).weight.detach().float().numpy()  # noqa: E731
        return LayerPlan(li, linears, act_test, norm("norm.attn"), norm("norm.mlp"))

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
        return np.array([lin[r].linear.in_features for r in Role] + [lin[Role.DOWN].linear.in_features], np.int64)

    def sparse_roles(self) -> dict[str, int]:
        """Number of layers in which each linear reads a sparse input (and the MLP site)."""
        modes = self.modes()
        out = {n: int((modes[:, r] != Mode.DENSE).sum()) for r, n in zip(Role, ROLE_NAMES)}
        out["mlp.act"] = int((self.act_modes() != Mode.DENSE).sum())
        return out

    def weight_bytes(self) -> dict:
        """Bytes read per decoded token by part: block linears per role, and the lm_head."""
        per_role = {n: sum(_nbytes(l.linears[r].linear.weight) for l in self.layers) for r, n in zip(Role, ROLE_NAMES)}
        return {"roles": per_role, "lm_head": _nbytes(self.model.get_output_embeddings().weight)}

    # -------------------------------------------------------------- kernel arguments
    def kernel_args(self, max_len: int):
        """The grouped arguments of the compiled step (and the tensors their arrays point
        into, which must stay alive), plus the bytes of the transposed copies."""
        from numba.typed import List

        keep: list = []
        copy_bytes = 0
        w, wt, bias, thr = List(), List(), List(), List()
        L = self.num_layers
        fmts = np.full((L, len(Role)), int(self.fmt), np.int64)
        modes = self.modes()
        strides = np.zeros((L, len(Role)), np.int64)
        ks = np.zeros((L, len(Role)), np.int64)
        empty_w, empty_f = empty_weights(self.fmt), np.empty(0, np.float32)
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
                lins = [layer.linears[g].linear for g in lp.group]
                if lp.mode == Mode.DENSE:
                    weight = lp.linear.weight.detach()
                    if not weight.is_contiguous():
                        raise UnsupportedError(f"{lp.path}: weight is not contiguous")
                    keep.append(weight)
                    w.append(numpy_view(weight))
                    wt.append(empty_w)
                else:
                    t = torch.cat([m.weight.detach() for m in lins]).t().contiguous()
                    keep.append(t)
                    copy_bytes += _nbytes(t)
                    w.append(numpy_view(lp.linear.weight) if role == Role.UP else empty_w)  # up rows of kept neurons
                    wt.append(numpy_view(t))
                bias.append(_bias(lins))
        a_thr = List()
        for layer in self.layers:
            a_thr.append(layer.act.threshold)
        act = K.ActTests(ACT_CODES[self.act_name], self.act_modes(),
                         a_thr, np.array([l.act.stride for l in self.layers], np.int64),
                         np.array([l.act.k for l in self.layers], np.int64))
        norms = K.Norms(np.stack([l.norm_attn for l in self.layers]), np.stack([l.norm_mlp for l in self.layers]),
                        self._final_norm(), float(self.eps))
        emb = self.model.get_input_embeddings().weight.detach()
        head = self.model.get_output_embeddings().weight.detach()
        keep += [emb, head]
        cos, sin = self._rope(max_len)
        args = K.StepArgs(
            weights=K.Weights(fmts, w, wt, bias),
            tests=K.Tests(modes, thr, strides, ks),
            act=act, norms=norms,
            attn=K.AttentionShape(self.n_heads, self.n_kv, self.head_dim, np.float32(self.scale)),
            rope=K.Rope(cos, sin),
            emb=K.Embeddings(numpy_view(emb), numpy_view(head)),
        )
        return args, keep, copy_bytes

    def _final_norm(self) -> np.ndarray:
        path = self.smap.part_path("final_norm")
        return self.model.get_submodule(path).weight.detach().float().contiguous().numpy()

    def _rope(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        rotary = self.model.get_submodule(self.smap.part_path("rotary"))
        with torch.no_grad():
            pos = torch.arange(max_len)[None]
            probe = torch.zeros(1, 1, self.head_dim, dtype=torch.float32)
            cos, sin = rotary(probe, pos)
        return cos[0].float().contiguous().numpy(), sin[0].float().contiguous().numpy()


def check_model(model: nn.Module):
    """The config and weight format of a model FastDecoder can run; a clear refusal otherwise."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    smap = site_map(model, warn=False)
    if mtype not in SUPPORTED_TYPES or smap.family != "llama" or not smap.part_path("rotary"):
        raise UnsupportedError(
            f"FastDecoder supports LLaMA-style models ({', '.join(SUPPORTED_TYPES)}), not {mtype!r}; "
            "use accelerate_(model) and model.generate for other mapped architectures")
    if getattr(model, "device", torch.device("cpu")).type != "cpu":
        raise UnsupportedError("FastDecoder runs on the CPU; move the model with model.to('cpu')")
    dtype = model.get_input_embeddings().weight.dtype
    try:
        fmt = weight_format(dtype)
    except UnsupportedError:
        raise UnsupportedError(f"FastDecoder needs fp32 or bf16 weights, the model has {dtype}; "
                               "load it with dtype='float32' or 'bfloat16'") from None
    return cfg, fmt


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


def _bias(linears) -> np.ndarray:
    if linears[0].bias is None:
        return np.empty(0, np.float32)
    return torch.cat([m.bias.detach().float() for m in linears]).contiguous().numpy()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
