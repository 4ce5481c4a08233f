"""TEAL's compensations (centre, bias correction): the fit against numpy, the module against
its formula, the exact calibration-mean property on the real model, plan round trip, engines."""
import numpy as np
import pytest
import torch

from actsparse.errors import ConfigError, UnsupportedError
from actsparse.sparsify import TEAL, calibrate, iter_sparse_modules, make_config, sparsify_
from actsparse.sparsify.compensation import fit_input, quantile_abs
from actsparse.sparsify.modules import MaskedLinear
from actsparse.sparsify.plan import load_plan, save_plan

from sparsify_helpers import random_windows, tiny_llama


@pytest.mark.parametrize("centre,bias", [(False, True), (True, False), (True, True)])
def test_fit_matches_numpy(centre, bias):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((301, 7)) * rng.uniform(0.5, 2, 7) + rng.uniform(-1, 1, 7)).astype(np.float32)
    fit = fit_input(torch.tensor(x), 0.4, centre=centre, bias_correction=bias, threshold=0.3)
    c = np.median(x, axis=0) if centre else np.zeros(7, np.float32)
    z = x - c
    t = np.sort(np.abs(z).ravel())[int(round(0.4 * z.size)) - 1] if centre else np.float32(0.3)
    assert fit.threshold == pytest.approx(t, rel=1e-6)
    if centre:
        np.testing.assert_allclose(fit.centre.numpy(), c, rtol=1e-6)
    else:
        assert fit.centre is None
    if bias:
        np.testing.assert_allclose(fit.dropped_mean.numpy(), (z.astype(np.float64) * (np.abs(z) <= t)).mean(axis=0),
                                   atol=1e-6)
    else:
        assert fit.dropped_mean is None
    assert quantile_abs(torch.zeros(5), 0.0) == 0.0


def test_masked_linear_formula_and_no_drop_is_dense():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    x = torch.randn(3, 6)
    c, off = torch.randn(6), torch.randn(4)
    m = MaskedLinear(lin, 0.5, centre=c, offset=off)
    z = x - c
    expect = lin(z * (z.abs() > 0.5)) + off
    torch.testing.assert_close(m(x), expect)
    # centre alone with W c as offset and nothing dropped: the dense linear
    dense = MaskedLinear(lin, 0.0, centre=c, offset=lin.weight.detach() @ c)
    torch.testing.assert_close(dense(x), lin(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="offset has 3 entries"):
        MaskedLinear(lin, 0.5, offset=torch.zeros(3))
    with pytest.raises(ConfigError, match="non-finite"):
        MaskedLinear(lin, 0.5, centre=torch.full((6,), float("nan")))


def test_config_checks():
    assert make_config("teal-centre-bias", 0.4) == TEAL(0.4, centre=True, bias_correction=True)
    with pytest.raises(ConfigError, match="uniform"):
        TEAL(allocation="greedy", bias_correction=True)
    with pytest.raises(ConfigError, match="compensation_rows"):
        TEAL(centre=True, compensation_rows=10)
    with pytest.raises(ConfigError, match="true or false"):
        TEAL(centre=1)


def _calibration(tok, tokens):
    from actsparse.data.text import text, token_windows

    return token_windows(tok, text("wiki", "calibration"), window=256, max_tokens=tokens, sampling="prefix")


def test_bias_correction_zeroes_the_mean_error_on_the_calibration_rows(smollm2, tmp_path):
    """With every calibration token in the row sample, the offset is exactly the mean of what the
    mask drops: over those inputs the corrected linear's mean error vs dense is 0 (to rounding),
    while plain TEAL's is not. The real model, real text, every linear of two layers."""
    import copy

    original, tok = smollm2
    model = copy.deepcopy(original)
    cal = _calibration(tok, 512)
    cfg = TEAL(0.5, centre=True, bias_correction=True, compensation_rows=1024,
               overrides=(("re:model\\.layers\\.([2-9]|[1-9][0-9])\\..*", None),))
    stats = calibrate(model, [cfg], cal)
    sparsify_(model, cfg, stats)
    mods = dict(iter_sparse_modules(model))
    assert len(mods) == 14 and all(m.compensated for m in mods.values())
    for path, m in mods.items():
        src = path.rsplit(".", 1)[0] + "." + {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(
            path.rsplit(".", 1)[1], path.rsplit(".", 1)[1])
        x = stats[f"{src}:input-rows/1024"].float()
        assert x.shape[0] == cal.tokens  # every token kept
        with torch.no_grad():
            err = (m(x) - m.linear(x)).mean(dim=0)
            plain = (m.linear((x - m.centre) * ((x - m.centre).abs() > m.threshold)) + m.linear.weight @ m.centre
                     - m.linear(x)).mean(dim=0)
            scale = m.linear(x).abs().mean()
        assert float(err.abs().max()) < 2e-4 * float(scale) + 1e-5, path
        assert float(plain.abs().max()) > 10 * float(err.abs().max()), path
    # plan round trip: the same modules, bit for bit
    save_plan(model, tmp_path / "plan")
    fresh = copy.deepcopy(original)
    load_plan(fresh, tmp_path / "plan")
    for path, m in dict(iter_sparse_modules(fresh)).items():
        assert m.threshold == mods[path].threshold
        assert torch.equal(m.centre, mods[path].centre) and torch.equal(m.offset, mods[path].offset)
    ids = cal.input_ids[:1, :32]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_engines_tiny():
    """accelerate_'s single-token kernel path computes the module's forward; FastDecoder refuses
    (it does not apply a centre / offset yet) instead of decoding without them."""
    from actsparse.decode import FastDecoder, accelerate_
    from actsparse.eval.perplexity import cache_argument

    model = tiny_llama()
    cal = random_windows()
    cfg = TEAL(0.5, centre=True, bias_correction=True, compensation_rows=256)
    sparsify_(model, cfg, calibrate(model, [cfg], cal))
    ids = cal.input_ids[:1, :12]
    with torch.no_grad():
        want = model(ids).logits
        with pytest.raises(UnsupportedError, match="compensation"):
            FastDecoder(model)
        accelerate_(model)
        # token by token through the KV cache: every linear sees one token (the kernel path)
        out, past = [], {}
        for i in range(ids.shape[1]):
            o = model(ids[:, i:i + 1], use_cache=True, **past)
            past = cache_argument(model, o)
            out.append(o.logits)
    torch.testing.assert_close(torch.cat(out, dim=1), want, atol=2e-4, rtol=1e-4)
