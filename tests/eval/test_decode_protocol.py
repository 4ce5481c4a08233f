"""The decode protocol: a dense first half fills the KV cache, the second half runs sparse and
is scored. Checked against token-by-token decoding and against the dense model's own NLLs."""
import math

import pytest
import torch
import torch.nn.functional as F

import actsparse as asp
from actsparse.data.text import Windows
from actsparse.errors import DataError
from actsparse.eval.perplexity import bootstrap_ratio, cache_argument, perplexity
from actsparse.sparsify.modules import dense_forward


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def windows(n=4, window=24, seed=1, pad_last=0):
    ids = torch.randint(0, 300, (n, window), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if pad_last:
        mask[-1, -pad_last:] = 0
    return Windows(ids, mask)


@torch.no_grad()
def token_by_token_nll(model, ids):
    """Dense prefill of the first half, then one sparse decoding step per token."""
    half = ids.shape[0] // 2
    with dense_forward(model):
        out = model(input_ids=ids[None, :half], use_cache=True)
    total = 0.0
    for t in range(half, ids.shape[0] - 1):
        out = model(input_ids=ids[None, t:t + 1], use_cache=True, **cache_argument(model, out))
        total += F.cross_entropy(out.logits[0, -1].double(), ids[t + 1]).item()
    return total, ids.shape[0] - 1 - half


def test_decode_protocol_equals_token_by_token_decoding():
    model = tiny_llama()
    asp.sparsify_(model, asp.TEAL(sparsity=0.5), calibration=windows(n=16, window=32, seed=7))
    w = windows()
    r = perplexity(model, w, sparse_protocol="decode", batch_size=2)
    assert r.sparse_protocol == "decode" and "dense first half" in r.protocol
    for i in range(len(w)):
        nll, count = token_by_token_nll(model, w.input_ids[i])
        assert r.window_tokens[i] == count == 11
        assert r.window_nll[i] == pytest.approx(nll, rel=1e-4)
    # the sparse half is sparse: the same windows under "all" (every token sparse) differ, and so
    # does the dense model on the second half
    assert r.ppl != pytest.approx(perplexity(model, w).ppl, rel=1e-6)
    with dense_forward(model):
        assert r.ppl != pytest.approx(perplexity(model, w, sparse_protocol="decode").ppl, rel=1e-6)
    assert r.reached_sparsity and 0.3 < r.reached_sparsity["attn.q:input"] < 0.7


@torch.no_grad()
def test_dense_model_scores_the_second_half_of_its_own_forward():
    model = tiny_llama()
    w = windows(pad_last=5)
    r = perplexity(model, w, sparse_protocol="decode")
    logits = model(input_ids=w.input_ids, attention_mask=w.attention_mask).logits.double()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 300), w.input_ids[:, 1:].reshape(-1),
                          reduction="none").reshape(len(w), -1)
    half = w.input_ids.shape[1] // 2
    valid = (w.attention_mask[:, half + 1:] * w.attention_mask[:, half:-1]).bool()
    expected = torch.where(valid, nll[:, half:], 0.0).sum(1)
    assert r.window_tokens == valid.sum(1).tolist() == [11, 11, 11, 6]
    assert r.window_nll == pytest.approx(expected.tolist(), rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(float(expected.sum()) / int(valid.sum())), rel=1e-5)


def test_bad_protocols_are_refused():
    model = tiny_llama()
    w = windows()
    with pytest.raises(DataError, match="sparse_protocol must be one of all, decode"):
        perplexity(model, w, sparse_protocol="prefill")
    docs = ["one two three four five six seven eight nine ten " * 20]
    from actsparse.models.loading import load

    _, tok = load("smollm2-135m")
    with pytest.raises(DataError, match="non-overlapping windows: drop the stride"):
        perplexity(model, docs, tokenizer=tok, window=32, stride=16, sparse_protocol="decode")
    a, b = perplexity(model, w), perplexity(model, w, sparse_protocol="decode")
    with pytest.raises(DataError, match="under one protocol"):
        bootstrap_ratio(b, a)
