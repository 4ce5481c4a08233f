"""Balanced clustering, the expert permutation, the routers' fit and recall, the expert MLP
against its masked-dense reference (and that against the unpermuted MLP, masked by hand)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from actsparse.errors import ConfigError
from actsparse.moe.clustering import balanced_kmeans, check_experts, expert_permutation
from actsparse.moe.modules import ExpertMLP, permute_mlp_
from actsparse.moe.router import expert_mass, recall, topk_indicator, train_router


# ---------------------------------------------------------------- clustering
def planted_correlation(experts: int, size: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Neurons of one planted group fire together: a block-structured 0/1 activity matrix."""
    rng = np.random.default_rng(seed)
    truth = rng.permutation(np.repeat(np.arange(experts), size))
    tokens = rng.integers(experts, size=4000)
    active = (truth[None, :] == tokens[:, None]) & (rng.random((4000, truth.size)) < 0.9)
    active |= rng.random(active.shape) < 0.02
    a = torch.from_numpy(active.astype(np.float64))
    co = a.T @ a
    d = co.diagonal().clamp_min(1).sqrt()
    return co / d[:, None] / d[None, :], truth


@pytest.mark.parametrize("experts,size", [(4, 6), (8, 12)])
def test_balanced_kmeans_recovers_planted_groups(experts, size):
    corr, truth = planted_correlation(experts, size, seed=experts)
    labels = balanced_kmeans(corr, experts, seed=0).numpy()
    assert np.bincount(labels, minlength=experts).tolist() == [size] * experts
    # the same partition up to renaming: each found cluster is one planted group
    for e in range(experts):
        assert len(set(truth[labels == e])) == 1


@settings(max_examples=20, deadline=None)
@given(experts=st.sampled_from([1, 2, 3, 4, 6]), size=st.integers(1, 8), seed=st.integers(0, 1000))
def test_balanced_and_deterministic(experts, size, seed):
    x = torch.randn(experts * size, 10, generator=torch.Generator().manual_seed(seed))
    a = balanced_kmeans(x, experts, seed=seed)
    assert torch.equal(a, balanced_kmeans(x, experts, seed=seed))
    assert torch.bincount(a, minlength=experts).tolist() == [size] * experts
    perm = expert_permutation(a, experts)
    assert sorted(perm.tolist()) == list(range(experts * size))
    blocks = a[perm].reshape(experts, size)  # expert e's neurons form block e
    assert torch.equal(blocks, torch.arange(experts)[:, None].expand(experts, size))


def test_refusals():
    with pytest.raises(ConfigError, match="equal experts"):
        check_experts(10, 3)
    with pytest.raises(ConfigError, match="top_k"):
        check_experts(12, 3, 4)
    with pytest.raises(ConfigError, match="equally"):
        expert_permutation(torch.tensor([0, 0, 1]), 2)


# ---------------------------------------------------------------- router
def test_router_fits_an_exact_log_linear_mass():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 7, generator=g) * 0.5 + 1  # log-mass well above the floor
    w, b = torch.randn(5, 7, generator=g), torch.randn(5, generator=g)
    w_fit, b_fit = train_router(x, torch.exp(x @ w.T + b), ridge=0.0)
    torch.testing.assert_close(w_fit, w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b_fit, b, atol=1e-4, rtol=1e-4)


def test_expert_mass_and_recall_against_brute_force():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 12, generator=g)
    perm = torch.randperm(12, generator=g)
    mass = expert_mass(h, perm, 3)
    for t in range(40):
        for e in range(3):
            assert abs(float(mass[t, e]) - float(h[t, perm[4 * e:4 * e + 4]].abs().sum())) < 1e-5
    chosen = torch.randint(0, 3, (40, 1), generator=g)
    oracle = mass.argmax(1)
    r = recall(chosen, mass, 1)
    assert r["recall"] == pytest.approx(float((chosen[:, 0] == oracle).float().mean()))
    assert r["mass_recall"] == pytest.approx(float((mass.gather(1, chosen)[:, 0] / mass.max(1).values).mean()), rel=1e-6)
    assert topk_indicator(mass, 2).sum(1).eq(2).all()


# ---------------------------------------------------------------- expert MLP
def tiny_mlp(hidden: int, width: int, seed: int, bias: bool = False) -> LlamaMLP:
    torch.manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=width, hidden_act="silu", mlp_bias=bias,
                                num_attention_heads=1, num_key_value_heads=1))
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return mlp


@settings(max_examples=30, deadline=None)
@given(experts=st.sampled_from([1, 2, 4, 8]), size=st.integers(1, 5), hidden=st.sampled_from([2, 4, 6, 8]),
       rows=st.integers(1, 12), k_frac=st.floats(0, 1), seed=st.integers(0, 1000), bias=st.booleans())
def test_expert_mlp_matches_masked_dense_and_the_hand_masked_original(experts, size, hidden, rows, k_frac, seed, bias):
    width = experts * size
    top_k = 1 + int(k_frac * (experts - 1))
    mlp = tiny_mlp(hidden, width, seed, bias)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(width, generator=g)
    rw, rb = torch.randn(experts, hidden, generator=g), torch.randn(experts, generator=g)
    moe = ExpertMLP(mlp, perm, rw, rb, top_k)
    x = torch.randn(2, rows, hidden, generator=g)
    with torch.no_grad():
        out, ref = moe(x), moe.masked_dense(x)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        # the reference itself, by hand on the unpermuted MLP: keep the original neurons perm[block e]
        flat = x.reshape(-1, hidden)
        chosen = (flat @ rw.T + rb).topk(top_k, dim=1).indices
        h = mlp.act_fn(mlp.gate_proj(flat)) * mlp.up_proj(flat)
        keep = torch.zeros(flat.shape[0], width)
        for t in range(flat.shape[0]):
            for e in chosen[t].tolist():
                keep[t, perm[e * size:(e + 1) * size]] = 1
        torch.testing.assert_close(ref.reshape(-1, hidden), mlp.down_proj(h * keep), atol=1e-5, rtol=1e-5)
        moe.routing = "oracle"  # the top-k experts by true |h| mass
        mass = h.abs()[:, perm].reshape(flat.shape[0], experts, size).sum(-1)
        assert torch.equal(torch.sort(moe.route(flat), 1).values, torch.sort(mass.topk(top_k, 1).indices, 1).values)
        torch.testing.assert_close(moe(x), moe.masked_dense(x), atol=1e-5, rtol=1e-5)
        if top_k == experts:  # every expert: the dense MLP
            torch.testing.assert_close(out, mlp(x), atol=1e-5, rtol=1e-5)


def test_permute_in_place_preserves_the_function():
    mlp = tiny_mlp(6, 12, 3, bias=True)
    x = torch.randn(5, 6)
    with torch.no_grad():
        before = mlp(x)
        permute_mlp_(mlp, torch.randperm(12))
        torch.testing.assert_close(mlp(x), before, atol=1e-5, rtol=1e-5)


def test_expert_mlp_refuses_bad_parts():
    mlp = tiny_mlp(4, 8, 0)
    with pytest.raises(ConfigError, match="permutation"):
        ExpertMLP(mlp, torch.tensor([0] * 8), torch.zeros(2, 4), torch.zeros(2), 1)
    with pytest.raises(ConfigError, match="router"):
        ExpertMLP(mlp, torch.arange(8), torch.zeros(2, 5), torch.zeros(2), 1)
    with pytest.raises(ConfigError, match="equal experts"):
        ExpertMLP(mlp, torch.arange(8), torch.zeros(3, 4), torch.zeros(3), 1)
