"""Integration on the real SmolLM2-135M (small token counts). The fixture is shared: always
desparsify in a finally."""

from actsparse.data.text import text, token_windows
from actsparse.eval.perplexity import perplexity
from actsparse.sparsify import CATS, TEAL, calibrate, desparsify_, iter_sparse_modules, sparsify_
from actsparse.sparsify.plan import load_plan, save_plan


def test_teal_cats_on_smollm2(smollm2, tmp_path):
    model, tok = smollm2
    cal = token_windows(tok, text("wiki", "calibration"), window=128, max_tokens=512)
    test = token_windows(tok, text("wiki", "test"), window=128, max_tokens=256)
    dense = perplexity(model, test)
    stats = calibrate(model, [TEAL(), CATS()], cal)
    for cfg in (TEAL(sparsity=0.5), CATS(sparsity=0.5)):
        sparsify_(model, cfg, stats=stats)
        try:
            r = perplexity(model, test)
            save_plan(model, tmp_path / cfg.METHOD)
        finally:
            desparsify_(model)
        assert r.ppl > dense.ppl
        first = next(iter(r.reached_sparsity.values()))
        assert abs(first - 0.5) < 0.1
        load_plan(model, tmp_path / cfg.METHOD)
        try:
            assert perplexity(model, test).ppl == r.ppl
        finally:
            desparsify_(model)
    assert not any(True for _ in iter_sparse_modules(model))
    assert perplexity(model, test).ppl == dense.ppl


def test_teal_greedy_on_smollm2(smollm2):
    """The greedy allocation on the real model: every block's parameter-weighted nominal
    sparsity is the target, and the weight bytes skipped on held-out text are close to it."""
    model, tok = smollm2
    cal = token_windows(tok, text("wiki", "calibration"), window=128, max_tokens=512)
    test = token_windows(tok, text("wiki", "test"), window=128, max_tokens=256)
    cfg = TEAL(sparsity=0.4, allocation="greedy", greedy_error="linear", greedy_step=0.1, greedy_tokens=256)
    sparsify_(model, cfg, calibration=cal)
    try:
        r = perplexity(model, test)
        targets = {}
        for a in model._actsparse_sparsity.assignments:
            layer = int(a.path.split(".layers.")[1].split(".")[0])
            w = model.get_submodule(a.path).weight.numel()
            acc = targets.setdefault(layer, [0.0, 0])
            acc[0] += w * a.target
            acc[1] += w
    finally:
        desparsify_(model)
    assert len(targets) == 30
    assert all(abs(num / den - 0.4) < 1e-6 for num, den in targets.values())
    assert abs(r.bytes_skipped - 0.4) < 0.05
    assert len({round(v, 2) for v in r.reached_sparsity.values()}) > 1  # not uniform
