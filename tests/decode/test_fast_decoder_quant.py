"""FastDecoder on int8 / q4 weights against the reference: the masked dense forward of the
dequantised weights (the HF model with QuantLinears and the plan's sparse modules).

Tolerance: both sides compute in fp32 from the same dequantised values; they differ only in
summation order (blocked kernel dot products / accumulations vs torch's GEMM), ~1e-6 relative
per linear, so logits agree to 2e-4 as the fp decoder tests do. Plans whose masks cannot flip
under rounding (per-channel thresholds of 0 or +inf) are used for the input-sparse case; CATS
uses a scalar activation threshold as the fp tests do.

q4 runs by default; int8 (another compiled signature, ~1 min of numba compile cold) is slow.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import actsparse as asp
from actsparse.decode import FastDecoder
from actsparse.errors import ConfigError, StateError, UnsupportedError
from actsparse.quant import Int8Config, Q4Config, load_quantized, quantize_, save_quantized

sys.path.insert(0, str(Path(__file__).parent))
from test_fast_decoder import greedy_flip_check, install, reference_logits, tiny_llama  # noqa: E402

ALL = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
# the roles each plan reads input-sparsely (packed transposed: one copy in the layout it reads)
TRANSPOSED = {"dense": (), "channel_mask": ALL, "act": ("mlp.down",)}
CONFIG = {"int8": Int8Config, "q4": Q4Config}
FORMATS = ["q4", pytest.param("int8", marks=pytest.mark.slow)]
SHAPE = dict(hidden=64, inter=192, heads=4, kv=2)  # block axes: multiples of 32


def quantised_pair(fmt, kind, **shape):
    """(the fp model with the plan, the reference: the same model quantised in the plan's layouts
    with the same plan). Same seeds: same weights and thresholds."""
    shape = shape or SHAPE
    fp, ref = tiny_llama(**shape), tiny_llama(**shape)
    quantize_(ref, CONFIG[fmt](transposed=TRANSPOSED[kind]))
    install(fp, kind, np.random.default_rng(1))
    install(ref, kind, np.random.default_rng(1))
    return fp, ref


def steps(dec, ids):
    return np.stack([dec.step(int(t)).copy() for t in ids])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["dense", "channel_mask", "act"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_steps_match_dequantised_masked_dense_forward(fmt, kind, threads):
    fp, ref = quantised_pair(fmt, kind)
    ids = torch.tensor([3, 17, 5, 99, 42, 8, 61, 7])
    want = reference_logits(ref, ids)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shared = FastDecoder(ref, max_len=16)  # the model's QuantLinears (no copy)
        own = FastDecoder(fp, max_len=16, weights=fmt)  # the decoder quantises its own copy
        got_shared, got_own = steps(shared, ids), steps(own, ids)
    finally:
        torch.set_num_threads(old)
    assert shared.plan.weights == own.plan.weights == fmt
    np.testing.assert_allclose(got_shared, want, rtol=0, atol=2e-4)
    np.testing.assert_allclose(got_own, want, rtol=0, atol=2e-4)
    if kind != "dense":
        assert sum(shared.decode_sparsity().values()) > 0
    mem = shared.memory_report()
    assert mem["transposed_copy_bytes"] == 0 and mem["resident_ratio"] <= 1.05
    assert own.memory_report()["transposed_copy_bytes"] > 0  # its own quantised copy, reported


@pytest.mark.parametrize("fmt", FORMATS)
def test_greedy_generation_and_dense_prefill_of_the_own_copy(fmt):
    """weights=fmt: the prompt runs through the compiled step (the model's forward has other
    weights); prefill="dense" runs it with every test dense, as the reference's dense_forward."""
    from actsparse.sparsify.modules import dense_forward

    fp, ref = quantised_pair(fmt, "channel_mask")
    ids = torch.tensor([3, 17, 5, 99, 42])
    a = FastDecoder(fp, max_len=24, weights=fmt).generate(ids, 8).tokens
    b = FastDecoder(ref, max_len=24).generate(ids, 8).tokens
    assert a == b
    dec = FastDecoder(fp, max_len=24, weights=fmt, prefill="dense")
    with torch.no_grad(), dense_forward(ref):
        want = ref(ids[None]).logits[0, -1].numpy()
    np.testing.assert_allclose(dec.prefill(ids), want, rtol=0, atol=2e-4)


def test_parallel_paths_on_a_wider_quantised_model():
    """Weights above PARALLEL_MIN_BYTES in q4 (2 threads): the dense rows, the transposed
    accumulation and the kept up rows run as parallel regions."""
    shape = dict(hidden=1024, inter=2048, heads=8, kv=4, layers=1)
    for kind in ("channel_mask", "act"):
        fp, ref = quantised_pair("q4", kind, **shape)
        ids = torch.tensor(np.random.default_rng(3).integers(0, 101, 24))
        want = reference_logits(ref, ids)
        old = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            got = steps(FastDecoder(ref, max_len=32), ids)
        finally:
            torch.set_num_threads(old)
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-4)


def test_shared_buffers_and_lm_head():
    model = tiny_llama(**SHAPE)
    quantize_(model, Q4Config(transposed=ALL, lm_head=True))
    install(model, "channel_mask", np.random.default_rng(1))
    dec = FastDecoder(model, max_len=8)
    codes = model.model.layers[0].self_attn.q_proj.codes
    assert np.shares_memory(dec._args.weights.wt[0][0], codes.numpy())
    assert np.shares_memory(dec._args.emb.lm_head[0], model.lm_head.codes.numpy())
    ids = torch.tensor([3, 17, 5, 99])
    np.testing.assert_allclose(steps(dec, ids), reference_logits(model, ids), rtol=0, atol=2e-4)
    mem = dec.memory_report()
    assert mem["resident_weight_bytes"] == mem["model_weight_bytes"] and mem["resident_ratio"] <= 1.05


def test_an_int8_lm_head_beside_q4_block_linears():
    """The lm_head in its own format (llama.cpp's Q4_0 files keep an 8-bit head): shared from the
    model's QuantLinear and in the decoder's own copy, each against the dequantised reference."""
    model = tiny_llama(**SHAPE)
    quantize_(model, Q4Config(transposed=ALL, lm_head=True, head_format="int8"))
    assert model.lm_head.fmt == "int8" and model.model.layers[0].mlp.up_proj.fmt == "q4"
    install(model, "channel_mask", np.random.default_rng(1))
    ids = torch.tensor([3, 17, 5, 99])
    dec = FastDecoder(model, max_len=8)
    assert np.shares_memory(dec._args.emb.lm_head[0], model.lm_head.codes.numpy())
    np.testing.assert_allclose(steps(dec, ids), reference_logits(model, ids), rtol=0, atol=2e-4)
    assert dec.plan.weight_bytes()["lm_head"] == model.lm_head.quant_weight().nbytes

    fp = tiny_llama(**SHAPE)
    own = FastDecoder(fp, max_len=8, dense=True, weights=Q4Config(lm_head=True, head_format="int8"))
    ref = tiny_llama(**SHAPE)
    quantize_(ref, Q4Config(lm_head=True, head_format="int8"))
    np.testing.assert_allclose(steps(own, ids), reference_logits(ref, ids), rtol=0, atol=2e-4)
    with pytest.raises(ConfigError, match="set lm_head=True"):
        Q4Config(head_format="int8")


@pytest.mark.parametrize("kind", ["channel_mask", "act"])
def test_accelerate_runs_quantised_linears_on_their_codes(kind):
    """accelerate_ on a quantised model: the sparse linears on their transposed codes, a
    zero-skipping down on its codes, every other QuantLinear on the dense packed kernel; no
    copies. Each generated step's logits equal the un-accelerated model's (the dequantised masked
    dense forward) within the kernels' tolerance, and deaccelerate_ puts the modules back."""
    from actsparse.decode import deaccelerate_
    from actsparse.decode.accelerate import QuantDenseLinear
    from actsparse.quant import QuantLinear

    _, model = quantised_pair("q4", kind)
    originals = {n: m for n, m in model.named_modules()}
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    gen = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, **gen)
    report = asp.accelerate_(model)
    assert report.transposed_copy_bytes == 0
    if kind == "act":
        assert (report.zero_skip_linears, report.kernel_linears, report.quant_dense_linears) == (2, 0, 12)
    else:
        assert (report.zero_skip_linears, report.kernel_linears, report.quant_dense_linears) == (0, 14, 0)
    assert isinstance(model.model.layers[0].self_attn.o_proj.linear, QuantLinear)
    if kind == "act":
        assert isinstance(model.model.layers[0].self_attn.o_proj, QuantDenseLinear)
    with torch.no_grad():
        got = model.generate(ids, **gen)
    assert got.sequences.tolist() == ref.sequences.tolist()
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)
    deaccelerate_(model)
    for n, m in model.named_modules():
        assert originals[n] is m


def test_refusals_name_the_problem(tmp_path):
    rows = tiny_llama(**SHAPE)
    quantize_(rows, Q4Config())  # every linear in the rows layout
    with pytest.raises(ConfigError, match="already quantised"):
        FastDecoder(rows, weights="q4")
    install(rows, "channel_mask", np.random.default_rng(1))
    with pytest.raises(UnsupportedError, match="transposed layout"):
        FastDecoder(rows)  # a TEAL plan on rows-packed linears: refused, not decoded densely
    with pytest.raises(UnsupportedError, match="packed by rows.*quantise for the plan"):
        asp.accelerate_(rows)
    assert not any(type(m).__name__ == "QuantDenseLinear" for m in rows.modules())  # refused before any swap
    with pytest.raises(ConfigError, match="int8, q4"):
        FastDecoder(tiny_llama(**SHAPE), weights="q3")
    with pytest.raises(ConfigError, match="AWQ"):
        FastDecoder(tiny_llama(**SHAPE), weights=Q4Config(awq=True))
    saved = tiny_llama(**SHAPE)
    quantize_(saved, Q4Config())
    save_quantized(saved, tmp_path / "q4")
    planned = tiny_llama(**SHAPE)
    install(planned, "scalar", np.random.default_rng(1))
    with pytest.raises(StateError, match="weights into the dense model first"):
        load_quantized(planned, tmp_path / "q4")  # would drop the plan's modules


def test_real_smollm2_q4_with_a_teal_plan_stored_once(tmp_path):
    """The real model, a real TEAL plan and real text: quantise for the plan (one copy), load the
    plan into the quantised model, decode; each greedy token is the reference's argmax wherever
    the two agree on the logits, and disagreements start rarely."""
    from actsparse.data.text import text, token_windows
    from actsparse.sparsify.modules import block_linear_params

    model, tok = asp.load("smollm2-135m")  # a fresh copy: quantize_ is in place
    cal = token_windows(tok, text("wiki", "calibration"), window=256, max_tokens=512)
    asp.sparsify_(model, asp.TEAL(sparsity=0.5), calibration=cal)
    asp.save_plan(model, tmp_path / "plan")
    asp.desparsify_(model)
    dense_params = block_linear_params(model)
    quantize_(model, Q4Config(), plan=tmp_path / "plan")
    asp.load_plan(model, tmp_path / "plan")
    # the byte accounting reads through the sparse wrappers of packed linears (they hold no .weight)
    assert block_linear_params(model) == dense_params
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dec = FastDecoder(model, max_len=48)
        # a threshold flip (an input within rounding of its threshold) moves later logits by whole
        # units, as between HF's own incremental and batched forwards (see greedy_flip_check)
        onsets, positions, argmax_equal = greedy_flip_check(
            dec, model, tok, ("The history of the city of Paris begins", "In mathematics, a group is"), 12)
    finally:
        torch.set_num_threads(old)
    assert onsets <= 3 and argmax_equal >= 0.8 * positions, (onsets, argmax_equal, positions)
    mem = dec.memory_report()
    assert mem["weights"] == "q4" and mem["transposed_copy_bytes"] == 0 and mem["resident_ratio"] <= 1.05
    assert dec.decode_sparsity()["q"] > 0.3
