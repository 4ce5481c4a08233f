import math

import numpy as np
import pytest
import torch

from actsparse.errors import ConfigError
from actsparse.train.delta import (DeltaActivation, deltas, delta_loss, nonzero_deltas_per_frame, quantize,
                                   temporal_sparsity)
from actsparse.train.fatrelu import FATReLU, fatrelu
from actsparse.train.topk import TopKActivation, topk_activation, topk_mask


def test_fatrelu_values_and_grad():
    x = torch.tensor([-1.0, 0.0, 0.005, 0.01, 0.02, 3.0], requires_grad=True)
    y = FATReLU(0.01)(x)
    assert y.tolist() == pytest.approx([0, 0, 0, 0.01, 0.02, 3.0])
    y.sum().backward()
    assert x.grad.tolist() == [0, 0, 0, 1, 1, 1]
    z = torch.randn(100)
    assert torch.equal(fatrelu(z, 0.0), torch.relu(z))
    with pytest.raises(ConfigError):
        FATReLU(-0.1)
    with pytest.raises(ConfigError):
        FATReLU(float("nan"))


def test_topk_exact_and_grad():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    k = 4
    y = topk_activation(x, k)
    xs = x.detach().numpy()
    thresh = np.sort(xs, axis=-1)[..., -k][..., None]
    expected = np.where(xs >= thresh, xs, 0.0)
    np.testing.assert_array_equal(y.detach().numpy(), expected)
    assert ((y != 0).sum(-1) == k).all()
    w = torch.randn_like(x)
    (y * w).sum().backward()
    keep = torch.from_numpy(xs >= thresh)
    assert torch.equal(x.grad, torch.where(keep, w, torch.zeros_like(w)))
    assert torch.equal(topk_mask(x.detach(), k), keep)
    # magnitude ranking
    v = torch.tensor([[-5.0, 1.0, 2.0, -0.1]])
    assert topk_activation(v, 2, magnitude=True).tolist() == [[-5.0, 0.0, 2.0, 0.0]]
    # module with an activation first
    m = TopKActivation(2, torch.nn.ReLU())
    assert m(torch.tensor([[-3.0, 1.0, 2.0, 0.5]])).tolist() == [[0.0, 1.0, 2.0, 0.0]]


def test_topk_errors():
    with pytest.raises(ConfigError, match="larger than the layer width"):
        topk_activation(torch.randn(2, 4), 5)
    with pytest.raises(ConfigError, match="larger than the layer width"):
        TopKActivation(9)(torch.randn(2, 8))
    with pytest.raises(ConfigError, match=">= 1"):
        TopKActivation(0)
    with pytest.raises(ConfigError):
        TopKActivation(2.5)
    assert topk_activation(torch.randn(2, 4), 4).ne(0).all()


def test_delta_quantise_straight_through():
    torch.manual_seed(1)
    a = torch.randn(2, 6, 3, requires_grad=True)
    layer = DeltaActivation(q_init=0.1, rate=1e-5, fan_out=7)
    assert float(layer.q.detach()) == pytest.approx(0.1)
    y = layer(a)
    q = 0.1
    ref = np.round(a.detach().numpy() / q) * q
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(a)
    (y * w).sum().backward()
    # straight-through: dy/da = 1
    torch.testing.assert_close(a.grad, w)
    # dy/dq = round(a/q) - a/q; log-parametrised: dL/dlog_q = q * sum(w * (round(a/q) - a/q))
    r = a.detach() / layer.q.detach()
    expect = float(layer.q.detach() * (w * (torch.round(r) - r)).sum())
    assert float(layer.log_q.grad) == pytest.approx(expect, rel=1e-4, abs=1e-7)


def test_delta_q_stays_positive_and_learns():
    layer = DeltaActivation(q_init=0.1)
    opt = torch.optim.SGD(layer.parameters(), lr=100.0)
    a = torch.randn(1, 4, 5)
    for _ in range(3):
        opt.zero_grad()
        (layer(a) * torch.randn_like(a)).sum().backward()
        opt.step()
    assert float(layer.q.detach()) > 0


def test_delta_loss_and_temporal_metric_brute_force():
    rng = np.random.default_rng(0)
    a = torch.tensor(rng.normal(0, 0.1, size=(3, 7, 4)), dtype=torch.float32)
    a[:, 3] = a[:, 2]  # some frames repeat exactly
    layer = DeltaActivation(q_init=0.05, rate=1e-3, fan_out=10)
    y = layer(a)
    yn = y.detach().numpy().astype(np.float64)
    # brute force over every (batch, t >= 1, unit)
    zero = nonzero = 0
    l1 = 0.0
    per_frame = []
    for b in range(3):
        for t in range(1, 7):
            nz = 0
            for u in range(4):
                d = yn[b, t, u] - yn[b, t - 1, u]
                l1 += abs(d)
                if d == 0:
                    zero += 1
                else:
                    nz += 1
            nonzero += nz
            per_frame.append(nz)
    numel = 3 * 6 * 4
    assert temporal_sparsity(y) == pytest.approx(zero / numel)
    assert layer.last_temporal_sparsity == pytest.approx(zero / numel)
    assert nonzero_deltas_per_frame(y) == pytest.approx(np.mean(per_frame))
    assert layer.last_nonzero_per_frame == pytest.approx(np.mean(per_frame))
    assert float(layer.loss.detach()) == pytest.approx(1e-3 * 10 * l1 / numel, rel=1e-5)
    assert zero >= 12  # the repeated frame contributes zero deltas
    model = torch.nn.Sequential(layer, DeltaActivation())
    model(a)
    assert float(delta_loss(model).detach()) == pytest.approx(float((model[0].loss + model[1].loss).detach()))
    # include_first compares frame 0 against zeros
    d = deltas(y, include_first=True)
    assert d.shape[1] == 7 and torch.equal(d[:, 0], y[:, 0])
    with pytest.raises(ValueError):
        layer(torch.randn(5))


def test_quantize_function():
    a = torch.tensor([0.14, 0.16, -0.26])
    assert quantize(a, 0.1).tolist() == pytest.approx([0.1, 0.2, -0.3])
    assert math.isnan(temporal_sparsity(torch.zeros(2, 1, 3)))
