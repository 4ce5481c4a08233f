"""Compensation for the inputs a thresholded linear drops, at no cost per token.

A TEAL linear computes ``W (x * keep(x))``; two corrections fold into a per-output offset that
the linear adds after the product (a bias, see :class:`~actsparse.sparsify.modules.MaskedLinear`):

* **bias correction**: on average over the calibration tokens the masked product misses
  ``W E[x * drop(x)]``, the dropped entries' expected contribution; adding it makes the
  sparse output unbiased on the calibration distribution (it cannot remove the per-token error).
* **centring** (SCAP's mode-centring): threshold and multiply ``z = x - c`` instead of ``x``,
  ``c`` the per-channel median of the calibration inputs, and add ``W c``: the result is the
  dense one while nothing is dropped, and a channel that sits away from 0 is no longer kept
  for its offset alone. With centring the threshold is the s-quantile of ``|x - c|``.

Both are computed from a sample of raw calibration rows of each input (the statistics need the
joint value of every channel and the threshold, which the histograms do not keep).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from actsparse.errors import DataError


@dataclass
class InputFit:
    """What one input site gets: the threshold, the centre (or None) and the mean of the dropped
    part of ``x - centre`` over the rows (or None without bias correction)."""

    threshold: float
    centre: torch.Tensor | None
    dropped_mean: torch.Tensor | None

    def offset(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The per-output offset of a linear with ``weight`` (out x in) reading this input."""
        shift = None
        for v in (self.centre, self.dropped_mean):
            if v is not None:
                shift = v if shift is None else shift + v
        if shift is None:
            return None
        return (weight.detach().to(torch.float64) @ shift.to(torch.float64)).to(torch.float32)


def quantile_abs(values: torch.Tensor, sparsity: float) -> float:
    """The value t such that a fraction ``sparsity`` of ``|values|`` is <= t (0 at s = 0)."""
    a = values.detach().abs().reshape(-1).to(torch.float32)
    k = int(round(sparsity * a.numel()))
    if k <= 0:
        return 0.0
    return float(a.kthvalue(min(k, a.numel())).values)


def fit_input(rows: torch.Tensor, sparsity: float, *, centre: bool, bias_correction: bool,
              threshold: float | None = None) -> InputFit:
    """Fit one input site from its calibration ``rows`` (tokens x channels). Without centring
    ``threshold`` (the histogram threshold plain TEAL uses) is kept when given, so that the
    correction is the only difference from TEAL."""
    from actsparse.sparsify.modules import fp32_scalar

    # fp32 like the module: the same centred values and the same |z| <= t test as at inference
    x = rows.detach().to(torch.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"compensation needs calibration rows (tokens x channels), got shape {tuple(rows.shape)}")
    if not torch.isfinite(x).all():
        raise DataError("the calibration rows hold NaN/inf values; compensation would be meaningless")
    c = x.median(dim=0).values if centre else None
    z = x - c if c is not None else x
    if centre or threshold is None:
        threshold = quantile_abs(z, sparsity)
    threshold = fp32_scalar(threshold)
    mu = None
    if bias_correction:
        mu = (z.to(torch.float64) * (z.abs() <= threshold)).mean(dim=0).to(torch.float32)
    return InputFit(threshold, c, mu)
