"""The contrast statistics, the permutation test and Benjamini-Hochberg against brute force."""
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from actsparse.measure.permutation import benjamini_hochberg, permutation_test, statistic


def ref_statistic(x, in_a, kind):
    """One unit at a time, with numpy's own mean and variance."""
    out = []
    for col in x.T:
        a, b = col[in_a], col[~in_a]
        diff = a.mean() - b.mean()
        if kind == "difference":
            out.append(diff)
            continue
        sd = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
        scale = abs(a.mean()) + abs(b.mean())
        if sd <= 1e-7 * max(scale, 1e-300):
            out.append(0.0 if abs(diff) <= 1e-7 * scale else math.copysign(math.inf, diff))
        else:
            out.append(diff / sd)
    return np.array(out)


def ref_exact_p(x, in_a, kind):
    n, n_a = len(in_a), int(in_a.sum())
    obs = np.abs(ref_statistic(x, in_a, kind))
    hits = np.zeros(x.shape[1])
    combos = list(itertools.combinations(range(n), n_a))
    for c in combos:
        lab = np.zeros(n, bool)
        lab[list(c)] = True
        hits += np.abs(ref_statistic(x, lab, kind)) >= obs * (1 - 1e-9)
    return hits / len(combos)


@settings(max_examples=25, deadline=None)
@given(n_a=st.integers(2, 4), n_b=st.integers(2, 4), units=st.integers(1, 5), seed=st.integers(0, 10_000),
       kind=st.sampled_from(["difference", "standardized"]), ties=st.booleans())
def test_exact_test_matches_brute_force(n_a, n_b, units, seed, kind, ties):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_a + n_b, units))
    if ties:  # few distinct values: many assignments tie with the observed one
        x = np.round(x)
    in_a = np.zeros(n_a + n_b, bool)
    in_a[rng.choice(n_a + n_b, n_a, replace=False)] = True
    res = permutation_test(x, in_a, kind=kind, permutations=10_000)
    assert res["exact"] and res["assignments"] == math.comb(n_a + n_b, n_a)
    np.testing.assert_allclose(res["statistic"], ref_statistic(x, in_a, kind), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(res["p"], ref_exact_p(x, in_a, kind))


def test_known_separation_has_the_smallest_possible_p():
    # unit 0 separates A from B perfectly; unit 1 is noise; unit 2 constant
    in_a = np.array([True] * 4 + [False] * 4)
    x = np.stack([np.r_[5.0, 6, 7, 8, 1, 2, 3, 4], np.r_[1.0, 2, 1, 2, 2, 1, 2, 1], np.ones(8)], axis=1)
    res = permutation_test(x, in_a, kind="difference", permutations=1000)
    assert res["statistic"][0] == pytest.approx(4.0)
    assert res["p"][0] == pytest.approx(2 / 70)  # the observed split and its mirror
    assert res["p"][1] == 1.0 and res["statistic"][2] == 0.0 and res["p"][2] == 1.0


def test_monte_carlo_p_agrees_with_the_exact_p():
    rng = np.random.default_rng(1)
    in_a = np.array([True] * 6 + [False] * 6)
    x = rng.normal(size=(12, 6)) + np.r_[0, 0.5, 1, 1.5, 2, 3][None, :] * in_a[:, None]
    exact = permutation_test(x, in_a, permutations=10_000)  # C(12, 6) = 924 assignments
    mc = permutation_test(x, in_a, permutations=800, seed=3)
    assert exact["exact"] and not mc["exact"] and mc["assignments"] == 800
    sd = np.sqrt(exact["p"] * (1 - exact["p"]) / 800) + 2 / 800
    assert np.all(np.abs(mc["p"] - exact["p"]) <= 4 * sd)
    assert np.all(mc["p"] > 0)  # (1 + hits) / (1 + n): never 0
    again = permutation_test(x, in_a, permutations=800, seed=3)
    np.testing.assert_array_equal(mc["p"], again["p"])


def test_standardized_is_cohens_d_and_flat_units():
    in_a = np.array([True, True, False, False])
    x = np.array([[1.0, 2, 3], [3.0, 2, 3], [0.0, 1, 3], [2.0, 1, 3]])
    d = statistic(x, in_a, "standardized")
    assert d[0] == pytest.approx(1 / math.sqrt(2))  # means 2 and 1, variances 2 and 2
    assert d[1] == math.inf and d[2] == 0.0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=30))
def test_benjamini_hochberg_matches_its_definition(ps):
    p = np.array(ps)
    m = p.size
    rank = np.argsort(np.argsort(p, kind="stable"), kind="stable") + 1
    ref = np.array([min(1.0, min(p[j] * m / rank[j] for j in range(m) if p[j] >= p[i])) for i in range(m)])
    np.testing.assert_allclose(benjamini_hochberg(p), ref, rtol=1e-12)


def test_refuses_too_few_prompts_and_non_finite_values():
    with pytest.raises(ValueError, match="at least 2 prompts"):
        permutation_test(np.ones((3, 2)), np.array([True, False, False]), kind="standardized")
    with pytest.raises(ValueError, match="NaN"):
        permutation_test(np.array([[np.nan], [1.0], [2.0]]), np.array([True, False, False]), kind="difference")
    with pytest.raises(ValueError, match="statistic"):
        permutation_test(np.ones((4, 1)), np.array([True, True, False, False]), kind="t")
