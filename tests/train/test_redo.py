import math

import pytest
import torch
from torch import nn

from actsparse.train.redo import (dormant_masks, dormant_scores_by_site, drm_alpha, drm_perturb_, exploration_noise,
                                  mask_ratio, redo_reset_)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))


def _train_some(net, opt, steps=3):
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(16, 5)).pow(2).sum().backward()
        opt.step()


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)])
def test_redo_resets_exactly_the_dormant(opt_cls):
    net = _net()
    opt = opt_cls(net.parameters()) if opt_cls is torch.optim.Adam else opt_cls(net.parameters())
    _train_some(net, opt)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state_before = {id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                    for p in net.parameters()}
    mask = torch.tensor([True, False, False, True, False, False, False, True])
    torch.manual_seed(123)
    n = redo_reset_(net[2 - 2], net[2], mask, opt)
    assert n == 3
    after = net.state_dict()
    w_in, b_in, w_out = after["0.weight"], after["0.bias"], after["2.weight"]
    # incoming rows re-initialised (changed, within the kaiming bound), others identical
    bound = 1 / math.sqrt(5)
    assert not torch.equal(w_in[mask], before["0.weight"][mask])
    assert w_in[mask].abs().max() <= bound
    assert torch.equal(w_in[~mask], before["0.weight"][~mask])
    assert (b_in[mask] == 0).all() and torch.equal(b_in[~mask], before["0.bias"][~mask])
    assert (w_out[:, mask] == 0).all() and torch.equal(w_out[:, ~mask], before["2.weight"][:, ~mask])
    for k in ("2.bias", "4.weight", "4.bias"):
        assert torch.equal(after[k], before[k])
    params = dict(net.named_parameters())
    touched = {"0.weight": (0, mask), "0.bias": (0, mask), "2.weight": (1, mask)}
    for name, p in params.items():
        for key, old in state_before[id(p)].items():
            new = opt.state[p][key]
            if old.shape != p.shape:  # Adam's step counter
                assert torch.equal(new, old)
                continue
            if name in touched:
                dim, m = touched[name]
                sel = (slice(None),) * dim + (m,)
                keep = (slice(None),) * dim + (~m,)
                assert (new[sel] == 0).all()
                assert torch.equal(new[keep], old[keep])
            else:
                assert torch.equal(new, old)


def test_redo_scores_tau_gated_and_conv_flatten():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3)
    head = nn.Linear(4 * 5 * 5, 3)
    scores = torch.tensor([0.05, 1.0, 0.1, 2.0])  # dormant iff <= tau = 0.1
    w_before = head.weight.clone()
    assert redo_reset_(conv, head, scores, tau=0.1) == 2
    cols = torch.tensor([True, False, True, False]).repeat_interleave(25)
    assert (head.weight[:, cols] == 0).all() and torch.equal(head.weight[:, ~cols], w_before[:, ~cols])
    # gated MLP: gate and up rows, down columns
    gate, up, down = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 4)
    up_before = up.weight.clone()
    m = torch.tensor([False, True, False, False, False, False])
    assert redo_reset_((gate, up), down, m) == 1
    assert not torch.equal(up.weight[1], up_before[1]) and torch.equal(up.weight[0], up_before[0])
    assert (down.weight[:, 1] == 0).all()
    with pytest.raises(ValueError, match="neurons"):
        redo_reset_(gate, down, torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not match"):
        redo_reset_(gate, nn.Linear(7, 2), m)
    assert redo_reset_(gate, down, torch.zeros(6, dtype=torch.bool)) == 0


def test_dormant_masks_from_capture(monkeypatch):
    monkeypatch.setenv("ACTSPARSE_DISABLE_NUMBA", "1")  # torch path: no numba start-up in this quick test
    net = _net()
    with torch.no_grad():
        net[0].bias[[2, 5]] = -100.0  # these ReLUs never fire: dormant
    batches = [torch.randn(32, 5) for _ in range(3)]
    masks = dormant_masks(net, batches, sites=["1"], tau=0.1)
    m = masks["1:output"]
    assert m[2] and m[5]
    scores = dormant_scores_by_site(net, batches, ["1"])["1:output"]
    # brute force: E|v_i| / mean_k E|v_k|
    with torch.no_grad():
        v = torch.cat([net[1](net[0](b)) for b in batches]).abs().mean(0)
    torch.testing.assert_close(scores, (v / v.mean()).float(), rtol=1e-5, atol=1e-6)
    assert mask_ratio(masks) == pytest.approx(float(m.float().mean()))


def test_drm_formulas():
    assert drm_alpha(0.0) == 0.9
    assert drm_alpha(0.2) == pytest.approx(0.6)
    assert drm_alpha(0.5) == 0.2 and drm_alpha(1.0) == 0.2
    assert drm_alpha(0.1, alpha_min=0.5, alpha_max=0.7) == 0.7
    assert exploration_noise(0.2) == pytest.approx(0.5)
    assert exploration_noise(0.0) == pytest.approx(1 / (1 + math.exp(2)))
    assert exploration_noise(1.0) == pytest.approx(1 / (1 + math.exp(-8)))
    net = _net()
    theta = {k: v.clone() for k, v in net.state_dict().items()}
    phi = _net(seed=7)
    drm_perturb_(net, 0.25, phi=phi)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, 0.25 * theta[k] + 0.75 * phi.state_dict()[k])
    net2 = _net()
    drm_perturb_(net2, 1.0)
    for k, v in net2.state_dict().items():
        assert torch.equal(v, theta[k])
    with pytest.raises(ValueError):
        drm_perturb_(net2, 1.5)
