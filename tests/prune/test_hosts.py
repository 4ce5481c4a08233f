"""Host pruners match their definitions on small nets."""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from actsparse.errors import ConfigError
from actsparse.prune import hosts as H
from actsparse.experiments.ap_digits.nets import MLP, SmallResNet


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    monkeypatch.setenv("ACTSPARSE_DISABLE_NUMBA", "1")
    torch.manual_seed(0)


def tiny(bias=True):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4, bias=bias), nn.ReLU(), nn.Linear(4, 2, bias=bias))


def masks(model):
    return [H.current_mask(m, n) for m, n in H.prunable_parameters(model)]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def batch(n=8, d=3, c=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def test_magnitude_prunes_exactly_k_smallest_globally():
    model = tiny()
    w = flat([m.weight.detach() for m in (model[0], model[2])])
    res = H.get_host("magnitude").prune(model, 7)
    assert res.pruned == 7 and res.survivors_after == w.numel() - 7
    expected = torch.ones_like(w)
    expected[w.abs().argsort()[:7]] = 0
    assert torch.equal(flat(masks(model)), expected)
    # fraction of survivors, rounded down: floor(0.5 * 13) = 6
    res = H.get_host("magnitude").prune(model, 0.5)
    assert res.survivors_before == 13 and res.pruned == 6


def test_magnitude_ties_broken_by_flat_index():
    model = tiny(bias=False)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.fill_(1.0)
        model[0].weight[3, 2] = -0.5  # the unique smallest
    H.get_host("magnitude").prune(model, 3)
    m0, m2 = masks(model)
    assert m0[3, 2] == 0
    # two more ties at |w| = 1: the first flat indices of layer 0
    assert m0.reshape(-1)[:2].tolist() == [0.0, 0.0] and m0.reshape(-1)[2:].sum() == 9
    assert m2.sum() == 8


def test_random_prunes_exact_count_deterministically_and_never_revives():
    a, b = tiny(), tiny()
    H.get_host("random", seed=5).prune(a, 0.3)
    H.get_host("random", seed=5).prune(b, 0.3)
    assert all(torch.equal(x, y) for x, y in zip(masks(a), masks(b)))
    assert int(flat(masks(a)).sum()) == 20 - 6
    before = flat(masks(a))
    H.get_host("random", seed=6).prune(a, 0.5)
    after = flat(masks(a))
    assert int(after.sum()) == 14 - 7 and bool((after <= before).all())


def test_snip_scores_equal_abs_grad_times_weight():
    model = tiny()
    x, y = batch()
    # by hand, on a plain copy
    w1 = model[0].weight.detach().clone().requires_grad_(True)
    w2 = model[2].weight.detach().clone().requires_grad_(True)
    out = torch.relu(x @ w1.T + model[0].bias) @ w2.T + model[2].bias
    g1, g2 = torch.autograd.grad(nn.functional.cross_entropy(out, y), (w1, w2))
    s1, s2 = H.snip_scores(model, H.prunable_parameters(model), (x, y))
    torch.testing.assert_close(s1, (g1 * w1).abs().detach())
    torch.testing.assert_close(s2, (g2 * w2).abs().detach())
    # and the host removes the lowest |g*w|
    H.get_host("snip").prune(model, 5, batch=(x, y))
    exp = torch.ones(20)
    exp[flat([s1, s2]).argsort()[:5]] = 0
    assert torch.equal(flat(masks(model)), exp)


def test_snip_needs_a_batch():
    with pytest.raises(ConfigError, match="needs a batch"):
        H.get_host("snip").prune(tiny(), 0.2)


def _explicit_grasp(model, x, y, T, mask1=None):
    """-w * (H g) with H from torch.autograd.functional.hessian on the flat weight vector."""
    b1, b2 = model[0].bias.detach(), model[2].bias.detach()
    w1 = model[0].weight.detach().clone()
    w2 = model[2].weight.detach().clone()
    m1 = mask1 if mask1 is not None else torch.ones_like(w1)
    n1 = w1.numel()

    def loss(v):
        a = (v[:n1].reshape(w1.shape) * m1)
        out = torch.relu(x @ a.T + b1) @ v[n1:].reshape(w2.shape).T + b2
        return nn.functional.cross_entropy(out / T, y)

    v = torch.cat([w1.reshape(-1), w2.reshape(-1)]).double()
    x, y = x.double(), y
    b1, b2 = b1.double(), b2.double()
    m1 = m1.double()
    g = torch.autograd.functional.jacobian(loss, v)
    hess = torch.autograd.functional.hessian(loss, v)
    hg = hess @ g
    eff = v.clone()
    eff[:n1] = eff[:n1] * m1.reshape(-1)
    return -eff * hg


@pytest.mark.parametrize("T", [1.0, 200.0])
def test_grasp_equals_explicit_hessian_gradient_product(T):
    model = tiny().double()
    x, y = batch()
    x = x.double()
    got = flat(H.grasp_scores(model, H.prunable_parameters(model), (x, y), temperature=T))
    exp = _explicit_grasp(model, x, y, T)
    torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-12)
    assert exp.abs().max() > 0  # not a vacuous comparison


def test_grasp_with_mask_uses_the_pruned_network_and_removes_highest_scores():
    model = tiny().double()
    x, y = batch()
    x = x.double()
    m1 = torch.ones(4, 3, dtype=torch.float64)
    m1[0, 0] = m1[2, 1] = 0
    prune.custom_from_mask(model[0], "weight", m1)
    got = flat(H.grasp_scores(model, H.prunable_parameters(model), (x, y), temperature=1.0))
    exp = _explicit_grasp(model, x, y, 1.0, mask1=m1)
    alive = flat([m1, torch.ones(2, 4, dtype=torch.float64)]) > 0
    torch.testing.assert_close(got[alive], exp[alive], rtol=1e-6, atol=1e-12)
    # the host removes the 4 highest-scoring survivors
    H.GraSP(temperature=1.0).prune(model, 4, batch=(x, y))
    cand = torch.nonzero(alive).reshape(-1)
    drop = cand[exp[cand].argsort(descending=True)[:4]]
    exp_mask = alive.double()
    exp_mask[drop] = 0
    assert torch.equal(flat(masks(model)), exp_mask)


def test_synflow_scores_by_hand_one_round():
    model = tiny(bias=False).double()
    W1, W2 = model[0].weight.detach().abs(), model[2].weight.detach().abs()
    s1, s2 = H.synflow_scores(model, H.prunable_parameters(model), input_shape=(3,))
    # R = 1^T |W2| |W1| 1: dR/d|W1|_ij = sum_k |W2|_ki, dR/d|W2|_ki = sum_j |W1|_ij
    torch.testing.assert_close(s1, W2.sum(0)[:, None].expand_as(W1) * W1)
    torch.testing.assert_close(s2, W1.sum(1)[None, :].expand_as(W2) * W2)
    # the model itself is untouched (signs kept)
    assert (model[0].weight < 0).any()


class Exploding:
    def __iter__(self):
        raise AssertionError("synflow touched the data")

    def __getitem__(self, i):
        raise AssertionError("synflow touched the data")


def test_synflow_is_data_free_and_iterative(monkeypatch):
    a, b, c = MLP(hidden=(16, 8)), MLP(hidden=(16, 8)), MLP(hidden=(16, 8))
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    calls = []
    real = H.synflow_scores
    monkeypatch.setattr(H, "synflow_scores", lambda *aa, **kk: calls.append(1) or real(*aa, **kk))
    H.SynFlow(rounds=10).prune(a, 0.9, batch=Exploding())
    assert len(calls) == 10  # re-scored every round
    H.SynFlow(rounds=10).prune(b, 0.9, batch=(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)))
    assert all(torch.equal(x, y) for x, y in zip(masks(a), masks(b)))
    total = sum(m.numel() for m in masks(a))
    assert int(flat(masks(a)).sum()) == total - int(0.9 * total)
    # iterative differs from one-shot at this sparsity (the point of SynFlow's rounds)
    H.SynFlow(rounds=1).prune(c, 0.9)
    assert not all(torch.equal(x, y) for x, y in zip(masks(a), masks(c)))


def test_synflow_handles_batchnorm_net_and_never_prunes_bn_or_bias():
    model = SmallResNet()
    H.SynFlow(rounds=5).prune(model, 0.5)
    for name, mod in model.named_modules():
        assert not hasattr(mod, "bias_mask")
        if isinstance(mod, nn.BatchNorm2d):
            assert not hasattr(mod, "weight_mask"), name
    assert sum(1 for _ in model.named_buffers() if _[0].endswith("weight_mask")) == len(H.prunable_parameters(model))


@pytest.mark.parametrize("name", list(H.HOSTS))
def test_every_host_leaves_bias_and_bn_alone_and_prune_remove_works(name):
    model = SmallResNet()
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "bn" in k or "bias" in k}
    x = torch.randn(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    res = H.get_host(name).prune(model, 0.3, batch=(x, y))
    assert res.pruned == int(0.3 * res.total)
    for k, v in model.state_dict().items():
        assert not (k.endswith("bias_mask") or (".bn" in k and k.endswith("_mask")))
        if k in bn_before:
            assert torch.equal(v, bn_before[k]), k  # running stats restored after scoring
    for m, n in H.prunable_parameters(model):
        prune.remove(m, n)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in H.prunable_parameters(model))
    assert zeros >= res.pruned


def test_bias_and_norm_parameters_are_rejected():
    model = SmallResNet()
    with pytest.raises(ConfigError, match="never pruned"):
        H.get_host("magnitude").prune(model, 0.1, parameters=[(model.stem[1], "weight")])
    with pytest.raises(ConfigError, match="never pruned"):
        H.get_host("magnitude").prune(model, 0.1, parameters=[(model.fc, "bias")])


def test_unknown_host_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        H.get_host("obd")
    for name in ("magnitude", "imp", "random", "snip", "grasp", "synflow"):
        assert name in str(err.value)


def test_no_prunable_weights():
    with pytest.raises(ConfigError, match="no prunable weights"):
        H.get_host("magnitude").prune(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()), 0.5)


def test_bad_amounts():
    with pytest.raises(ConfigError):
        H.get_host("magnitude").prune(tiny(), 1.5)
    with pytest.raises(ConfigError):
        H.get_host("magnitude").prune(tiny(), 21)
