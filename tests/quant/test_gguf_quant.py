"""GGUF Q8_0 / Q4_0 / Q4_1 tensors loaded as actsparse int8 / q4 (actsparse.quant.gguf).

Exactness is against ``gguf.quants.dequantize`` of the same bytes, bit for bit (Q4_0: up to
the sign of zero, see ``_bits``); the q/k row order against transformers' own un-permutation.
"""
from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from actsparse.errors import DataError, ModelNotFoundError, StateError, UnsupportedError
from actsparse.kernels.quant_formats import INT8, Q4, TRANSPOSED, quantize_weight
from actsparse.quant import QuantLinear, load_gguf_quantized_, load_quantized, save_quantized
from actsparse.quant.gguf import gguf_to_quant_weight, unpermute_qk_rows

sys.path.insert(0, str(Path(__file__).parent))
from gguf_files import tiny_llama, write_tiny_gguf  # noqa: E402

LOADABLE = {T.Q8_0: INT8, T.Q4_0: Q4, T.Q4_1: Q4}


def _bits(w: torch.Tensor, qtype) -> torch.Tensor:
    """The fp32 bits; for Q4_0 with -0.0 read as +0.0: q4 computes d*(q-8) as q*d + (-8d), which
    is exact but gives +0.0 where GGUF's d*0 with a negative d gives -0.0 (the same value; no dot
    product changes)."""
    w = w.detach().to(torch.float32).contiguous()
    return (w + 0.0 if qtype == T.Q4_0 else w).view(torch.int32)


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


# ---------------------------------------------------------------- (a) exactness
@pytest.mark.parametrize("qtype", list(LOADABLE))
def test_one_tensor_dequantises_to_gguf_dequantize_bit_for_bit(qtype):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((48, 96)) * rng.uniform(0.01, 3, (48, 1))).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero block
    w[5, 32:64] = 0.25  # a constant block
    raw = gguf.quants.quantize(w, qtype)
    qw = gguf_to_quant_weight(qtype.name, raw, (48, 96))
    assert qw.fmt == LOADABLE[qtype] and qw.layout == "rows"
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    assert torch.equal(_bits(qw.dequantize(), qtype), _bits(ref, qtype))


def test_q4_1_codes_are_the_file_bytes():
    w = np.random.default_rng(2).standard_normal((32, 64)).astype(np.float32)
    raw = gguf.quants.quantize(w, T.Q4_1)
    qw = gguf_to_quant_weight("Q4_1", raw, (32, 64))
    blocks = raw.reshape(32, 2, 20)
    assert np.array_equal(qw.codes.numpy(), blocks[..., 4:].reshape(32, 32))
    assert np.array_equal(qw.scales.numpy(), blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    assert np.array_equal(qw.mins.numpy(), blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))


@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (4, 2), (9, 3)])
def test_qk_row_order_is_transformers_unpermutation(n_head, n_kv):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = n_kv * 2 * 8
    w = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    theirs = LlamaTensorProcessor(config={})._reverse_permute_weights(w, n_head, n_kv)
    assert np.array_equal(w[unpermute_qk_rows(rows, n_kv).numpy()], theirs)


@pytest.mark.parametrize("qtype", list(LOADABLE))
def test_tiny_gguf_file_loads_bit_for_bit(tmp_path, qtype):
    model = tiny_llama()
    write_tiny_gguf(tmp_path / "m.gguf", model, qtype)
    dense = copy.deepcopy(model)
    x = torch.randint(0, 96, (1, 7))
    desc = load_gguf_quantized_(model, tmp_path / "m.gguf")
    lins = _linears(model)
    assert len(lins) == 14 and {q.fmt for q in lins.values()} == {LOADABLE[qtype]}
    for path, q in lins.items():
        # the dense model holds the file's dequantised values in HF order (as asp.load gives)
        assert torch.equal(_bits(q.weight, qtype), _bits(dense.get_submodule(path).weight, qtype)), path
    assert desc["gguf"]["types"] == {qtype.name: 14} and desc["gguf"]["requantised_transposed"] == []
    torch.testing.assert_close(model(x).logits, dense(x).logits, rtol=0, atol=1e-5)
    # saves and loads as quantize_'s output does
    save_quantized(model, tmp_path / "q")
    fresh = load_quantized(copy.deepcopy(dense), tmp_path / "q")
    for path, q in _linears(fresh).items():
        assert torch.equal(q.codes, lins[path].codes) and torch.equal(q.scales, lins[path].scales)


def test_file_rows_against_gguf_dequantize_with_the_permutation(tmp_path):
    """Independent of the adopted dense weights: the loaded q/k rows are the file's rows,
    un-permuted the way transformers does it."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    model = tiny_llama()
    raw = write_tiny_gguf(tmp_path / "m.gguf", model, T.Q4_1)
    load_gguf_quantized_(model, tmp_path / "m.gguf")
    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for path, q in _linears(model).items():
        data, t = raw[path]
        name = {"q_proj": "blk.0.attn_q.weight", "k_proj": "blk.0.attn_k.weight"}.get(path.rsplit(".", 1)[1], "x")
        ref = proc.process(gguf.quants.dequantize(data, t), name).weights
        assert torch.equal(_bits(q.weight, t), _bits(torch.from_numpy(np.ascontiguousarray(ref)), t)), path


def test_q4_0_and_q4_1_mix_into_q4(tmp_path):
    model = tiny_llama()
    write_tiny_gguf(tmp_path / "m.gguf", model, lambda layer, role: T.Q4_0 if role.startswith("ffn") else T.Q4_1)
    desc = load_gguf_quantized_(model, tmp_path / "m.gguf")
    assert desc["config"]["format"] == "q4" and desc["gguf"]["types"] == {"Q4_0": 6, "Q4_1": 8}


def test_lm_head_loads_when_its_format_is_the_block_linears(tmp_path):
    model = tiny_llama()
    raw = write_tiny_gguf(tmp_path / "m.gguf", model, T.Q8_0, head_type=T.Q8_0)
    load_gguf_quantized_(model, tmp_path / "m.gguf", lm_head=True)
    head = model.get_output_embeddings()
    assert isinstance(head, QuantLinear) and head.fmt == INT8 and head.layout == "rows"
    assert torch.equal(head.weight, torch.from_numpy(gguf.quants.dequantize(*raw["lm_head"])))
    assert not isinstance(model.get_input_embeddings(), QuantLinear)  # the embedding stays dense


def test_transposed_roles_are_requantised_from_the_file_values_with_a_warning(tmp_path, caplog):
    model = tiny_llama()
    write_tiny_gguf(tmp_path / "m.gguf", model, T.Q4_1)
    dense = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="actsparse.quant.gguf"):
        desc = load_gguf_quantized_(model, tmp_path / "m.gguf", transposed=("mlp.down",))
    assert "re-rounds" in caplog.text and "2 linears" in caplog.text
    assert desc["gguf"]["requantised_transposed"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert desc["config"]["transposed"] == ["mlp.down"] or desc["config"]["transposed"] == ("mlp.down",)
    for path, q in _linears(model).items():
        w = dense.get_submodule(path).weight
        if path.endswith("down_proj"):
            assert q.layout == TRANSPOSED
            assert torch.equal(q.weight, quantize_weight(w, Q4, TRANSPOSED).dequantize())
            assert not torch.equal(q.weight, w)  # other blocks: re-rounded
        else:
            assert q.layout == "rows" and torch.equal(q.weight, w)


# ---------------------------------------------------------------- (c) refusals
def _untouched(model):
    return not _linears(model) and "_actsparse_quant" not in model.__dict__


def test_refuses_an_unsupported_type_naming_the_types(tmp_path):
    model = tiny_llama()
    write_tiny_gguf(tmp_path / "m.gguf", model, lambda layer, role: T.Q5_0 if role == "ffn_down" else T.Q4_1)
    with pytest.raises(UnsupportedError) as err:
        load_gguf_quantized_(model, tmp_path / "m.gguf")
    msg = str(err.value)
    assert "2 x Q5_0" in msg and "12 x Q4_1" in msg and "Q8_0, Q4_0, Q4_1" in msg
    assert _untouched(model)


def test_refuses_int8_and_q4_mixed(tmp_path):
    model = tiny_llama()
    write_tiny_gguf(tmp_path / "m.gguf", model, lambda layer, role: T.Q8_0 if role == "attn_v" else T.Q4_1)
    with pytest.raises(UnsupportedError, match="int8 and q4 formats"):
        load_gguf_quantized_(model, tmp_path / "m.gguf")
    assert _untouched(model)


def test_an_lm_head_of_another_format_loads_in_its_own_format(tmp_path):
    """llama.cpp keeps an 8-bit head beside 4-bit block linears (SmolLM2's file: Q8_0 and Q4_1);
    the head loads as int8, the blocks as q4, and FastDecoder decodes the mix."""
    from actsparse.decode import FastDecoder

    model = tiny_llama()
    raw = write_tiny_gguf(tmp_path / "m.gguf", model, T.Q4_1, head_type=T.Q8_0)
    desc = load_gguf_quantized_(model, tmp_path / "m.gguf", lm_head=True)
    head = model.get_output_embeddings()
    assert isinstance(head, QuantLinear) and head.fmt == INT8
    assert torch.equal(head.weight, torch.from_numpy(gguf.quants.dequantize(*raw["lm_head"])))
    assert desc["config"]["format"] == Q4 and desc["config"]["head_format"] == INT8
    assert {v["format"] for p, v in desc["linears"].items() if p != "lm_head"} == {Q4}
    ids = torch.tensor([3, 17, 5, 9])
    dec = FastDecoder(model, max_len=8)
    got = np.stack([dec.step(int(t)).copy() for t in ids])
    with torch.no_grad():
        ref = model(ids[None]).logits[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4)


def test_refuses_another_models_file(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", tiny_llama(), T.Q4_1)
    deeper = tiny_llama(layers=3)
    with pytest.raises(DataError, match="block_count: file 2, model 3"):
        load_gguf_quantized_(deeper, tmp_path / "m.gguf")
    other = tiny_llama(seed=5)  # same shapes, other weights: refused on the first tensor compared
    with pytest.raises(DataError, match="not a quantisation of"):
        load_gguf_quantized_(other, tmp_path / "m.gguf")
    assert _untouched(other)
    half = tiny_llama()
    write_tiny_gguf(tmp_path / "h.gguf", half, T.Q4_1)
    half.model.layers[1].mlp.down_proj.weight.data.normal_()  # layer 0 converts, then layer 1 is refused
    with pytest.raises(DataError, match="layers.1.mlp.down_proj"):
        load_gguf_quantized_(half, tmp_path / "h.gguf")
    assert _untouched(half)  # nothing swapped before every tensor is checked


def test_refuses_a_file_other_than_the_one_the_model_was_converted_from(tmp_path):
    model = tiny_llama()
    write_tiny_gguf(tmp_path / "m.gguf", model, T.Q4_1)
    model.actsparse_name = "smollm2-135m"  # as asp.load names the embedded model
    with pytest.raises(DataError, match="converted from .*SmolLM2.*not from"):
        load_gguf_quantized_(model, tmp_path / "m.gguf")


def test_refuses_missing_and_non_gguf_files_and_a_quantised_model(tmp_path):
    model = tiny_llama()
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_gguf_quantized_(model, tmp_path / "nope.gguf")
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ModelNotFoundError, match="magic"):
        load_gguf_quantized_(model, tmp_path / "x.gguf")
    write_tiny_gguf(tmp_path / "m.gguf", model, T.Q4_1)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelNotFoundError, match="truncated"):
        load_gguf_quantized_(model, tmp_path / "t.gguf")
    load_gguf_quantized_(model, tmp_path / "m.gguf")
    with pytest.raises(StateError, match="already quantised"):
        load_gguf_quantized_(model, tmp_path / "m.gguf")


# ---------------------------------------------------------------- (b) the real embedded file
@pytest.fixture(scope="module")
def smollm2_from_gguf(smollm2):
    from actsparse.models.loading import embedded_gguf

    loaded = copy.deepcopy(smollm2.model)
    desc = load_gguf_quantized_(loaded, embedded_gguf("smollm2-135m"))
    return loaded, desc


def test_embedded_smollm2_file_is_the_dense_model_bit_for_bit(smollm2, smollm2_from_gguf):
    loaded, desc = smollm2_from_gguf
    assert desc["gguf"]["types"] == {"Q4_1": 210} and desc["config"]["format"] == "q4"
    lins = _linears(loaded)
    assert len(lins) == 210 and {q.layout for q in lins.values()} == {"rows"}
    for path, q in lins.items():
        # asp.load dequantised the same file (q/k un-permuted by transformers): bit for bit
        assert torch.equal(_bits(q.weight, T.Q4_1), _bits(smollm2.model.get_submodule(path).weight, T.Q4_1)), path
    for layer in (0, 29):  # RTN rows q4 of those values finds the file's own grid (all layers: the slow test)
        for path in [p for p in lins if f".{layer}." in p]:
            r = quantize_weight(smollm2.model.get_submodule(path).weight, Q4)
            q = lins[path]
            assert torch.equal(q.codes, r.codes) and torch.equal(q.scales, r.scales) and torch.equal(q.mins, r.mins)


@pytest.mark.slow  # an RTN copy of the whole model and two decoders: ~1 min on 2 cores
def test_embedded_smollm2_decodes_as_its_rtn_q4_copy(smollm2, smollm2_from_gguf):
    from actsparse.decode import FastDecoder
    from actsparse.quant import Q4Config, quantize_

    loaded, _ = smollm2_from_gguf
    rtn = copy.deepcopy(smollm2.model)
    quantize_(rtn, Q4Config())
    for path, q in _linears(loaded).items():  # the same codes, scales and mins in every linear
        r = rtn.get_submodule(path)
        assert torch.equal(q.codes, r.codes) and torch.equal(q.scales, r.scales) and torch.equal(q.mins, r.mins), path
    ids = smollm2.tokenizer("The history of Paris", return_tensors="pt").input_ids[0]
    assert list(FastDecoder(loaded).generate(ids, 4).tokens) == list(FastDecoder(rtn).generate(ids, 4).tokens)
