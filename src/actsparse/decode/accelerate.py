"""``accelerate_(model)``: kernel-backed sparse linears for ``model.generate``.

Every :class:`MaskedLinear` of a sparsified model becomes a :class:`KernelLinear`: for a
single token (batch 1, one position, no gradient) it runs the input-sparse GEMV on a
transposed copy of its weight; for anything else (prefill, batch > 1, training) it is the
masked dense forward it replaced. In an MLP whose activation is thresholded (CATS, CHESS,
Top-K on the activation), the down projection's input has exact zeros: its linear becomes
a :class:`ZeroSkipLinear` that reads only the rows of the non-zero inputs. A linear with a
low-rank remainder (R-Sparse) runs the same kernel on its kept inputs plus two small dense
GEMVs for the factors.

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
from actsparse.models import swap
from actsparse.models.sitemaps import site_map
from actsparse.quant.modules import QuantLinear
from actsparse.sparsify.modules import (MaskedLinear, ThresholdedActivation, in_out_weight, is_linear,
                                        iter_sparse_modules, linear_features)

OWNER = "accelerate"


def _single_token(x: torch.Tensor, width: int) -> bool:
    return x.numel() == width and not (torch.is_grad_enabled() and x.requires_grad)


class KernelLinear(MaskedLinear):
    """A :class:`MaskedLinear` whose single-token forward runs the sparse kernel."""

    def __init__(self, masked: MaskedLinear):
        super().__init__(masked.linear, masked.threshold if masked.mode == "threshold" else None,
                         mode=masked.mode, k=masked.k, site_kind=masked.site_kind, skips=masked.skips,
                         centre=masked.centre, offset=masked.offset, factor_u=masked.factor_u,
                         factor_v=masked.factor_v)
        self._token_mask = masked._token_mask
        self.counting = masked.counting
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
        y = sparse_input_gemv(x.reshape(-1).contiguous(), self.wt, thr)
        if low_rank:  # the factors are small and dense: two torch GEMVs
            y = y + self.remainder(dropped)
        if self.bias is not None:
            y = y + self.bias
        if self.offset is not None:
            y = y + self.offset.to(y)
        return y.reshape(*x.shape[:-1], self.out_features)


class ZeroSkipLinear(nn.Module):
    """A linear whose single-token forward skips the weight rows of exact-zero inputs
    (the masked neurons of a thresholded MLP activation); the same result as the linear."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        object.__setattr__(self, "linear", linear)
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear_features(linear)
        self.register_buffer("wt", in_out_weight(linear), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _single_token(x, self.in_features):
            return self.linear(x)
        y = sparse_input_gemv(x.reshape(-1).contiguous(), self.wt, 0.0)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


@dataclass
class AccelerationReport:
    kernel_linears: int
    zero_skip_linears: int
    transposed_copy_bytes: int
    model_weight_bytes: int

    @property
    def copy_overhead(self) -> float:
        return self.transposed_copy_bytes / self.model_weight_bytes if self.model_weight_bytes else float("nan")

    def to_dict(self) -> dict:
        return {"kernel_linears": self.kernel_linears, "zero_skip_linears": self.zero_skip_linears,
                "transposed_copy_bytes": self.transposed_copy_bytes, "model_weight_bytes": self.model_weight_bytes,
                "copy_overhead": self.copy_overhead}

    def __str__(self) -> str:
        return (f"{self.kernel_linears} kernel linears, {self.zero_skip_linears} zero-skipping down projections; "
                f"transposed copies {self.transposed_copy_bytes / 2**20:.1f} MiB "
                f"(+{100 * self.copy_overhead:.0f}% of the weights)")


def accelerate_(model: nn.Module) -> AccelerationReport:
    """Swap the sparse linears of a sparsified ``model`` for kernel-backed ones, in place."""
    if swap.has(model, OWNER):
        raise StateError("the model is already accelerated (call deaccelerate_ first)")
    sparse = list(iter_sparse_modules(model))
    if not sparse:
        raise StateError("the model has no sparse modules: sparsify it (sparsify_ or load_plan) before accelerate_")
    wrapped = [getattr(m, "linear", None) for _, m in sparse]  # a MaskedLinear does not register its linear
    if any(isinstance(m, QuantLinear) for m in list(model.modules()) + wrapped):
        raise UnsupportedError("accelerate_ has no kernels for quantised (int8 / q4) linears yet; decode a quantised "
                               "model with FastDecoder (actsparse generate --engine fast), or model.generate without "
                               "accelerate_ (the masked dense forward of the dequantised weights)")
    smap = site_map(model, warn=False)
    copy_bytes = n_kernel = n_zero = 0
    for path, m in sparse:
        if isinstance(m, MaskedLinear):
            new = KernelLinear(m)
            n_kernel += 1
        elif isinstance(m, ThresholdedActivation):
            where = smap.locate(path)
            if where is None or "mlp.down" not in smap.roles:
                continue  # not an MLP activation of the site map: the masked dense path stays
            path = smap.module_path(where[0], "mlp.down")
            down = model.get_submodule(path)
            if isinstance(down, MaskedLinear) or not is_linear(down):
                continue  # already a sparse linear (TEAL on down): it skips the zeros itself
            new = ZeroSkipLinear(down)
            n_zero += 1
        else:
            continue
        copy_bytes += new.wt.numel() * new.wt.element_size()
        swap.swap_module(model, path, new, owner=OWNER, depends_on=("sparsify",))
    if smap.family == "generic":
        warnings.warn(
            f"{'; '.join(smap.unmapped)}: accelerate_ swapped its "
            f"{n_kernel} sparse linears for kernel linears, but could not map the MLP (a thresholded activation's "
            "down projection cannot skip zeros) or the block (FastDecoder refuses it); add a FAMILIES entry in "
            "actsparse.models.sitemaps for those", stacklevel=2)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return AccelerationReport(n_kernel, n_zero, copy_bytes, weights)


def deaccelerate_(model: nn.Module) -> None:
    """Undo :func:`accelerate_` (the masked modules come back); no-op if not accelerated."""
    swap.unwind(model, OWNER)
