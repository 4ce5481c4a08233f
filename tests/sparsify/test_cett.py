import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.sparsify.cett import cett_value, neuron_thresholds, threshold_for_cett


def brute_force(h, w, target):
    """Largest candidate score tau with cett(tau) <= target, scanning every candidate."""
    c = w.norm(dim=0)
    cands = torch.unique((h.abs() * c).reshape(-1)).tolist()
    best = 0.0
    for tau in cands:
        if cett_value(h, w, tau) <= target:
            best = tau
        else:
            break
    return best


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 12), n=st.integers(1, 10), d=st.integers(1, 6), target=st.floats(0.0, 0.99),
       seed=st.integers(0, 2**16))
def test_bisection_matches_brute_force(tokens, n, d, target, seed):
    g = torch.Generator().manual_seed(seed)
    # nonnegative h and W: dropping more neurons never shrinks the dropped sum, so CETT is monotone
    h = torch.rand(tokens, n, generator=g, dtype=torch.float64)
    w = torch.rand(d, n, generator=g, dtype=torch.float64)
    tau, reached = threshold_for_cett(h, w, target)
    assert tau == brute_force(h, w, target)
    assert reached <= target + 1e-12
    assert abs(reached - cett_value(h, w, tau)) < 1e-12


def test_per_neuron_threshold_drops_the_same_set():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g)
    w = torch.randn(8, 32, generator=g)
    tau, _ = threshold_for_cett(h, w, 0.3)
    t = neuron_thresholds(tau, w)
    score = h.double().abs() * w.double().norm(dim=0)
    by_score = score <= tau
    by_neuron = h.abs() <= t
    assert (by_score != by_neuron).float().mean() < 1e-3  # fp32 rounding of t_i only
