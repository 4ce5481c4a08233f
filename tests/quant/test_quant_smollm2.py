"""The real SmolLM2-135M (the embedded Q4_1 GGUF, loaded as fp32), a small token budget.

Its block linears are already on a 4-bit grid of blocks of 32 along the input (Q4_1: fp16
scale and min per block), which the q4 rows format reproduces exactly: q4 RTN is lossless on
this model and AWQ's search correctly picks alpha = 0 (any scaling moves the weights off the
grid). The measurements that do move: int8 (a symmetric grid: small loss) and q4 in the
transposed layout (other blocks: a real re-rounding). Larger budget: benchmarks/quant_quality_smollm2.py.
"""
from __future__ import annotations

import copy

import torch

from actsparse.data.text import text, token_windows
from actsparse.eval.perplexity import perplexity
from actsparse.kernels.quant_formats import quantize_weight
from actsparse.models.sitemaps import site_map
from actsparse.quant import Int8Config, Q4Config, calibration_rows, quantize_
from actsparse.quant.awq import search_scale


def test_q4_rtn_is_lossless_on_the_q4_1_checkpoint_and_awq_keeps_it(smollm2):
    model = smollm2.model
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        w = model.get_submodule(path).weight.detach()
        assert torch.equal(quantize_weight(w, "q4").dequantize(), w)
    calib = token_windows(smollm2.tokenizer, text("wiki", "calibration"), window=256, max_tokens=512)
    rows = calibration_rows(model, calib, 128)
    smap = site_map(model)
    lin = [model.get_submodule(smap.module_path(3, r)).weight.detach() for r in ("mlp.gate", "mlp.up")]
    r = search_scale(lin, ["rows", "rows"], rows[f"{smap.module_path(3, 'mlp.gate')}:input"], "q4", 20)
    assert r["alpha"] == 0.0 and r["mse"] == 0.0
    r8 = search_scale(lin, ["rows", "rows"], rows[f"{smap.module_path(3, 'mlp.gate')}:input"], "int8", 20)
    assert r8["mse"] <= r8["mse_rtn"]


def test_held_out_perplexity_int8_q4_and_transposed(smollm2):
    held = token_windows(smollm2.tokenizer, text("wiki", "test"), window=256, max_tokens=1024)
    ppl = {"dense": perplexity(smollm2.model, held).ppl}
    for name, cfg in (("int8", Int8Config()), ("q4", Q4Config()), ("q4-t", Q4Config(transposed=("mlp.down",)))):
        m = copy.deepcopy(smollm2.model)
        quantize_(m, cfg)
        ppl[name] = perplexity(m, held).ppl
    assert ppl["q4"] == ppl["dense"]  # lossless on this checkpoint (see the module docstring)
    assert abs(ppl["int8"] / ppl["dense"] - 1) < 0.02, ppl
    assert 1.0 < ppl["q4-t"] / ppl["dense"] < 1.25, ppl
