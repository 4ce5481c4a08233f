"""Choosing what to switch (top of a contrast, random controls) and the switch-off experiment's
bookkeeping, on the constructed LLaMA (where the top unit is known)."""
import numpy as np
import pytest
import torch

from actsparse.data.text import Windows
from actsparse.eval.perplexity import perplexity
from actsparse.eval.switching import switch_experiment
from actsparse.intervention import from_contrast, intervene, random_units
from actsparse.measure.contrast import contrast
from mote_helpers import MARK_LAYER, MARK_NEURON, CharTokenizer, constructed_llama
from test_contrast import A, B


@pytest.fixture(scope="module")
def fitted():
    model, tok = constructed_llama(), CharTokenizer()
    return model, contrast(model, tok, A, B, permutations=100)


def windows(texts):
    tok = CharTokenizer()
    rows = [[1] + ids for ids in tok(texts)["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return Windows(ids, mask)


def test_from_contrast_off_and_on(fitted):
    _, res = fitted
    off = from_contrast(res, 3)
    assert [(s.layer, s.index) for s in off.switches] == res.top(3) and all(s.mode == "off" for s in off.switches)
    on = from_contrast(res, 1, mode="on", scale=2.0)
    assert on.switches[0].value == pytest.approx(2 * res.arrays["a_fired_mean"][MARK_LAYER, MARK_NEURON].item())


def test_random_units_are_distinct_seeded_and_layer_matched(fitted):
    _, res = fitted
    a, b = random_units(res, 5, seed=1), random_units(res, 5, seed=1)
    units = [(s.layer, s.index) for s in a.switches]
    assert units == [(s.layer, s.index) for s in b.switches] and len(set(units)) == 5
    assert all(layer in (0, 1) and 0 <= i < 6 for layer, i in units)
    assert units != [(s.layer, s.index) for s in random_units(res, 5, seed=2).switches]
    m = random_units(res, 4, seed=0, layer_matched=True)
    per_layer = lambda pairs: sorted(np.bincount([la for la, _ in pairs], minlength=2))
    assert per_layer([(s.layer, s.index) for s in m.switches]) == per_layer(res.top(4))
    with pytest.raises(Exception, match="cannot draw"):
        random_units(res, 13, seed=0)


def test_switch_experiment_reports_what_perplexity_measures(fitted):
    model, res = fitted
    wa, wb = windows(["xx ax xa x", "a box of x"]), windows(["a cat sat on the mat", "hello there"])
    out = switch_experiment(model, res, wa, wb, tops=(1,), controls={"uniform": (0, 1)}, progress=False)
    dense_a = -perplexity(model, wa).nll
    with intervene(model, from_contrast(res, 1)):
        top_a, top_b = -perplexity(model, wa).nll, perplexity(model, wb).ppl
    row = out["rows"][0]
    assert row["top"]["a_drop"] == pytest.approx(dense_a - top_a)
    assert row["top"]["b_ppl_ratio"] == pytest.approx(top_b / perplexity(model, wb).ppl)
    c = row["controls"]["uniform"]
    drops = [r["a_drop"] for r in c["runs"]]
    assert c["a_drop"]["mean"] == pytest.approx(np.mean(drops))
    assert c["targeted_ratio"] == pytest.approx(row["top"]["a_drop"] / np.mean(np.abs(drops)))
    # the mark neuron only fires on the mark: text B never sees it switched
    assert row["top"]["b_ppl_ratio"] == pytest.approx(1.0, abs=1e-6) and row["top"]["a_drop"] != 0
