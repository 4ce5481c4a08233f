"""AP picks exactly the specified weights, composes with torch.nn.utils.prune, never revives."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn.utils import prune

from actsparse.errors import ConfigError
from actsparse.prune import hosts as H
from actsparse.prune.ap import (ActivatingWhilePruning, ap_prune, ap_select, prune_cycle, snapshot_weights,
                                split_counts)


def linear(w):
    m = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        m.weight.copy_(w)
    return m


def hand_example():
    """2x4 weight; start/end chosen so the AP order is known by hand."""
    # dyadic values so equal movements are exact ties
    end = torch.tensor([[-1.0, 0.5, -0.25, -0.375],
                        [-0.5, -0.875, 0.75, -0.125]])
    start = torch.tensor([[-1.125, 0.5, -0.5, -0.375],    # moved 1/8, (pos), 1/4, 0
                          [-0.375, -0.625, 0.125, -0.25]])  # moved 1/8, 1/4, (pos), 1/8
    return end, start


def test_ap_picks_negative_least_moved_with_flat_index_ties():
    end, start = hand_example()
    model = nn.Sequential(linear(end))
    # negatives by movement: (0,3)=0 < (0,0) = (1,0) = (1,3) = 1/8 < (0,2) = (1,1) = 1/4
    res = ap_prune(model, 3, {"0.weight": start})
    assert res.pruned == 3
    mask = model[0].weight_mask
    expected = torch.ones(2, 4)
    expected[0, 3] = expected[0, 0] = expected[1, 0] = 0  # ties at 1/8: flat index 0, 4 before 7
    assert torch.equal(mask, expected)
    assert model[0].weight[0, 1] == 0.5  # positives untouched


def test_ap_never_revives_and_skips_pruned_weights():
    end, start = hand_example()
    model = nn.Sequential(linear(end))
    m0 = torch.ones(2, 4)
    m0[0, 3] = 0  # the least-moved negative is already pruned
    prune.custom_from_mask(model[0], "weight", m0)
    ap_prune(model, 2, {"0.weight": start})
    expected = m0.clone()
    expected[0, 0] = expected[1, 0] = 0
    assert torch.equal(model[0].weight_mask, expected)


def test_ap_shortfall_is_reported_not_filled_with_positives():
    end = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    model = nn.Sequential(linear(end))
    res = ap_prune(model, 3, [end.clone()])
    assert res.pruned == 1 and res.shortfall == 2
    assert torch.equal(model[0].weight_mask, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))


def test_split_counts_round_down():
    assert split_counts(1000, 0.2, 0.02) == (180, 20)
    assert split_counts(999, 0.2, 0.02) == (199 - 19, 19)
    assert split_counts(49, 0.2, 0.02) == (9, 0)


@pytest.mark.parametrize("rate,ap,match", [(0.2, 0.3, "must not exceed"), (0.2, -0.01, ">= 0"), (1.5, 0.0, "rate")])
def test_bad_rates(rate, ap, match):
    with pytest.raises(ConfigError, match=match):
        split_counts(100, rate, ap)


def test_prune_cycle_composes_host_then_ap_and_prune_remove_works():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    start = snapshot_weights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    end = snapshot_weights(model)
    res = prune_cycle(model, H.get_host("magnitude"), rate=0.2, ap=0.05, w_start=start)
    assert (res.survivors_before, res.host_pruned, res.ap_requested, res.ap_pruned) == (90, 18 - 4, 4, 4)
    assert res.survivors_after == 72
    # the AP picks = negative host-survivors with least movement, recomputed by hand
    model2 = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    model2.load_state_dict({k.replace("_orig", ""): v for k, v in model.state_dict().items() if "_mask" not in k})
    H.get_host("magnitude").prune(model2, 14)
    host_masks = [model2[0].weight_mask, model2[2].weight_mask]
    e = torch.cat([end["0.weight"].reshape(-1), end["2.weight"].reshape(-1)])
    s = torch.cat([start["0.weight"].reshape(-1), start["2.weight"].reshape(-1)])
    alive = torch.cat([m.reshape(-1) for m in host_masks]) > 0
    cand = torch.nonzero(alive & (e < 0)).reshape(-1)
    picks = cand[(e - s).abs()[cand].argsort()[:4]]
    final = torch.cat([model[0].weight_mask.reshape(-1), model[2].weight_mask.reshape(-1)])
    assert set(torch.nonzero((final == 0) & alive).reshape(-1).tolist()) == set(picks.tolist())
    assert isinstance(model[0]._forward_pre_hooks[next(iter(model[0]._forward_pre_hooks))], prune.PruningContainer)
    prune.remove(model[0], "weight")
    prune.remove(model[2], "weight")
    assert int((model[0].weight == 0).sum() + (model[2].weight == 0).sum()) == 18
    assert not hasattr(model[0], "weight_orig")


def test_prune_cycle_errors():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="must not exceed"):
        prune_cycle(model, H.get_host("magnitude"), rate=0.1, ap=0.2, w_start=snapshot_weights(model))
    with pytest.raises(ConfigError, match="w_start"):
        prune_cycle(model, H.get_host("magnitude"), rate=0.5, ap=0.2)
    with pytest.raises(ConfigError, match="no prunable weights"):
        prune_cycle(nn.Sequential(nn.ReLU()), H.get_host("magnitude"), rate=0.5)
    with pytest.raises(ConfigError, match="unknown host"):
        H.get_host("nope")


def test_prune_cycle_fills_ap_shortfall_with_host():
    model = nn.Sequential(linear(torch.tensor([[1.0, 2.0, 3.0, -4.0], [5.0, 6.0, 7.0, 8.0]])))
    res = prune_cycle(model, H.get_host("magnitude"), n_host=1, n_ap=2, w_start=[torch.zeros(2, 4)])
    assert (res.ap_pruned, res.host_fill, res.survivors_after) == (1, 1, 5)
    assert torch.equal(model[0].weight_mask, torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))


def test_pruning_method_composes_with_l1_unstructured_container():
    torch.manual_seed(3)
    lin = nn.Linear(5, 6)
    start = lin.weight.detach().clone() + 0.1 * torch.randn(6, 5)
    prune.l1_unstructured(lin, "weight", amount=8)
    before = lin.weight_mask.clone()
    ActivatingWhilePruning.apply(lin, "weight", amount=0.25, start=start)  # floor(.25 * 22) = 5
    assert isinstance(list(lin._forward_pre_hooks.values())[0], prune.PruningContainer)
    exp, k = ap_select([lin.weight_orig.detach()], [start], [before], 5)
    assert k == 5 and torch.equal(lin.weight_mask, exp[0])
    assert bool((lin.weight_mask <= before).all())
    prune.remove(lin, "weight")
    assert int((lin.weight == 0).sum()) == 13
    with pytest.raises(ConfigError, match="never pruned"):
        ActivatingWhilePruning.apply(lin, "bias", amount=1, start=lin.bias.detach())


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 30))
def test_ap_select_properties(seed, count):
    g = torch.Generator().manual_seed(seed)
    end = [torch.randn(4, 5, generator=g), torch.randn(3, generator=g)]
    start = [e + torch.randn(e.shape, generator=g).round() for e in end]  # many ties in movement
    masks = [(torch.rand(e.shape, generator=g) > 0.3).float() for e in end]
    new, k = ap_select(end, start, masks, count)
    old_f = torch.cat([m.reshape(-1) for m in masks])
    new_f = torch.cat([m.reshape(-1) for m in new])
    e = torch.cat([x.reshape(-1) for x in end])
    mv = torch.cat([(a.double() - b.double()).abs().reshape(-1) for a, b in zip(end, start)])
    elig = (old_f > 0) & (e < 0)
    assert k == min(count, int(elig.sum()))
    assert bool((new_f <= old_f).all())  # never revives
    removed = (old_f > 0) & (new_f == 0)
    assert int(removed.sum()) == k and bool((e[removed] < 0).all())
    if k and k < int(elig.sum()):
        # everything removed moved no more than everything kept; ties go to the smaller index
        kept = elig & ~removed
        assert mv[removed].max() <= mv[kept].min()
        thr = mv[removed].max()
        tie_kept = torch.nonzero(kept & (mv == thr)).reshape(-1)
        tie_rem = torch.nonzero(removed & (mv == thr)).reshape(-1)
        if len(tie_kept) and len(tie_rem):
            assert tie_rem.max() < tie_kept.min()
