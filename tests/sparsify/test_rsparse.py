"""R-Sparse: the masked linear with a low-rank remainder against a brute-force reference
(explicit masks, numpy SVD), the search against an enumeration, the bytes accounting with the
factors counted, plan round trip and refusal, the engines, and the method on the real model."""
import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actsparse.errors import ConfigError, UnsupportedError
from actsparse.sparsify import RSparse, TEAL, bytes_skipped, calibrate, iter_sparse_modules, make_config, sparsify_
from actsparse.sparsify.allocation import row_key
from actsparse.sparsify.api import plan_assignments
from actsparse.sparsify.modules import MaskedLinear, fp32_scalar
from actsparse.sparsify.plan import load_plan, save_plan
from actsparse.sparsify.rsparse import SVD, choose_rank, remainder_errors, sparsity_for

from sparsify_helpers import random_windows, tiny_llama


def _linear(weight, bias=None):
    out, width = weight.shape
    lin = torch.nn.Linear(width, out, bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        if bias is not None:
            lin.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return lin


def test_tiny_linear_exact_answer():
    """W = diag(3, 2, 1) padded to 4 inputs: its rank-1 truncation is 3 e1 e1^T. With x = (0.1, 5,
    0.2, 4) and t = 1 the kept product is (0, 10, 0), the dropped part (0.1, 0, 0.2, 0) seen through
    rank 1 is (0.3, 0, 0), through rank 2 the same (x_2 is kept), through rank 3 (0.3, 0, 0.2)."""
    w = torch.tensor([[3.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 1.0, 0]])
    lin = _linear(w, bias=[1.0, -1.0, 0.5])
    svd = SVD.of(w)
    x = torch.tensor([[0.1, 5.0, 0.2, 4.0]])
    for rank, low in [(0, [0, 0, 0]), (1, [0.3, 0, 0]), (2, [0.3, 0, 0]), (3, [0.3, 0, 0.2])]:
        u, v = svd.factors(rank)
        m = MaskedLinear(lin, 1.0, factor_u=u, factor_v=v)
        assert m.rank == rank and m.extra_weights == rank * 7
        want = torch.tensor([[0.0, 10.0, 0.0]]) + torch.tensor(low) + lin.bias.detach()
        torch.testing.assert_close(m(x).detach(), want, atol=1e-6, rtol=0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(out=st.integers(1, 24), width=st.integers(1, 24), tokens=st.integers(1, 6),
       sparsity=st.floats(0.0, 0.95), rank_frac=st.floats(0.0, 1.0), bias=st.booleans(), seed=st.integers(0, 999))
def test_module_matches_brute_force(out, width, tokens, sparsity, rank_frac, bias, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, width)).astype(np.float32)
    b = rng.standard_normal(out).astype(np.float32) if bias else None
    x = rng.standard_normal((tokens, width)).astype(np.float32)
    t = float(np.quantile(np.abs(x), sparsity))
    k = min(out, width)
    rank = int(round(rank_frac * k))
    # the reference: numpy float64 SVD, an explicit mask, the two products written out
    U, S, Vh = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    keep = np.abs(x) > np.float32(t)
    low = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    ref = (x * keep) @ w.T.astype(np.float64) + (x * ~keep) @ low.T + (b if bias else 0)
    lin = _linear(w, b)
    u, v = SVD.of(torch.tensor(w)).factors(rank)
    m = MaskedLinear(lin, t, factor_u=u, factor_v=v)
    got = m(torch.tensor(x)).detach().double().numpy()
    scale = float(np.abs(x).sum(-1).max() * np.abs(w).max()) + 1
    np.testing.assert_allclose(got, ref, atol=1e-5 * scale, rtol=0)
    if rank == 0:  # no factors: TEAL's module, bit for bit
        assert m.factor_u is None
        assert torch.equal(m(torch.tensor(x)), MaskedLinear(lin, t)(torch.tensor(x)))
    if rank == k:  # full rank: the dense product whatever the mask
        np.testing.assert_allclose(got, x @ w.T.astype(np.float64) + (b if bias else 0), atol=1e-5 * scale, rtol=0)


def test_factor_checks():
    lin = torch.nn.Linear(5, 3)
    with pytest.raises(ConfigError, match="both factors"):
        MaskedLinear(lin, 0.1, factor_u=torch.zeros(3, 2))
    with pytest.raises(ConfigError, match=r"expected \(3, r\) and \(r, 5\)"):
        MaskedLinear(lin, 0.1, factor_u=torch.zeros(3, 2), factor_v=torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="non-finite"):
        MaskedLinear(lin, 0.1, factor_u=torch.full((3, 1), float("nan")), factor_v=torch.zeros(1, 5))


def test_remainder_errors_and_choice_match_enumeration():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((12, 20)) * np.linspace(3, 0.1, 20)).astype(np.float32)
    x = (rng.standard_normal((300, 20)) * rng.uniform(0.2, 2, 20)).astype(np.float32)
    svd = SVD.of(torch.tensor(w))
    t = 0.7
    errs = remainder_errors(svd, torch.tensor(x), t).numpy()
    U, S, Vh = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    d = x * (np.abs(x) <= np.float32(t))
    ref = ((x @ w.T.astype(np.float64)) ** 2).sum(-1)
    for r in range(13):
        e = ((d @ (w.astype(np.float64) - (U[:, :r] * S[:r]) @ Vh[:r]).T) ** 2).sum(-1)
        assert errs[r] == pytest.approx(float((e / ref).mean()), rel=1e-4, abs=1e-7), r
    # the choice: the enumerated rank of least error, each at the sparsity that keeps the budget
    budget, ranks = 0.4, (0, 1, 2, 4, 8)
    xt = torch.tensor(x)
    quantile = lambda s: float(np.quantile(np.abs(x), s))  # noqa: E731
    c = choose_rank(svd, xt, quantile, budget, ranks, 0.95)
    table = {}
    for r in ranks:
        s = budget + r * (12 + 20) / (12 * 20)
        if r and s > 0.95:
            continue
        table[r] = float(remainder_errors(svd, xt, quantile(s))[r])
    assert c.rank == min(table, key=table.get)
    assert c.sparsity == pytest.approx(sparsity_for(budget, c.rank, 20, 12))
    assert [r for r, _, _ in c.candidates] == list(table)
    with pytest.raises(ConfigError, match="add rank 0"):
        choose_rank(svd, xt, quantile, 0.9, (8,), 0.95)


def test_config_checks():
    assert make_config("rsparse", 0.4) == RSparse(0.4)
    assert RSparse(ranks=[16, 0, 16]).ranks == (0, 16)
    for bad in [dict(ranks=()), dict(ranks=(-1,)), dict(ranks=(1.5,)), dict(search_tokens=10),
                dict(max_sparsity=1.0), dict(kinds=("attn.x",)), dict(sparsity=1.0)]:
        with pytest.raises(ConfigError):
            RSparse(**bad)
    assert RSparse.from_dict(RSparse(0.3, ranks=(0, 4)).to_dict()) == RSparse(0.3, ranks=(0, 4))


def _forced(rank, budget=0.5):
    """A config whose every site takes ``rank`` (the only candidate)."""
    return RSparse(budget, ranks=(rank,), search_tokens=256)


def test_bytes_accounting_counts_the_factors():
    """Nominal bytes skipped is the budget exactly; reached bytes skipped is, per linear, the
    reached input sparsity times its weights minus its factors' weights (brute force)."""
    model = tiny_llama()
    cal = random_windows()
    cfg = _forced(8, 0.45)
    sparsify_(model, cfg, calibrate(model, [cfg], cal))
    mods = dict(iter_sparse_modules(model))
    assert len(mods) == 14 and all(m.rank == 8 for m in mods.values())
    nominal = {a.path: a.target for a in model._actsparse_sparsity.assignments}
    assert bytes_skipped(model, nominal=nominal) == pytest.approx(0.45, abs=1e-12)
    with torch.no_grad():
        model(cal.input_ids[:4])
    total = sum(m.in_features * m.out_features for m in mods.values())
    want = sum(m.reached * m.in_features * m.out_features - 8 * (m.in_features + m.out_features)
               for m in mods.values()) / total
    assert bytes_skipped(model) == pytest.approx(want, rel=1e-12)
    # the same linears without the factors (TEAL at the same thresholds) skip exactly the factors' share more
    extra = sum(8 * (m.in_features + m.out_features) for m in mods.values()) / total
    for m in mods.values():
        m.factor_u = m.factor_v = None
    assert bytes_skipped(model) == pytest.approx(want + extra, rel=1e-12)


def test_rank_zero_is_teal_and_plan_round_trip(tmp_path):
    model = tiny_llama()
    cal = random_windows()
    stats = calibrate(model, [RSparse(0.5, search_tokens=256), TEAL(0.5)], cal)
    teal = {a.path: a for a in plan_assignments(model, TEAL(0.5), stats)}
    for a in plan_assignments(model, _forced(0), stats):
        assert a.threshold == teal[a.path].threshold and a.factor_u is None
    cfg = _forced(4)
    sparsify_(model, cfg, stats)
    save_plan(model, tmp_path / "plan")
    fresh = tiny_llama()
    load_plan(fresh, tmp_path / "plan")
    before, after = dict(iter_sparse_modules(model)), dict(iter_sparse_modules(fresh))
    for path, m in before.items():
        assert after[path].threshold == m.threshold and after[path].rank == 4
        assert torch.equal(after[path].factor_u, m.factor_u) and torch.equal(after[path].factor_v, m.factor_v)
    ids = cal.input_ids[:2, :24]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="other weights"):
        load_plan(tiny_llama(seed=5), tmp_path / "plan")


def test_engines_tiny():
    """accelerate_'s single-token path (the input-sparse kernel plus the factors' GEMVs) computes
    the module's forward; FastDecoder refuses instead of decoding without the remainder."""
    from actsparse.decode import FastDecoder, accelerate_
    from actsparse.eval.perplexity import cache_argument

    model = tiny_llama()
    cal = random_windows()
    cfg = _forced(8)
    sparsify_(model, cfg, calibrate(model, [cfg], cal))
    ids = cal.input_ids[:1, :12]
    with torch.no_grad():
        want = model(ids).logits
        with pytest.raises(UnsupportedError, match="low-rank remainder"):
            FastDecoder(model)
        accelerate_(model)
        out, past = [], {}
        for i in range(ids.shape[1]):
            o = model(ids[:, i:i + 1], use_cache=True, **past)
            past = cache_argument(model, o)
            out.append(o.logits)
    torch.testing.assert_close(torch.cat(out, dim=1), want, atol=2e-4, rtol=1e-4)


def test_real_model_search(smollm2):
    """SmolLM2, real calibration text, two blocks: every site skips the budget (factors counted),
    its rank is the enumerated least-error one on the calibration rows, rank-0 sites are TEAL's,
    and on held-out text rows the R-Sparse linears err no more than TEAL's where they took a rank."""
    from actsparse.data.text import text, token_windows

    original, tok = smollm2
    model = copy.deepcopy(original)
    cal = token_windows(tok, text("wiki", "calibration"), window=256, max_tokens=1024, sampling="prefix")
    dense_rest = (("re:model\\.layers\\.([2-9]|[1-9][0-9])\\..*", None),)
    cfg = RSparse(0.5, overrides=dense_rest, search_tokens=512)
    teal = TEAL(0.5, overrides=dense_rest)
    stats = calibrate(model, [cfg, teal], cal)
    teal_thr = {a.path: a.threshold for a in plan_assignments(model, teal, stats)}
    sparsify_(model, cfg, stats)
    mods = dict(iter_sparse_modules(model))
    assert len(mods) == 14
    nominal = {a.path: a.target for a in model._actsparse_sparsity.assignments}
    for path, m in mods.items():
        skipped = nominal[path] * m.in_features * m.out_features - m.extra_weights
        assert skipped / (m.in_features * m.out_features) == pytest.approx(0.5, abs=1e-12)
        if m.rank == 0:
            assert m.threshold == fp32_scalar(teal_thr[path])
    assert any(m.rank for m in mods.values())  # layer 0's q/k gain from a rank (x0.5-0.6 error on SmolLM2)
    # held-out rows (the test split) through the same linears
    test = token_windows(tok, text("wiki", "test"), window=256, max_tokens=512, sampling="prefix")
    from actsparse.sparsify.calibration import Request, collect

    layer0 = [p for p in mods if p.startswith("model.layers.0.") and mods[p].rank]
    src = {p: p.rsplit(".", 1)[0] + "." + {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(
        p.rsplit(".", 1)[1], p.rsplit(".", 1)[1]) for p in layer0}
    rows = collect(original, test, [Request(row_key(s, 512), s, "input", sample_rows=512) for s in set(src.values())])
    for path in layer0:
        m, x = mods[path], rows[row_key(src[path], 512)].float()
        with torch.no_grad():
            y = m.linear(x)
            err_r = ((m(x) - y).pow(2).sum(-1) / y.pow(2).sum(-1)).mean()
            plain = MaskedLinear(m.linear, teal_thr[path])
            err_t = ((plain(x) - y).pow(2).sum(-1) / y.pow(2).sum(-1)).mean()
        assert float(err_r) < float(err_t), path
