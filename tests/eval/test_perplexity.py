import math

import pytest
import torch

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
