"""The log-linear |v| histogram shared by the accumulators and the fused numba pass.

Every activation site keeps a histogram of |v| over all its neurons, read straight off the
float32 bit pattern, so binning costs two integer ops per value; threshold quantiles come
from it.
"""
from __future__ import annotations

import torch

# Histogram of |v| over all neurons of a site, read straight off the float32 bit pattern:
# the exponent and the top HIST_MANTISSA_BITS mantissa bits of |v| form a log-linear bin
# index (32 bins per octave, about 2% wide), so binning costs two integer ops per value.
# Bin 0 holds |v| < 2**HIST_MIN_EXP (zeros included); the last bin everything >= 2**HIST_MAX_EXP.
HIST_MANTISSA_BITS = 5
HIST_MIN_EXP, HIST_MAX_EXP = -24, 16
PER_OCTAVE = 1 << HIST_MANTISSA_BITS
SHIFT = 23 - HIST_MANTISSA_BITS
BASE = (HIST_MIN_EXP + 127) * PER_OCTAVE  # bit-index of 2**HIST_MIN_EXP
HIST_BINS = (HIST_MAX_EXP - HIST_MIN_EXP) * PER_OCTAVE + 2


def hist_lower_edges() -> torch.Tensor:
    """Lower edge of every histogram bin (float64); bin 0 starts at 0."""
    j = torch.arange(HIST_BINS - 1, dtype=torch.int64) + BASE  # bins 1..HIST_BINS-1
    octave = torch.div(j, PER_OCTAVE, rounding_mode="floor") - 127
    frac = (j % PER_OCTAVE).double() / PER_OCTAVE
    lower = torch.pow(2.0, octave.double()) * (1.0 + frac)
    return torch.cat([torch.zeros(1, dtype=torch.float64), lower])


def hist_bin_index(absv: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each |v| (float32 tensor, finite, >= 0), as int64."""
    bits = absv.to(torch.float32).contiguous().view(torch.int32)
    idx = torch.bitwise_right_shift(bits, SHIFT) - (BASE - 1)
    return idx.clamp_(0, HIST_BINS - 1).to(torch.int64)
