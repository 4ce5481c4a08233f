"""The streaming co-activation counts against a brute-force numpy reference."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from actsparse.errors import ConfigError
from actsparse.measure.coactivation import Coactivation, active_count


def brute_force(values: np.ndarray, k: int):
    """Per token, the k largest |v| are active; co[i, j] counts tokens with both active."""
    a = np.zeros(values.shape, dtype=np.int64)
    for r, row in enumerate(np.abs(values)):
        a[r, np.argsort(-row, kind="stable")[:k]] = 1
    return a.T @ a, np.abs(values).astype(np.float64).sum(0)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 300), width=st.integers(1, 40), rate=st.floats(0.01, 1.0), seed=st.integers(0, 10**6),
       split=st.integers(0, 300))
def test_counts_match_brute_force_and_merge_exactly(rows, width, rate, seed, split):
    v = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    k = active_count(rate, width)
    co_ref, abs_ref = brute_force(v, k)
    whole = Coactivation(width, rate)
    whole.update(torch.from_numpy(v))
    assert whole.rows == rows and whole.k == k
    np.testing.assert_array_equal(whole.co.numpy(), co_ref)
    np.testing.assert_allclose(whole.abs_sum.numpy(), abs_ref, rtol=1e-6)
    assert int(whole.active.sum()) == rows * k
    # any split of the tokens merges into the same counts
    split = min(split, rows)
    a, b = Coactivation(width, rate), Coactivation(width, rate)
    a.update(torch.from_numpy(v[:split]))
    b.update(torch.from_numpy(v[split:]))
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.co.numpy(), co_ref)
    assert merged.rows == rows
    again = Coactivation.from_tensors(merged.to_tensors("x."), "x.")
    np.testing.assert_array_equal(again.co.numpy(), co_ref)
    assert (again.rows, again.rate) == (rows, rate)


def test_sequences_exclude_padding_and_nonfinite_rows():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((2, 7, 9)).astype(np.float32)
    valid = np.ones((2, 7), dtype=bool)
    valid[1, 4:] = False
    v[0, 2, 3] = np.nan
    acc = Coactivation(9, 0.3)
    acc.update(torch.from_numpy(v), torch.from_numpy(valid))
    kept = v[valid]
    finite = np.isfinite(kept).all(1)
    co_ref, _ = brute_force(kept[finite], acc.k)
    np.testing.assert_array_equal(acc.co.numpy(), co_ref)
    assert acc.rows == int(finite.sum()) and acc.nonfinite_rows == 1


def test_chunking_gives_the_same_counts(monkeypatch):
    from actsparse.measure import coactivation

    v = torch.randn(50, 12)
    one = Coactivation(12, 0.25)
    one.update(v)
    monkeypatch.setattr(coactivation, "CHUNK_ROWS", 7)
    many = Coactivation(12, 0.25)
    many.update(v)
    assert torch.equal(one.co, many.co)


def test_refusals():
    with pytest.raises(ConfigError, match="rate"):
        Coactivation(8, 0.0)
    with pytest.raises(ValueError, match="width"):
        Coactivation(8, 0.5).merge(Coactivation(9, 0.5))
    with pytest.raises(ValueError, match=r"\(rows, 8\)"):
        Coactivation(8, 0.5).update(torch.randn(3, 7))
