"""``accelerate_(model)``: kernel-backed sparse linears for ``model.generate``.

Every :class:`MaskedLinear` of a sparsified model becomes a :class:`KernelLinear`: for a
single token (batch 1, one position, no gradient) it runs the input-sparse GEMV on a
transposed copy of its weight; for anything else (prefill, batch > 1, training) it is the
masked dense forward it replaced. In an MLP whose activation is thresholded (CATS, CHESS,
Top-K on the activation), the down projection's input has exact zeros: its linear becomes
a :class:`ZeroSkipLinear` that reads only the rows of the non-zero inputs. A linear with a
low-rank remainder (R-Sparse) runs the same kernel on its kept inputs plus two small dense
GEMVs for the factors.

Quantised models (``quantize_``) run on the packed codes, no copy: a sparse linear must be
packed transposed (``quantize_(..., plan=)``), which the input-sparse kernel reads; a zero-skipping
down projection packed transposed skips rows, one packed by rows runs the dense kernel; every
other ``QuantLinear`` becomes a :class:`QuantDenseLinear` (the dense kernel for a single token,
instead of dequantising its weight on every call).

This works on any architecture sparsify_ supports (the site map says which module is the
down projection of the MLP whose activation is thresholded), but Hugging Face's per-token
overhead stays (~15 ms per token for SmolLM2); :class:`~actsparse.decode.FastDecoder` removes
it for LLaMA-style models. The swaps go through the module-swap ledger under the owner
"accelerate", declared dependent on "sparsify": ``deaccelerate_`` undoes them, and so does
``desparsify_``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from actsparse.errors import StateError, UnsupportedError
from actsparse.kernels import sparse_input_gemv
from actsparse.kernels.quant_dispatch import q_dense_gemv, q_input_sparse_gemv
from actsparse.kernels.quant_formats import TRANSPOSED
from actsparse.models import swap
from actsparse.models.sitemaps import site_map
from actsparse.quant.modules import QuantLinear
from actsparse.sparsify.modules import (MaskedLinear, ThresholdedActivation, in_out_weight, is_linear,
                                        iter_sparse_modules, linear_features)

OWNER = "accelerate"


def _single_token(x: torch.Tensor, width: int) -> bool:
    return x.numel() == width and not (torch.is_grad_enabled() and x.requires_grad)


def _packed_gemv(qw, x: torch.Tensor, threshold) -> torch.Tensor:
    """One token through a packed weight: the input-sparse kernel on the transposed layout
    (``threshold`` None: every input), the dense kernel on the rows layout."""
    if qw.layout == TRANSPOSED:
        return q_input_sparse_gemv(x, qw, -1.0 if threshold is None else threshold)
    return q_dense_gemv(x, qw)


class KernelLinear(MaskedLinear):
    """A :class:`MaskedLinear` whose single-token forward runs the sparse kernel (on a
    transposed copy of an fp weight, or on a QuantLinear's own transposed codes)."""

    def __init__(self, masked: MaskedLinear, path: str = ""):
        super().__init__(masked.linear, masked.threshold if masked.mode == "threshold" else None,
                         mode=masked.mode, k=masked.k, site_kind=masked.site_kind, skips=masked.skips,
                         centre=masked.centre, offset=masked.offset, factor_u=masked.factor_u,
                         factor_v=masked.factor_v)
        self._token_mask = masked._token_mask
        self.counting = masked.counting
        if isinstance(masked.linear, QuantLinear):
            if masked.linear.layout != TRANSPOSED:
                raise UnsupportedError(f"{path}: its inputs are tested sparsely but its codes are packed by rows, "
                                       "which the input-sparse kernel cannot skip; quantise for the plan "
                                       "(quantize_(model, config, plan=PLAN) or actsparse quantize --plan)")
            self.wt = None
        else:
            self.register_buffer("wt", in_out_weight(masked.linear), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass or not _single_token(x, self.in_features):
            return super().forward(x)
        if self.centre is not None:
            x = x - self.centre.to(x)
        low_rank = self.factor_u is not None
        keep = self.keep_mask(x) if (self.counting or self.mode == "topk" or low_rank) else None
        if self.counting:
            self._count(keep)
        dropped = (x * ~keep).reshape(-1) if low_rank else None
        if self.mode == "topk":  # torch.topk's choice among ties, then skip the zeros
            x, thr = x * keep, 0.0
        else:
            thr = self.threshold
        xv = x.reshape(-1).contiguous()
        if self.wt is None:
            y = q_input_sparse_gemv(xv, self.linear.quant_weight(), thr)
        else:
            y = sparse_input_gemv(xv, self.wt, thr)
        if low_rank:  # the factors are small and dense: two torch GEMVs
            y = y + self.remainder(dropped)
        if self.bias is not None:
            y = y + self.bias.to(y)
        if self.offset is not None:
            y = y + self.offset.to(y)
        return y.reshape(*x.shape[:-1], self.out_features)


class ZeroSkipLinear(nn.Module):
    """A linear whose single-token forward skips the weight rows of exact-zero inputs
    (the masked neurons of a thresholded MLP activation); the same result as the linear."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        object.__setattr__(self, "linear", linear)
        self.quantized = isinstance(linear, QuantLinear)
        if self.quantized:  # its packed buffers under their own names (state_dict unchanged), no copy
            for name, buf in linear.named_buffers(recurse=False):
                self.register_buffer(name, buf)
            self.wt = None
        else:
            self.weight = linear.weight
            self.register_buffer("wt", in_out_weight(linear), persistent=False)
        self.bias = linear.bias
        self.in_features, self.out_features = linear_features(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _single_token(x, self.in_features):
            return self.linear(x)
        xv = x.reshape(-1).contiguous()
        if self.quantized:  # rows-packed codes cannot skip rows: the dense kernel
            y = _packed_gemv(self.linear.quant_weight(), xv, 0.0)
        else:
            y = sparse_input_gemv(xv, self.wt, 0.0)
        if self.bias is not None:
            y = y + self.bias.to(y)
        return y.reshape(*x.shape[:-1], self.out_features)


class QuantDenseLinear(nn.Module):
    """A dense QuantLinear whose single-token forward runs the packed dense kernel (a
    QuantLinear's own forward dequantises the whole weight on every call)."""

    def __init__(self, linear: QuantLinear):
        super().__init__()
        object.__setattr__(self, "linear", linear)
        for name, buf in linear.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _single_token(x, self.in_features):
            return self.linear(x)
        y = _packed_gemv(self.linear.quant_weight(), x.reshape(-1).contiguous(), None)
        if self.bias is not None:
            y = y + self.bias.to(y)
        return y.reshape(*x.shape[:-1], self.out_features)


@dataclass
class AccelerationReport:
    kernel_linears: int
    zero_skip_linears: int
    transposed_copy_bytes: int
    model_weight_bytes: int
    quant_dense_linears: int = 0

    @property
    def copy_overhead(self) -> float:
        return self.transposed_copy_bytes / self.model_weight_bytes if self.model_weight_bytes else float("nan")

    def to_dict(self) -> dict:
        return {"kernel_linears": self.kernel_linears, "zero_skip_linears": self.zero_skip_linears,
                "quant_dense_linears": self.quant_dense_linears, "transposed_copy_bytes": self.transposed_copy_bytes,
                "model_weight_bytes": self.model_weight_bytes,
                "copy_overhead": self.copy_overhead}

    def __str__(self) -> str:
        quant = f", {self.quant_dense_linears} packed dense linears" if self.quant_dense_linears else ""
        return (f"{self.kernel_linears} kernel linears, {self.zero_skip_linears} zero-skipping down projections"
                f"{quant}; "
                f"transposed copies {self.transposed_copy_bytes / 2**20:.1f} MiB "
                f"(+{100 * self.copy_overhead:.0f}% of the weights)")


def accelerate_(model: nn.Module) -> AccelerationReport:
    """Swap the sparse linears of a sparsified ``model`` for kernel-backed ones, in place."""
    if swap.has(model, OWNER):
        raise StateError("the model is already accelerated (call deaccelerate_ first)")
    sparse = list(iter_sparse_modules(model))
    if not sparse:
        raise StateError("the model has no sparse modules: sparsify it (sparsify_ or load_plan) before accelerate_")
    adapted = [path for path, m in sparse if getattr(m, "adapter", None) is not None]
    if adapted:
        raise UnsupportedError(f"{adapted[0]} carries a LoRA adapter (recovery training), which the kernels do not "
                               "run: merge it into the weights first (actsparse.train.lora.merge_lora_(model))")
    smap = site_map(model, warn=False)
    copy_bytes = n_kernel = n_zero = 0
    swaps = []
    for path, m in sparse:
        if isinstance(m, MaskedLinear):
            new = KernelLinear(m, path)
            n_kernel += 1
        elif isinstance(m, ThresholdedActivation):
            where = smap.locate(path)
            if where is None or "mlp.down" not in smap.roles:
                continue  # not an MLP activation of the site map: the masked dense path stays
            path = smap.module_path(where[0], "mlp.down")
            down = model.get_submodule(path)
            if isinstance(down, MaskedLinear) or not (is_linear(down) or isinstance(down, QuantLinear)):
                continue  # already a sparse linear (TEAL on down): it skips the zeros itself
            new = ZeroSkipLinear(down)
            n_zero += 1
        else:
            continue
        if new.wt is not None:
            copy_bytes += new.wt.numel() * new.wt.element_size()
        swaps.append((path, new))
    swapped = {p for p, _ in swaps}
    dense_quant = [(p, QuantDenseLinear(m)) for p, m in model.named_modules()
                   if isinstance(m, QuantLinear) and p not in swapped]
    for path, new in swaps + dense_quant:  # built first: a refusal above leaves the model as it was
        swap.swap_module(model, path, new, owner=OWNER, depends_on=("sparsify",))
    if smap.family == "generic":
        warnings.warn(
            f"{'; '.join(smap.unmapped)}: accelerate_ swapped its "
            f"{n_kernel} sparse linears for kernel linears, but could not map the MLP (a thresholded activation's "
            "down projection cannot skip zeros) or the block (FastDecoder refuses it); add a FAMILIES entry in "
            "actsparse.models.sitemaps for those", stacklevel=2)
    packed = [m.linear for _, m in swaps + dense_quant if isinstance(getattr(m, "linear", None), QuantLinear)]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(q.quant_weight().nbytes for q in {id(q): q for q in packed}.values())
    return AccelerationReport(n_kernel, n_zero, copy_bytes, weights, len(dense_quant))


def deaccelerate_(model: nn.Module) -> None:
    """Undo :func:`accelerate_` (the masked modules come back); no-op if not accelerated."""
    swap.unwind(model, OWNER)
