import copy

import pytest
import torch

from actsparse.errors import ConfigError, DataError, StateError
from actsparse.eval.perplexity import perplexity
from actsparse.sparsify import (CATS, CETT, CHESS, TEAL, TopK, WINA, desparsify_, iter_sparse_modules,
                                reached_sparsity, sparsify_)
from actsparse.sparsify.modules import MaskedLinear, ThresholdedActivation
from actsparse.sparsify.plan import load_plan, read_plan, save_plan

from sparsify_helpers import random_windows, tiny_llama

THRESHOLD_METHODS = [TEAL, CATS, CHESS, WINA]


@pytest.mark.parametrize("cls", THRESHOLD_METHODS + [TopK], ids=lambda c: c.METHOD)
@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_reaches_target_on_calibration_data(tiny_stats, cls, s):
    """Each threshold, applied to the dense model's calibration activations it was set from,
    masks the target fraction within 1 point."""
    from actsparse.sparsify.api import plan_assignments

    model, cal, stats = tiny_stats
    counters, handles = [], []
    for a in plan_assignments(model, cls(sparsity=s), stats=stats):
        orig = model.get_submodule(a.path)
        if a.module == "linear":
            m = MaskedLinear(orig, a.threshold, mode=a.mode, k=a.k)
            handles.append(orig.register_forward_pre_hook(lambda mod, args, m=m: m._count(m.keep_mask(args[0]))))
        else:
            m = ThresholdedActivation(orig, a.width, a.threshold, mode=a.mode, k=a.k)
            handles.append(orig.register_forward_hook(lambda mod, args, out, m=m: m._count(m.keep_mask(out))))
        counters.append(m)
    try:
        perplexity(model, cal)
    finally:
        for h in handles:
            h.remove()
    for m in counters:
        assert abs(m.reached - s) <= 0.01, m


def test_reached_sparsity_reported_on_sparse_model(tiny_stats):
    model, cal, stats = tiny_stats
    sparsify_(model, TEAL(sparsity=0.5), stats=stats)
    try:
        r = perplexity(model, cal)
    finally:
        desparsify_(model)
    assert set(r.reached_sparsity) == {"attn.q:input", "attn.o:input", "mlp.gate:input", "mlp.down:input"}
    assert abs(r.reached_sparsity["attn.q:input"] - 0.5) <= 0.01  # first site: same distribution as calibration
    assert 0.4 < r.bytes_skipped < 0.6


def test_chess_selective_and_overrides(tiny_stats):
    model, cal, stats = tiny_stats
    cfg = CHESS(sparsity=0.5, selective=True, attention_sparsity=0.3,
                overrides=(("model.layers.0.*", None), ("re:layers\\.1\\.mlp", 0.6)))
    sparsify_(model, cfg, stats=stats)
    try:
        paths = dict(iter_sparse_modules(model))
        assert not any(p.startswith("model.layers.0.") for p in paths)
        assert isinstance(paths["model.layers.1.mlp.act_fn"], ThresholdedActivation)
        assert paths["model.layers.1.mlp.act_fn"].per_channel
        perplexity(model, cal)
        r = reached_sparsity(model)
        assert abs(r["mlp.act:output"] - 0.6) <= 0.05  # upstream masking shifts later distributions
        assert abs(r["attn.q:input"] - 0.3) <= 0.05
    finally:
        desparsify_(model)


@pytest.mark.parametrize("cfg", [TEAL(sparsity=0.0), CATS(sparsity=0.0), CHESS(sparsity=0.0, selective=True),
                                 TopK(sparsity=0.0), WINA(sparsity=0.0), CETT(cett=0.0, sample_tokens=256)],
                         ids=lambda c: c.METHOD)
def test_sparsity_zero_is_exactly_dense(tiny_stats, cfg):
    model, cal, stats = tiny_stats
    dense = perplexity(model, cal)
    sparsify_(model, cfg, stats=stats)
    try:
        assert any(True for _ in iter_sparse_modules(model))
        sparse = perplexity(model, cal)
    finally:
        desparsify_(model)
    assert sparse.ppl == dense.ppl and sparse.nll == dense.nll


def test_desparsify_restores_exactly(tiny_stats):
    model, cal, stats = tiny_stats
    before = {p: m for p, m in model.named_modules()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ids = cal.input_ids[:2]
    ref = model(input_ids=ids).logits
    for cfg in (TEAL(sparsity=0.5), CHESS(sparsity=0.5, selective=True), TopK(sparsity=0.5, site="mlp.down:input")):
        sparsify_(model, cfg, stats=stats)
        assert set(model.state_dict()) == set(sd)  # names unchanged while sparse (weights shared)
        assert not torch.equal(model(input_ids=ids).logits, ref)
        desparsify_(model)
        after = {p: m for p, m in model.named_modules()}
        assert after.keys() == before.keys() and all(after[p] is before[p] for p in before)
        assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
        assert torch.equal(model(input_ids=ids).logits, ref)
        assert not model._forward_pre_hooks


def test_batch_and_padding_are_correct(tiny_stats):
    """Masked dense works for batch > 1: each row equals its batch-1 forward."""
    model, cal, stats = tiny_stats
    sparsify_(model, TEAL(sparsity=0.5), stats=stats)
    try:
        ids = cal.input_ids[:3, :32]
        full = model(input_ids=ids).logits
        for i in range(3):
            torch.testing.assert_close(model(input_ids=ids[i:i + 1]).logits[0], full[i], rtol=1e-5, atol=1e-5)
    finally:
        desparsify_(model)


def test_already_sparsified_and_missing_stats(tiny_stats):
    model, cal, stats = tiny_stats
    sparsify_(model, CATS(sparsity=0.5), stats=stats)
    try:
        with pytest.raises(StateError, match="already sparsified"):
            sparsify_(model, CATS(sparsity=0.5), stats=stats)
    finally:
        desparsify_(model)
    with pytest.raises(DataError, match="calibration"):
        sparsify_(model, CATS(sparsity=0.5))


def test_too_little_calibration_data():
    model = tiny_llama()
    with pytest.raises(DataError, match="at least 256"):
        sparsify_(model, TEAL(sparsity=0.5), calibration=random_windows(n=2, window=64))
    assert not any(True for _ in iter_sparse_modules(model))


def test_nan_statistics_rejected(tiny_stats):
    model, cal, stats = tiny_stats
    bad = dict(stats)
    key = "model.layers.0.mlp.act_fn:output"
    st = bad[key].copy()
    st.nonfinite = 3
    bad[key] = st
    with pytest.raises(DataError, match="NaN"):
        sparsify_(model, CATS(sparsity=0.5), stats=bad)


def test_calibration_from_windows_directly():
    model = tiny_llama()
    sparsify_(model, TEAL(sparsity=0.4), calibration=random_windows())
    try:
        assert sum(isinstance(m, MaskedLinear) for _, m in iter_sparse_modules(model)) == 2 * 7
    finally:
        desparsify_(model)


@pytest.mark.parametrize("cfg", [TEAL(sparsity=0.5), CHESS(sparsity=0.5, selective=True), TopK(sparsity=0.4),
                                 WINA(sparsity=0.5), CETT(cett=0.2, sample_tokens=256)], ids=lambda c: c.METHOD)
def test_plan_round_trip_bit_exact(tiny_stats, tmp_path, cfg):
    model, cal, stats = tiny_stats
    other = copy.deepcopy(model)
    ids = cal.input_ids[:2]
    sparsify_(model, cfg, stats=stats)
    try:
        save_plan(model, tmp_path / "plan")
        ref = model(input_ids=ids).logits
        mods = dict(iter_sparse_modules(model))
    finally:
        desparsify_(model)
    load_plan(other, tmp_path / "plan")
    try:
        loaded = dict(iter_sparse_modules(other))
        assert loaded.keys() == mods.keys()
        for p, m in mods.items():
            n = loaded[p]
            assert type(n) is type(m) and n.mode == m.mode and n.k == m.k and n.skips == m.skips
            if m.per_channel:
                assert torch.equal(n.threshold, m.threshold)
            else:
                assert n.threshold == m.threshold
        assert torch.equal(other(input_ids=ids).logits, ref)
        config, _, _, _ = read_plan(tmp_path / "plan")
        assert config == cfg
    finally:
        desparsify_(other)


def _save_plan_of(model, config, stats, path):
    """Write ``config``'s plan for ``model`` to ``path`` and leave the model dense again."""
    sparsify_(model, config, stats=stats)
    try:
        save_plan(model, path)
    finally:
        desparsify_(model)


def test_plan_for_another_model_refused(tiny_stats, tmp_path):
    model, cal, stats = tiny_stats
    _save_plan_of(model, CATS(sparsity=0.5), stats, tmp_path / "plan")
    other = tiny_llama(inter=96)
    with pytest.raises(ConfigError, match="another model.*shape_hash"):
        load_plan(other, tmp_path / "plan")


def test_plan_for_other_weights_of_the_same_shapes_refused(tiny_stats, tmp_path):
    """Issue: plans were matched by shape only, so a TEAL plan loaded into another model of the
    same shapes and silently gave a different sparsity."""
    model, cal, stats = tiny_stats
    _save_plan_of(model, TEAL(sparsity=0.5), stats, tmp_path / "plan")
    other = tiny_llama(seed=7)  # same shapes, other weights
    with pytest.raises(ConfigError, match="other weights.*check_weights=False"):
        load_plan(other, tmp_path / "plan")
    assert not any(True for _ in iter_sparse_modules(other))
    load_plan(other, tmp_path / "plan", check_weights=False)  # the explicit override
    desparsify_(other)
    same = copy.deepcopy(model).to(torch.bfloat16)  # the same weights in bf16: the same fingerprint
    load_plan(same, tmp_path / "plan")
    desparsify_(same)


def test_plan_strict_and_nan(tiny_stats, tmp_path):
    import json

    model, cal, stats = tiny_stats
    sparsify_(model, TEAL(sparsity=0.5), stats=stats)
    try:
        save_plan(model, tmp_path / "plan")
    finally:
        desparsify_(model)
    f = tmp_path / "plan" / "plan.json"
    doc = json.loads(f.read_text())
    doc["surprise"] = 1
    f.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="unknown key"):
        load_plan(model, tmp_path / "plan")
    del doc["surprise"]
    doc["modules"][0]["threshold"] = float("nan")
    f.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="not a number"):
        load_plan(model, tmp_path / "plan")
    assert not any(True for _ in iter_sparse_modules(model))


def _poisoned(seed=0):
    """A tiny model whose layer-0 MLP produces inf (one down_proj weight is inf)."""
    model = tiny_llama(seed=seed)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    return model


@pytest.mark.parametrize("cfg", [CETT(cett=0.2, sample_tokens=256), TopK(sparsity=0.5), TEAL(sparsity=0.5)],
                         ids=lambda c: c.METHOD)
def test_non_finite_activations_fail_calibration_naming_the_site(cfg):
    """Issue: CETT (row samples) and Top-K (no statistics) plans were calibrated on NaN/inf
    activations without a word."""
    with pytest.raises(DataError, match=r"at model\.layers\.\d.*NaN/inf values"):
        sparsify_(_poisoned(), cfg, calibration=random_windows())


def test_non_finite_perplexity_is_an_error():
    with pytest.raises(DataError, match="not a number"):
        perplexity(_poisoned(), random_windows(n=2))
