"""The fTRI contrast against brute force: per-token activations kept in full by a plain hook,
per-prompt means and the exact permutation test recomputed in numpy, on a constructed LLaMA
with a known answer and on a tiny random Mixtral; and once on the real model."""
import itertools
import math

import numpy as np
import pytest
import torch

from actsparse.errors import ConfigError, DataError, UnsupportedError
from actsparse.measure.contrast import ContrastResult, contrast
from mote_helpers import MARK, MARK_LAYER, MARK_NEURON, CharTokenizer, constructed_llama, tiny_moe

A = ["ax xa", "the x box", "xx", "a fox ran quickly by"]  # every A prompt holds the mark, of varied lengths
B = ["a cat sat", "hello world", "no mark here at all", "ab"]


def per_token(model, tok, docs, path, io="input", router=False):
    """Each prompt alone (no padding): the full (tokens, width) tensor at ``path``."""
    out = []
    for ids in tok(docs)["input_ids"]:
        ids = torch.tensor([[tok.bos_token_id] + ids])
        got = []
        m = model.get_submodule(path)
        if router:
            h = m.register_forward_hook(lambda mod, a, o: got.append(o))
        elif io == "input":
            h = m.register_forward_pre_hook(lambda mod, a: got.append(a[0].detach()[0].double().numpy()))
        else:
            h = m.register_forward_hook(lambda mod, a, o: got.append(o.detach()[0].double().numpy()))
        with torch.no_grad():
            model(ids)
        h.remove()
        out.append(got[0])
    return out


def exact_p(x, n_a):
    """Two-sided exact permutation p of Cohen's d / the difference, one unit at a time."""
    n = x.shape[0]
    def stat(lab):
        a, b = x[lab], x[~lab]
        return a.mean(0) - b.mean(0)
    lab0 = np.arange(n) < n_a
    obs = np.abs(stat(lab0))
    hits = np.zeros(x.shape[1])
    combos = list(itertools.combinations(range(n), n_a))
    for c in combos:
        lab = np.zeros(n, bool)
        lab[list(c)] = True
        hits += np.abs(stat(lab)) >= obs * (1 - 1e-9)
    return hits / len(combos)


def test_neuron_contrast_matches_brute_force_and_finds_the_constructed_neuron():
    model, tok = constructed_llama(), CharTokenizer()
    res = contrast(model, tok, A, B, statistic="rate", threshold=0.05, permutations=1000, batch_size=3)
    assert res.units == "neurons" and res.layers == [0, 1] and res.width == 6
    assert res.meta["exact"] and res.meta["permutations"] == math.comb(8, 4)
    for layer in (0, 1):
        acts = per_token(model, tok, A + B, f"model.layers.{layer}.mlp.down_proj")
        rate = np.stack([(np.abs(t) > 0.05).mean(0) for t in acts])
        np.testing.assert_allclose(res.arrays["statistic"][layer].numpy(), rate[:4].mean(0) - rate[4:].mean(0),
                                   atol=1e-6)
        np.testing.assert_allclose(res.arrays["p"][layer].numpy(), exact_p(rate, 4), atol=1e-6)
        mean = np.stack([t.mean(0) for t in acts])
        np.testing.assert_allclose(res.arrays["a_mean"][layer].numpy(), mean[:4].mean(0), rtol=1e-5, atol=1e-7)
    # the known answer: the mark neuron fires on exactly the mark tokens, and on no B token
    marks = [(d.count(MARK)) / (len(d) + 1) for d in A]  # +1: BOS
    assert res.arrays["statistic"][MARK_LAYER, MARK_NEURON].item() == pytest.approx(np.mean(marks), abs=1e-6)
    assert res.arrays["b_value"][MARK_LAYER, MARK_NEURON].item() == 0.0
    assert res.arrays["p"][MARK_LAYER, MARK_NEURON].item() == pytest.approx(2 / 70)
    assert res.top(1) == [(MARK_LAYER, MARK_NEURON)]
    assert res.arrays["a_fired_mean"][MARK_LAYER, MARK_NEURON].item() > 1.0  # silu(g) * u on the mark


def test_standardized_contrast_matches_brute_force():
    model, tok = constructed_llama(), CharTokenizer()
    res = contrast(model, tok, A, B, statistic="standardized", permutations=1000, batch_size=8)
    acts = per_token(model, tok, A + B, "model.layers.1.mlp.down_proj")
    x = np.stack([np.abs(t).mean(0) for t in acts])
    a, b = x[:4], x[4:]
    d = (a.mean(0) - b.mean(0)) / np.sqrt((a.var(0, ddof=1) + b.var(0, ddof=1)) / 2)
    np.testing.assert_allclose(res.arrays["statistic"][1].numpy(), d, rtol=1e-4)
    assert res.top(1)[0] == (MARK_LAYER, MARK_NEURON)
    # mlp.act (SiLU(gate)) is the other neuron site
    act = contrast(model, tok, A, B, site="mlp.act", statistic="rate", threshold=0.05, permutations=100)
    acts = per_token(model, tok, A + B, "model.layers.0.mlp.act_fn", io="output")
    rate = np.stack([(np.abs(t) > 0.05).mean(0) for t in acts])
    np.testing.assert_allclose(act.arrays["statistic"][0].numpy(), rate[:4].mean(0) - rate[4:].mean(0), atol=1e-6)


def test_expert_contrast_matches_brute_force_on_a_tiny_mixtral():
    model, tok = tiny_moe("mixtral"), CharTokenizer()
    res = contrast(model, tok, A, B, statistic="rate", permutations=1000, batch_size=3)
    assert res.units == "experts" and res.width == 4 and res.site is None
    for layer in (0, 1):
        outs = per_token(model, tok, A + B, f"model.layers.{layer}.mlp.gate", router=True)
        freq = np.stack([np.bincount(o[2].reshape(-1).numpy(), minlength=4) / o[2].shape[0] for o in outs])
        np.testing.assert_allclose(res.arrays["statistic"][layer].numpy(), freq[:4].mean(0) - freq[4:].mean(0),
                                   atol=1e-6)
        np.testing.assert_allclose(res.arrays["p"][layer].numpy(), exact_p(freq, 4), atol=1e-6)
    mass = contrast(model, tok, A, B, statistic="standardized", permutations=10)
    outs = per_token(model, tok, A + B, "model.layers.0.mlp.gate", router=True)
    w = []
    for _, weights, idx in outs:
        full = torch.zeros(idx.shape[0], 4).scatter_(1, idx, weights.float())
        w.append(full.mean(0).double().numpy())
    np.testing.assert_allclose(mass.arrays["a_value"][0].numpy(), np.mean(w[:4], axis=0), rtol=1e-5)


def test_save_load_round_trip_and_refusals(tmp_path):
    model, tok = constructed_llama(), CharTokenizer()
    res = contrast(model, tok, A, B, permutations=100)
    res.save(tmp_path / "c")
    back = ContrastResult.load(tmp_path / "c", model=model)
    assert back.layers == res.layers and back.top(3) == res.top(3) and back.meta == res.meta
    for k, v in res.arrays.items():
        torch.testing.assert_close(back.arrays[k], v)
    with pytest.raises(ConfigError, match="other weights"):
        ContrastResult.load(tmp_path / "c", model=constructed_llama(seed=1))
    ContrastResult.load(tmp_path / "c", model=constructed_llama(seed=1), check_weights=False)
    with pytest.raises(ConfigError, match="another model"):
        ContrastResult.load(tmp_path / "c", model=tiny_moe("mixtral"))
    (tmp_path / "c" / "contrast.safetensors").write_bytes(b"broken")
    with pytest.raises(ConfigError, match="corrupt"):
        ContrastResult.load(tmp_path / "c")
    with pytest.raises(ConfigError, match="not a saved contrast"):
        ContrastResult.load(tmp_path)


def test_contrast_refusals():
    model, tok = constructed_llama(), CharTokenizer()
    with pytest.raises(DataError, match="at least 2 prompts"):
        contrast(model, tok, A[:1], B)
    with pytest.raises(ConfigError, match="statistic"):
        contrast(model, tok, A, B, statistic="t")
    with pytest.raises(UnsupportedError, match="no expert routers"):
        contrast(model, tok, A, B, units="experts")
    with pytest.raises(DataError, match="more active on A"):
        contrast(model, tok, A, B, statistic="rate", threshold=0.05, permutations=10).top(7)


def test_real_model_contrast_news_vs_wiki(smollm2):
    import actsparse as asp

    model, tok = smollm2
    a, b = asp.text("news", "calibration")[:4], asp.text("wiki", "calibration")[:4]
    res = asp.contrast(model, tok, a, b, max_tokens=24, permutations=100, batch_size=8)
    assert res.arrays["statistic"].shape == (30, 1536) and res.meta["exact"]
    assert res.meta["tokens"] == {"a": 4 * 24, "b": 4 * 24}
    top = res.top(5)
    assert all(res.arrays["a_value"][layer, i] > res.arrays["b_value"][layer, i] for layer, i in top)
    p = res.arrays["p"]
    assert float(p.min()) >= 2 / 70 - 1e-6 and float(p.max()) <= 1.0
