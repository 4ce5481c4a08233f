import math

import pytest

from actsparse.errors import DataError
from actsparse.eval.perplexity import perplexity


def test_protocol_recorded_and_padding_skipped():
    import sys, pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "sparsify"))
    from sparsify_helpers import random_windows, tiny_llama

    model = tiny_llama()
    w = random_windows(n=3, window=32, pad_last=10)
    r = perplexity(model, w)
    assert r.window == 32 and r.stride == 32 and r.windows == 3
    assert r.tokens == 3 * 31 - 10
    assert math.isfinite(r.ppl) and r.ppl == pytest.approx(math.exp(r.nll))
    assert "3 x 32-token windows" in r.protocol
    with pytest.raises(DataError):
        perplexity(model, w, stride=16)


def test_sliding_equals_nonoverlapping_when_stride_is_window(smollm2):
    model, tok = smollm2
    docs = ["The quick brown fox jumps over the lazy dog. " * 20]
    a = perplexity(model, docs, tokenizer=tok, window=32, stride=32, tokens=96)
    assert a.tokens == 96  # every token of the stream is scored once (BOS starts each window)
    b = perplexity(model, docs, tokenizer=tok, window=32, stride=16, tokens=96)
    assert b.tokens == 96 and b.stride == 16
    assert b.ppl < a.ppl * 1.5


def test_ppl_p_search_bisects_once_per_knob(monkeypatch):
    import sys, pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "sparsify"))
    from sparsify_helpers import random_windows, tiny_llama

    import actsparse.sparsify.api as api
    from actsparse.eval.perplexity import ppl_p_search
    from actsparse.sparsify import TEAL, calibrate, is_sparsified

    model = tiny_llama()
    stats = calibrate(model, [TEAL()], random_windows())
    val = random_windows(n=2, seed=5)
    dense = perplexity(model, val).ppl
    calls = []
    real = api.sparsify_
    monkeypatch.setattr(api, "sparsify_", lambda *a, **k: (calls.append(a[1].sparsity), real(*a, **k))[1])
    r = ppl_p_search(model, lambda x: TEAL(sparsity=x), stats, val, dense, p=1.0, hi=0.8, steps=5)
    assert not is_sparsified(model)
    passing = [e["x"] for e in r["search"] if e["ppl"] <= dense * 1.01]
    assert r["knob"] == (max(passing) if passing else 0.0)
    assert r["ratio"] <= 1.01 and len(r["search"]) == 5
    assert len(calls) == len(set(calls)) == 5 + (0 if passing else 1)  # every knob value evaluated once
    assert r["protocol"]["resolution"] == pytest.approx(0.8 / 32)
    assert all("bytes_skipped" in e for e in r["search"])
    # an allowance so large that every step passes: the knob climbs to the top of the range
    r2 = ppl_p_search(model, lambda x: TEAL(sparsity=x), stats, val, dense, p=1e9, hi=0.8, steps=4)
    assert r2["knob"] == pytest.approx(0.8 * (1 - 1 / 16))
    assert r2["bytes_skipped"] > 0.5


def test_per_window_nll_and_paired_bootstrap():
    """Per-window sums add up to the perplexity, and the paired bootstrap interval of a ratio
    contains the ratio, is narrower than the unpaired one, and is degenerate for a model
    compared with itself."""
    import sys, pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "sparsify"))
    from sparsify_helpers import random_windows, tiny_llama

    from actsparse.eval.perplexity import bootstrap_ratio
    from actsparse.sparsify import TEAL, desparsify_, sparsify_

    model = tiny_llama()
    val = random_windows(n=6, seed=5)
    dense = perplexity(model, val)
    assert len(dense.window_nll) == 6 and sum(dense.window_tokens) == dense.tokens
    assert abs(sum(dense.window_nll) / dense.tokens - dense.nll) < 1e-12
    assert bootstrap_ratio(dense, dense) == (1.0, 1.0)
    sparsify_(model, TEAL(sparsity=0.6), calibration=random_windows())
    sparse = perplexity(model, val)
    desparsify_(model)
    lo, hi = bootstrap_ratio(sparse, dense)
    ratio = sparse.ppl / dense.ppl
    assert lo <= ratio <= hi and lo < hi
    plo, phi = sparse.interval()
    assert plo <= sparse.ppl <= phi


def test_rank_within_noise_ties_methods_closer_than_the_spread():
    """Exact answers on constructed per-window NLLs: B is worse than A by 0.05 nats in every
    window (a consistent gap: ranked), C differs from A by +-0.05 alternately (no consistent
    gap: tied with the best)."""
    from actsparse.eval.perplexity import rank_within_noise

    base = [2.0, 2.5, 3.0, 2.2, 2.8, 2.6, 2.4, 3.1]
    tokens = [100] * len(base)

    def point(method, nll):
        total = sum(n * t for n, t in zip(nll, tokens)) / sum(tokens)
        return {"method": method, "ppl": math.exp(total), "window_nll": [n * t for n, t in zip(nll, tokens)],
                "window_tokens": tokens}

    a = point("a", base)
    b = point("b", [n + 0.05 for n in base])
    c = point("c", [n + (0.05 if i % 2 else -0.05) for i, n in enumerate(base)])
    rank = rank_within_noise([b, a, c])
    assert rank["best"] in ("a", "c")  # a and c have the same mean NLL
    lo, hi = rank["ratio_to_best_ci"]["b"]
    assert lo == pytest.approx(math.exp(0.05)) and hi == pytest.approx(math.exp(0.05))
    assert "b" not in rank["tied_with_best"]
    other = "c" if rank["best"] == "a" else "a"
    assert other in rank["tied_with_best"] and rank["ratio_to_best_ci"][other][0] < 1.0
