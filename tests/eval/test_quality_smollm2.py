"""Integration on the real SmolLM2-135M (small token counts). The fixture is shared: always
desparsify in a finally."""
import pytest

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
