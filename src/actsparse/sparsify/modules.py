"""Sparse modules: the reference path of every training-free method.

Each one computes the dense forward on the masked tensor, so it is the specification a
fast kernel must match:

* :class:`MaskedLinear` wraps an ``nn.Linear`` (sharing its weight and bias Parameters,
  never copying them) and zeroes input entries with ``|x| <= threshold`` (a scalar or a
  per-input-channel fp32 tensor) or all but the ``k`` largest ``|x|`` per token, then calls
  the original linear on the masked input.
* :class:`ThresholdedActivation` replaces an MLP's ``act_fn`` (CATS, CHESS, Top-K on the
  activation): its output is ``act(g)`` zeroed where ``|act(g)| <= threshold``.

Comparisons are done in fp32 (``x.float().abs() > t``), as the CPU kernels do. Scalar
thresholds are rounded to fp32 when a module is built, so a plan, the module and a kernel
all see the same number.

Every module counts the sparsity it actually reaches (masked entries / entries) while
``counting`` is on, excluding padding tokens when the model was called with an
``attention_mask`` of the input's (batch, time) shape (a :class:`MaskTracker` on the
root module, shared by all sparse modules of a model). Find them with
:func:`iter_sparse_modules`.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from actsparse.errors import ConfigError
from actsparse.measure.hooks import MaskTracker
from actsparse.quant.modules import QuantLinear

MODES = ("threshold", "topk")


def fp32_scalar(t) -> float:
    """Round a threshold to the nearest fp32 value (as a Python float); NaN raises."""
    v = float(t)
    if math.isnan(v):
        raise ConfigError("threshold is NaN (statistics with non-finite values, or an empty calibration?)")
    if v < 0:
        raise ConfigError(f"threshold must be >= 0, got {v}")
    return float(np.float32(v))


def check_threshold(threshold, width: int):
    """Validate a threshold: a float (rounded to fp32) or a 1-D fp32 tensor of ``width``."""
    if isinstance(threshold, torch.Tensor) and threshold.ndim > 0:
        t = threshold.detach().to(torch.float32).reshape(-1).clone()
        if t.numel() != width:
            raise ConfigError(f"per-channel threshold has {t.numel()} entries, the input has {width} channels")
        if torch.isnan(t).any():
            raise ConfigError(f"per-channel threshold has {int(torch.isnan(t).sum())} NaN entries")
        if (t < 0).any():
            raise ConfigError("per-channel thresholds must be >= 0")
        return t
    return fp32_scalar(threshold)


class _StraightThroughMask(torch.autograd.Function):
    """``x * keep`` forward, identity backward: the straight-through estimator of the mask
    (the thresholds stay fixed; the gradient reaches x as if no entry had been dropped)."""

    @staticmethod
    def forward(ctx, x, keep):
        return x * keep

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def apply_mask(x: torch.Tensor, keep: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
    """``x * keep``; with ``straight_through`` its gradient is the identity (see
    :class:`_StraightThroughMask`)."""
    return _StraightThroughMask.apply(x, keep) if straight_through else x * keep


def topk_keep(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest ``|x|`` along the last dim (exactly k per row)."""
    width = x.shape[-1]
    if k >= width:
        return torch.ones_like(x, dtype=torch.bool)
    keep = torch.zeros_like(x, dtype=torch.bool)
    if k <= 0:
        return keep
    idx = x.float().abs().topk(k, dim=-1, sorted=False).indices
    return keep.scatter_(-1, idx, True)


class SparseModule(nn.Module):
    """Common state: threshold / top-k, the site kind, what weights it lets a kernel skip,
    and the reached-sparsity counters."""

    def _init_sparse(self, width: int, threshold, mode: str, k: int | None, site_kind: str | None,
                     skips: tuple[str, ...]):
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.width = int(width)
        self.mode = mode
        self.site_kind = site_kind or ""
        self.skips = tuple(skips)  # module paths whose weight bytes a kernel can skip for masked entries
        if mode == "topk":
            if k is None or not (0 <= int(k) <= width):
                raise ConfigError(f"top-k needs 0 <= k <= {width}, got {k!r}")
            self.k = int(k)
            self.threshold = None
        else:
            if threshold is None:
                raise ConfigError("threshold mode needs a threshold")
            self.k = None
            t = check_threshold(threshold, width)
            if isinstance(t, torch.Tensor):
                self.register_buffer("threshold", t, persistent=False)
            else:
                self.threshold = t
        self.counting = True
        self.bypass = False
        self.straight_through = False  # gradient of the mask: identity (recovery training) or the mask
        self.zeros = 0
        self.entries = 0
        self._token_mask: MaskTracker | None = None  # set by install: the root forward's attention mask

    @property
    def per_channel(self) -> bool:
        return isinstance(self.threshold, torch.Tensor)

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the entries that survive (``|x| > t``, or the top-k per token)."""
        if self.mode == "topk":
            return topk_keep(x, self.k)
        return x.float().abs() > self.threshold

    def _count(self, keep: torch.Tensor) -> None:
        mask = self._token_mask.mask if self._token_mask is not None else None
        if mask is not None and keep.ndim == 3 and tuple(mask.shape) == tuple(keep.shape[:2]):
            valid = mask.to(device=keep.device, dtype=torch.bool)
            n_valid = int(valid.sum())
            kept = int((keep & valid[..., None]).sum())
            entries = n_valid * keep.shape[-1]
        else:
            kept = int(keep.sum())
            entries = keep.numel()
        self.zeros += entries - kept
        self.entries += entries

    def reset_counts(self) -> None:
        self.zeros = 0
        self.entries = 0

    @property
    def reached(self) -> float:
        """Fraction of entries masked since the last reset (NaN before any forward)."""
        return self.zeros / self.entries if self.entries else math.nan

    def _extra(self) -> str:
        if self.mode == "topk":
            return f"topk k={self.k}/{self.width}"
        if self.per_channel:
            return f"per-channel threshold (median {float(self.threshold.median()):.4g})"
        return f"threshold={self.threshold:.4g}"


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2's linears: the transposed weight)."""
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear``, a ``Conv1D`` or a :class:`MaskedLinear`."""
    if isinstance(module, (nn.Linear, MaskedLinear, QuantLinear)):
        return module.in_features, module.out_features
    if is_linear(module):  # Conv1D: weight (in, out)
        return tuple(module.weight.shape)
    raise TypeError(f"expected a linear layer (nn.Linear or Conv1D), got {type(module).__name__}")


def out_in_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whichever way the layer stores it."""
    lin = module.linear if isinstance(module, MaskedLinear) else module
    if isinstance(lin, nn.Linear):
        return lin.weight
    if is_linear(lin):
        return lin.weight.t()
    raise TypeError(f"expected a linear layer (nn.Linear or Conv1D), got {type(lin).__name__}")


def in_out_weight(module: nn.Module) -> torch.Tensor:
    """A contiguous (in_features, out_features) copy or view of the weight: the layout of the
    input-sparse kernels (each input channel's weights are one contiguous row)."""
    return out_in_weight(module).detach().t().contiguous()


class MaskedLinear(SparseModule):
    """``linear(x * keep(x))``: the wrapped linear (``nn.Linear`` or GPT-2's ``Conv1D``) on its
    masked input.

    Attributes a kernel needs: ``linear`` (the original module; ``weight`` and ``bias`` are
    its very Parameters), ``threshold`` (float, or fp32 tensor of ``in_features`` for
    per-channel thresholds; None in top-k mode), ``mode`` ("threshold" or "topk"), ``k``.
    ``bypass``: when True (see :func:`dense_forward`) the module is the dense linear.

    Compensation (optional, fp32, see :mod:`actsparse.sparsify.compensation`): ``centre``
    (``in_features``) is subtracted before the test and the product, and ``offset``
    (``out_features``) is added after it: ``linear((x - c) * keep(x - c)) + offset``. The
    offset holds ``W c`` (so that nothing changes while no entry is dropped) plus, with bias
    correction, the expected product of the dropped entries.

    Low-rank remainder (optional, R-Sparse, see :mod:`actsparse.sparsify.rsparse`):
    ``factor_v`` (rank x in, ``S_r V_r^T``) and ``factor_u`` (out x rank, ``U_r``) approximate
    the dropped entries' product: ``linear(x * keep) + U_r (S_r V_r^T (x * ~keep))``. They are
    held in the weight's dtype, and their ``rank * (in + out)`` weights are read per token on
    top of the kept columns (:attr:`extra_weights`, counted by :func:`bytes_skipped`).
    """

    def __init__(self, linear: nn.Module, threshold=None, *, mode: str = "threshold", k: int | None = None,
                 site_kind: str | None = None, skips: tuple[str, ...] = (), centre: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None, factor_u: torch.Tensor | None = None,
                 factor_v: torch.Tensor | None = None):
        super().__init__()
        quantized = isinstance(linear, QuantLinear)
        if not (is_linear(linear) or quantized):
            raise TypeError(f"MaskedLinear wraps an nn.Linear, Conv1D or QuantLinear, got {type(linear).__name__}")
        # keep the original module without registering it, so parameter names stay
        # "<path>.weight" (state_dict and weights_identity unchanged) and the weight is shared
        object.__setattr__(self, "linear", linear)
        if quantized:  # its packed buffers under their own names ("<path>.codes", ...), shared
            for name, buf in linear.named_buffers(recurse=False):
                self.register_buffer(name, buf)
        else:
            self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear_features(linear)
        self._init_sparse(self.in_features, threshold, mode, k, site_kind, skips)
        self.centre = _compensation_vector(centre, self.in_features, "centre")
        self.offset = _compensation_vector(offset, self.out_features, "offset")
        # a trainable term on the masked input (a LoRA of recovery training): linear(xm) + adapter(xm)
        self.adapter: nn.Module | None = None
        dtype = linear.weight.dtype if hasattr(linear, "weight") and not quantized else torch.float32
        u, v = _low_rank_factors(factor_u, factor_v, self.in_features, self.out_features, dtype)
        # buffers, not in the state_dict: model.to() moves them, the checkpoint stays the dense model's
        self.register_buffer("factor_u", u, persistent=False)
        self.register_buffer("factor_v", v, persistent=False)

    @property
    def compensated(self) -> bool:
        return self.centre is not None or self.offset is not None

    @property
    def rank(self) -> int:
        """Rank of the low-rank remainder (0: none, the plain masked product)."""
        return 0 if self.factor_u is None else int(self.factor_u.shape[1])

    @property
    def extra_weights(self) -> int:
        """Weights read per token besides the kept columns of the linear: the low-rank factors."""
        return self.rank * (self.in_features + self.out_features)

    def remainder(self, dropped: torch.Tensor) -> torch.Tensor:
        """``U_r (S_r V_r^T dropped)``: the low-rank estimate of the dropped entries' product."""
        v, u = self.factor_v.to(dropped), self.factor_u.to(dropped)
        return torch.nn.functional.linear(torch.nn.functional.linear(dropped, v), u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return self.linear(x)
        if self.centre is not None:
            x = x - self.centre.to(x)
        keep = self.keep_mask(x)
        if self.counting:
            self._count(keep)
        xm = apply_mask(x, keep, self.straight_through)
        y = self.linear(xm)
        if self.factor_u is not None:
            y = y + self.remainder(x * ~keep)
        if self.adapter is not None:
            y = y + self.adapter(xm)
        return y if self.offset is None else y + self.offset.to(y)

    def extra_repr(self) -> str:
        comp = "".join(f", {n}" for n in ("centre", "offset") if getattr(self, n) is not None)
        if self.rank:
            comp += f", low-rank remainder r={self.rank}"
        return f"in={self.in_features}, out={self.out_features}, {self._extra()}{comp}"


def _low_rank_factors(u, v, width: int, out: int, dtype: torch.dtype):
    """Validated ``(factor_u, factor_v)`` (out x r, r x in) in ``dtype``, or ``(None, None)``."""
    if u is None and v is None:
        return None, None
    if u is None or v is None:
        raise ConfigError("a low-rank remainder needs both factors (factor_u: out x rank, factor_v: rank x in)")
    u = torch.as_tensor(u).detach()
    v = torch.as_tensor(v).detach()
    if u.ndim != 2 or v.ndim != 2 or u.shape[0] != out or v.shape[1] != width or u.shape[1] != v.shape[0]:
        raise ConfigError(f"low-rank factors of shapes {tuple(u.shape)} and {tuple(v.shape)} do not fit a linear "
                          f"of {width} inputs and {out} outputs (expected ({out}, r) and (r, {width}))")
    if u.shape[1] == 0:
        return None, None
    if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
        raise ConfigError("low-rank factors hold non-finite values (a damaged plan?)")
    return u.to(dtype).contiguous(), v.to(dtype).contiguous()


def _compensation_vector(v, width: int, name: str) -> torch.Tensor | None:
    if v is None:
        return None
    t = torch.as_tensor(v).detach().to(torch.float32).reshape(-1).clone()
    if t.numel() != width:
        raise ConfigError(f"compensation {name} has {t.numel()} entries, expected {width}")
    if not torch.isfinite(t).all():
        raise ConfigError(f"compensation {name} holds non-finite values (calibration activations with NaN/inf?)")
    return t


class ThresholdedActivation(SparseModule):
    """``act(g) * keep(act(g))``: an MLP activation whose small outputs are zeroed.

    Attributes: ``act`` (the original activation module), ``act_name`` ("silu",
    "gelu_tanh", "gelu", "relu" or the class name), ``threshold`` (float or per-neuron fp32
    tensor), ``mode``, ``k``. In a gated MLP a zero at neuron i means row i of up_proj and
    column i of down_proj need not be read (``skips``).
    """

    def __init__(self, act: nn.Module, width: int, threshold=None, *, mode: str = "threshold",
                 k: int | None = None, site_kind: str | None = "mlp.act:output", skips: tuple[str, ...] = ()):
        super().__init__()
        object.__setattr__(self, "act", act)
        self.act_name = activation_name(act)
        self._init_sparse(width, threshold, mode, k, site_kind, skips)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        a = self.act(g)
        if self.bypass:
            return a
        keep = self.keep_mask(a)
        if self.counting:
            self._count(keep)
        return apply_mask(a, keep, self.straight_through)

    def extra_repr(self) -> str:
        return f"act={self.act_name}, width={self.width}, {self._extra()}"


def activation_name(act: nn.Module) -> str:
    name = type(act).__name__.lower()
    if "silu" in name or "swish" in name:
        return "silu"
    if "gelu" in name and ("tanh" in name or "pytorch" in name or "new" in name or "fast" in name):
        return "gelu_tanh"
    if "gelu" in name:
        return "gelu"
    if "relu" in name:
        return "relu"
    return type(act).__name__


@contextmanager
def _flag_set(model: nn.Module, flag: str):
    """Within the block, ``flag`` is True on every sparse module of ``model``; restored after."""
    modules = [m for _, m in iter_sparse_modules(model)]
    before = [getattr(m, flag) for m in modules]
    for m in modules:
        setattr(m, flag, True)
    try:
        yield model
    finally:
        for m, b in zip(modules, before):
            setattr(m, flag, b)


def straight_through(model: nn.Module):
    """Within the block, the masks of every sparse module of ``model`` pass gradients straight
    through (forward unchanged): what recovery training trains through."""
    return _flag_set(model, "straight_through")


def dense_forward(model: nn.Module):
    """Within the block, every sparse module of ``model`` computes its dense original (no
    masking, no counting): the dense baseline on a sparsified model, e.g. a dense prefill."""
    return _flag_set(model, "bypass")


def iter_sparse_modules(model: nn.Module) -> Iterator[tuple[str, SparseModule]]:
    """Every sparse module of ``model`` as ``(module path, module)``, in module order."""
    for path, module in model.named_modules():
        if isinstance(module, SparseModule):
            yield path, module


def reset_counts(model: nn.Module) -> None:
    for _, m in iter_sparse_modules(model):
        m.reset_counts()


def reached_sparsity(model: nn.Module) -> dict:
    """Reached sparsity since the last reset: per site kind (pooled over layers) and overall."""
    kinds: dict[str, list[int]] = {}
    for _, m in iter_sparse_modules(model):
        z = kinds.setdefault(m.site_kind or type(m).__name__, [0, 0])
        z[0] += m.zeros
        z[1] += m.entries
    return {k: (z / e if e else math.nan) for k, (z, e) in kinds.items()}


def block_linear_params(model: nn.Module) -> dict[str, int]:
    """Parameter count (weights) of every linear inside the transformer blocks."""
    from actsparse.models.sitemaps import LINEAR_ROLES, generic_linears, site_map

    smap = site_map(model, warn=False)
    out = {}
    if smap.family == "generic":
        return {path: _weight_count(model.get_submodule(path)) for path in generic_linears(model)}
    for layer in range(smap.num_layers):
        for role in LINEAR_ROLES:
            if role in smap.roles:
                path = smap.module_path(layer, role)
                out[path] = _weight_count(model.get_submodule(path))
    return out


def _weight_count(module: nn.Module) -> int:
    """Weights of a linear, through a sparse wrapper (``.linear``) and for packed quantised
    linears (which hold codes, not a ``weight``)."""
    inner = getattr(module, "linear", module)
    if isinstance(getattr(inner, "in_features", None), int) and isinstance(getattr(inner, "out_features", None), int):
        return inner.in_features * inner.out_features
    return inner.weight.numel()


def bytes_skipped(model: nn.Module, *, nominal: dict[str, float] | None = None) -> float:
    """Fraction of the block linears' weight bytes a sparse kernel skips per decoded token,
    from the reached sparsity of each module (or ``nominal``: module path -> sparsity)."""
    params = block_linear_params(model)
    total = sum(params.values())
    skipped: dict[str, float] = {}
    extra = 0  # weights read besides the linears' own (R-Sparse's low-rank factors), counted against the skips
    for path, m in iter_sparse_modules(model):
        s = nominal.get(path, math.nan) if nominal is not None else m.reached
        if math.isnan(s):
            continue
        for target in m.skips:
            skipped[target] = max(skipped.get(target, 0.0), s)
        extra += getattr(m, "extra_weights", 0)
    saved = sum(params.get(p, 0) * s for p, s in skipped.items()) - extra
    return saved / total if total else math.nan
