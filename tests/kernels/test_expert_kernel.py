"""The expert-block MLP kernel against its masked-dense reference (hypothesis over shapes,
expert counts, top-k, dtypes, activations and threads), and on a real SmolLM2 MLP split
into experts by :class:`actsparse.moe.modules.ExpertMLP`."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from actsparse.kernels import expert_mlp_step
from actsparse.kernels import reference as ref
from test_kernels import DTYPES, RTOL, SETTINGS, _check, needs_numba, threads  # noqa: F401  (threads: a fixture)


def _case(g, d, experts, m, dtype):
    f = experts * m
    x = torch.randn(d, generator=g).to(dtype)
    w_gate = (torch.randn(f, d, generator=g) / math.sqrt(d)).to(dtype)
    w_up = (torch.randn(f, d, generator=g) / math.sqrt(d)).to(dtype)
    wt_down = (torch.randn(f, d, generator=g) / math.sqrt(f)).to(dtype)
    router_w = torch.randn(experts, d, generator=g).to(dtype)
    router_b = torch.randn(experts, generator=g)
    return x, w_gate, w_up, wt_down, router_w, router_b


@needs_numba
@SETTINGS
@given(
    data=st.data(),
    d=st.integers(1, 96),
    experts=st.sampled_from([1, 2, 3, 4, 8]),
    m=st.integers(1, 40),
    dt=st.sampled_from(["fp32", "bf16"]),
    act=st.sampled_from(list(ref.ACTIVATIONS)),
    nthreads=st.sampled_from([1, 2]),
)
def test_expert_mlp_step_matches_masked_dense(threads, data, d, experts, m, dt, act, nthreads):
    threads(nthreads)
    top_k = data.draw(st.integers(1, experts))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x, w_gate, w_up, wt_down, router_w, router_b = _case(g, d, experts, m, DTYPES[dt])
    x64 = x.double()
    scores = router_w.double() @ x64 + router_b.double()
    if top_k < experts:  # a clear gap at the top-k boundary, so the choice is not a rounding tie
        s = torch.sort(scores, descending=True).values
        assume(float(s[top_k - 1] - s[top_k]) > 1e-3 * (1 + float(s.abs().max())))

    y, chosen = expert_mlp_step(x, w_gate, w_up, wt_down, router_w, router_b, top_k, act, return_chosen=True)
    y64, chosen64 = ref.expert_mlp_step_ref(x64, w_gate.double(), w_up.double(), wt_down.double(),
                                            router_w.double(), router_b.double(), top_k, act, return_chosen=True,
                                            compute_dtype=torch.float64)
    assert chosen.tolist() == chosen64.tolist()
    keep = torch.zeros(experts, dtype=torch.float64)
    keep[chosen64] = 1.0
    keep = keep.repeat_interleave(m)
    a = ref.activation(w_gate.double() @ x64, act)
    u = w_up.double() @ x64
    gx = w_gate.double().abs() @ x64.abs()
    ux = w_up.double().abs() @ x64.abs()
    dh = (a.abs() * ux + u.abs() * 1.2 * gx + (a * u).abs()) * keep
    assert y.dtype == x.dtype
    _check(y, y64, RTOL * (dh @ wt_down.double().abs()), f"{dt} {act} d={d} E={experts} m={m} k={top_k}")


@needs_numba
def test_all_experts_is_the_dense_mlp(threads):
    """top_k = E reads every neuron: the dense gated MLP."""
    g = torch.Generator().manual_seed(3)
    x, w_gate, w_up, wt_down, router_w, router_b = _case(g, 64, 4, 24, torch.float32)
    dense = wt_down.t() @ (torch.nn.functional.silu(w_gate @ x) * (w_up @ x))
    for n in (1, 2):
        threads(n)
        torch.testing.assert_close(expert_mlp_step(x, w_gate, w_up, wt_down, router_w, router_b, 4), dense,
                                   rtol=1e-5, atol=1e-5)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_smollm2_mlp_split_into_experts(smollm2, threads, dtype):
    """A real SmolLM2 MLP in 16 experts (a random permutation and router): the kernel on its
    permuted weights equals ExpertMLP's masked-dense forward on real hidden states."""
    from actsparse.moe.modules import ExpertMLP

    model, tok = smollm2
    mlp = model.model.layers[7].mlp
    width, hidden = mlp.gate_proj.weight.shape
    g = torch.Generator().manual_seed(0)
    expert = ExpertMLP(mlp, torch.randperm(width, generator=g), torch.randn(16, hidden, generator=g) / 24,
                       torch.zeros(16), top_k=8)
    ids = tok("The history of Paris begins with a Celtic tribe on an island in the Seine.",
              return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        xs = model.model.layers[7].post_attention_layernorm(out.hidden_states[7][0])
        ref_y = expert.masked_dense(xs)
    wt_down = expert.down.t().contiguous().to(dtype)
    gate, up, rw = expert.gate.to(dtype), expert.up.to(dtype), expert.router.weight.to(dtype)
    rb = expert.router.bias.float()
    threads(2)
    for t in range(xs.shape[0]):
        x = xs[t]
        with torch.no_grad():
            chosen_ref = torch.sort(expert.route(x[None])[0]).values
        y, chosen = expert_mlp_step(x.to(dtype), gate, up, wt_down, rw, rb, 8, return_chosen=True)
        if dtype == torch.float32:
            assert chosen.tolist() == chosen_ref.tolist()
            torch.testing.assert_close(y, ref_y[t], rtol=1e-4, atol=1e-4)
        else:  # bf16 weights and input: against the reference on the same bf16 values
            y_ref = ref.expert_mlp_step_ref(x.to(dtype), gate, up, wt_down, rw, rb, 8)
            torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


def test_bad_inputs_raise():
    w = torch.randn(12, 8)
    x, rw, rb = torch.randn(8), torch.randn(4, 8), torch.randn(4)
    with pytest.raises(ValueError, match="do not split"):
        expert_mlp_step(x, w, w, w, torch.randn(5, 8), torch.randn(5), 2)
    with pytest.raises(ValueError, match="top_k must be"):
        expert_mlp_step(x, w, w, w, rw, rb, 5)
    with pytest.raises(ValueError, match="router must be"):
        expert_mlp_step(x, w, w, w, torch.randn(4, 7), rb, 2)
    with pytest.raises(ValueError, match="features"):
        expert_mlp_step(torch.randn(7), w, w, w, rw, rb, 2)
    with pytest.raises(ValueError, match="unknown activation"):
        expert_mlp_step(x, w, w, w, rw, rb, 2, act="tanh")


def test_batched_input_uses_the_reference():
    g = torch.Generator().manual_seed(1)
    _, w_gate, w_up, wt_down, router_w, router_b = _case(g, 16, 4, 6, torch.float32)
    xb = torch.randn(3, 16, generator=g)
    y = expert_mlp_step(xb, w_gate, w_up, wt_down, router_w, router_b, 2)
    rows = torch.stack([expert_mlp_step(r, w_gate, w_up, wt_down, router_w, router_b, 2) for r in xb])
    torch.testing.assert_close(y, rows, rtol=1e-5, atol=1e-5)
