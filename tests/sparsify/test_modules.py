import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from actsparse.errors import ConfigError
from actsparse.measure.hooks import MaskTracker
from actsparse.sparsify.modules import MaskedLinear, ThresholdedActivation, topk_keep


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), time=st.integers(1, 5), d_in=st.integers(1, 24), d_out=st.integers(1, 9),
       t=st.floats(0, 2), per_channel=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_masked_linear_equals_dense_on_masked_input(batch, time, d_in, d_out, t, per_channel, bias, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias)
    x = torch.randn(batch, time, d_in)
    thr = torch.rand(d_in) * 2 * t if per_channel else t
    m = MaskedLinear(lin, thr)
    tt = thr if per_channel else torch.tensor(float(m.threshold))
    mask = x.abs() > tt
    ref = F.linear(x * mask, lin.weight, lin.bias)
    assert torch.equal(m(x), ref)
    assert m.zeros == int((~mask).sum()) and m.entries == x.numel()


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), width=st.integers(1, 20), frac=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_topk_keeps_exactly_k(rows, width, frac, seed):
    torch.manual_seed(seed)
    k = int(round(frac * width))
    x = torch.randn(rows, width)
    keep = topk_keep(x, k)
    assert (keep.sum(-1) == k).all()
    if 0 < k < width:
        kept_min = torch.where(keep, x.abs(), torch.inf).min(-1).values
        dropped_max = torch.where(~keep, x.abs(), -torch.inf).max(-1).values
        assert (kept_min >= dropped_max).all()
    lin = nn.Linear(width, 3)
    m = MaskedLinear(lin, mode="topk", k=k)
    assert torch.equal(m(x), F.linear(x * keep, lin.weight, lin.bias))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 8), width=st.integers(1, 16), t=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_thresholded_activation(rows, width, t, seed):
    torch.manual_seed(seed)
    g = torch.randn(2, rows, width)
    m = ThresholdedActivation(nn.SiLU(), width, t)
    a = F.silu(g)
    assert torch.equal(m(g), a * (a.abs() > torch.tensor(m.threshold)))
    assert m.act_name == "silu"


def test_weight_is_shared_not_copied():
    lin = nn.Linear(4, 3)
    m = MaskedLinear(lin, 0.1)
    assert m.weight is lin.weight and m.bias is lin.bias and m.linear is lin
    assert set(dict(m.named_parameters())) == {"weight", "bias"}
    assert set(m.state_dict()) == {"weight", "bias"}


def test_threshold_rounded_to_fp32_and_validated():
    m = MaskedLinear(nn.Linear(4, 3), 0.1)
    assert m.threshold == float(torch.tensor(0.1, dtype=torch.float32))
    with pytest.raises(ConfigError, match="NaN"):
        MaskedLinear(nn.Linear(4, 3), float("nan"))
    with pytest.raises(ConfigError, match="NaN"):
        MaskedLinear(nn.Linear(4, 3), torch.tensor([0.1, float("nan"), 0.0, 0.0]))
    with pytest.raises(ConfigError):
        MaskedLinear(nn.Linear(4, 3), torch.zeros(5))


def test_counting_excludes_padding():
    m = MaskedLinear(nn.Linear(4, 2), 10.0)  # drops everything
    tm = MaskTracker()
    m._token_mask = tm
    tm.mask = torch.tensor([[1, 1, 0]])
    m(torch.randn(1, 3, 4))
    assert m.entries == 8 and m.zeros == 8
    m.reset_counts()
    assert math.isnan(m.reached)
