import numpy as np
import pytest
import torch
from torch import nn

from actsparse.train.balance import ReLUBalance, balance_loss, balance_ratios
from actsparse.train.losses import ActivationL1, l1_per_token


class Toy(nn.Module):
    """h (a leaf the test controls) -> down; forward(x, attention_mask=None)."""

    def __init__(self, width=6):
        super().__init__()
        self.down = nn.Linear(width, 3)
        self.down2 = nn.Linear(width, 3)

    def forward(self, h, attention_mask=None):
        return self.down(h) + self.down2(h * 2)


def test_l1_gradient_is_sign_over_tokens():
    torch.manual_seed(0)
    model = Toy()
    h = torch.randn(2, 5, 6, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    with ActivationL1(model, sites=["down:input"]) as l1:
        model(h, attention_mask=mask)
        loss = 0.3 * l1.loss
        n = int(mask.sum())
        valid = mask.bool()[..., None]
        ref = (h.detach().abs() * valid).sum() / n
        assert float(l1.loss.detach()) == pytest.approx(float(ref), rel=1e-6)
        loss.backward()
    expected = 0.3 * torch.sign(h.detach()) * valid / n
    torch.testing.assert_close(h.grad, expected)
    # the hooks are gone after exit
    assert not model.down._forward_pre_hooks and not model._forward_pre_hooks


def test_l1_sums_sites_resets_per_forward_and_sparsity():
    model = Toy()
    h = torch.relu(torch.randn(1, 4, 6))
    with ActivationL1(model, sites=["down:input", "down2:input"]) as l1:
        model(h)
        first = float(l1.loss)
        model(h)
        assert float(l1.loss) == pytest.approx(first)  # a new forward starts a new sum
        assert first == pytest.approx(float(h.abs().sum() / 4 + (2 * h).abs().sum() / 4))
        zeros = float((h == 0).sum()) * 2 / (2 * h.numel())
        assert l1.sparsity == pytest.approx(zeros)
        assert l1.total_sparsity == pytest.approx(zeros)
        assert set(l1.per_site) == {"down:input", "down2:input"}
    assert float(l1_per_token(h)) == pytest.approx(float(h.abs().sum() / 4))


def test_l1_hooks_removed_on_error():
    model = Toy()
    with pytest.raises(RuntimeError):
        with ActivationL1(model, sites="down:input"):
            assert model.down._forward_pre_hooks
            raise RuntimeError("boom")
    assert not model.down._forward_pre_hooks and not model._forward_pre_hooks


def _np_ratios(z):
    z = np.asarray(z, dtype=np.float64).ravel()
    p, n = z[z > 0], z[z < 0]
    m = p.mean() / abs(n.mean())
    v = p.var() / n.var()
    return min(m, 1 / m), min(v, 1 / v)


def test_balance_matches_numpy_and_is_differentiable():
    rng = np.random.default_rng(0)
    zs = [rng.normal(0.5, 1.0, size=(2, 5, 8)), rng.normal(-0.6, 0.5, size=(2, 5, 8)) * rng.uniform(0.5, 3, size=8)]
    tau = 0.5
    expected = []
    for z in zs:
        rm, rv = _np_ratios(z)
        expected.append((max(tau - rm, 0) + max(tau - rv, 0)) / tau)
    tz = [torch.tensor(z, dtype=torch.float64, requires_grad=True) for z in zs]
    loss = balance_loss(tz, tau)
    assert float(loss.detach()) == pytest.approx(np.mean(expected), rel=1e-9)
    r_m, r_v = balance_ratios(tz[0])
    assert (float(r_m), float(r_v)) == pytest.approx(_np_ratios(zs[0]))
    loss.backward()
    assert tz[1].grad is not None and torch.isfinite(tz[1].grad).all()
    assert float(tz[1].grad.abs().sum()) > 0  # the imbalanced layer pushes back
    # one-sided layer: ratios 0, loss 2
    assert float(balance_loss([torch.ones(3, 4)], tau)) == pytest.approx(2.0)


def test_relu_balance_module_and_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(32, 4)
    reg = ReLUBalance(model, sites=["1:input", "3:input"], initial=0.5, warmup_steps=10)
    with reg:
        model(x)
        z1 = model[0](x)
        z2 = model[2](model[1](z1))
        assert float(reg.loss) == pytest.approx(float(balance_loss([z1, z2])), rel=1e-6)
        reg.loss.backward()
    assert model[0].weight.grad is not None
    assert reg.weight(0) == 0.5 and reg.weight(5) == pytest.approx(0.25) and reg.weight(10) == 0.0
    assert not model[1]._forward_pre_hooks
