"""quantize_ / AWQ / save-load on a tiny random LLaMA (GQA, tied embeddings): fast and exact checks."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from actsparse.data.text import Windows
from actsparse.errors import DataError, StateError, UnsupportedError
from actsparse.models.sitemaps import site_map
from actsparse.quant import Int8Config, Q4Config, QuantLinear, calibration_rows, load_quantized, quantize_, save_quantized
from actsparse.quant.awq import search_and_fold


def _tiny(seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains and outlier channels (what AWQ is for)
        for mod in m.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.mul_(torch.rand_like(mod.weight) * 1.5 + 0.25)
                mod.weight[:3] *= 8
    return m


def _windows(n=8, length=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (n, length), generator=g)
    return Windows(ids, torch.ones_like(ids))


def _logits(model, w):
    with torch.no_grad():
        return model(input_ids=w.input_ids, attention_mask=w.attention_mask).logits


def test_folds_are_exact_before_rounding():
    model, win = _tiny(), _windows()
    ref = _logits(model, win)
    smap = site_map(model)
    rows = calibration_rows(model, win, 128, smap)
    layouts = {smap.module_path(i, r): "rows" for i in range(smap.num_layers) for r in smap.roles}
    rec = search_and_fold(model, smap, rows, "q4", layouts, 20)
    assert len(rec) == 8 and not any("skipped" in r for r in rec.values()), rec
    assert any(r["alpha"] > 0 for r in rec.values())  # something was actually scaled
    assert rec["model.layers.0.attn.o"]["folded_into"] == "model.layers.0.self_attn.v_proj"  # GQA-tied fold
    torch.testing.assert_close(_logits(model, win), ref, atol=1e-5, rtol=1e-5)


def test_awq_never_worse_than_rtn_on_the_calibration_rows():
    model, win = _tiny(), _windows()
    desc = quantize_(model, Q4Config(awq=True, sample_rows=128), calibration=win)
    for name, r in desc["awq"].items():
        assert r["mse"] <= r["mse_rtn"] * (1 + 1e-6), name
    assert sum(r["mse"] for r in desc["awq"].values()) < sum(r["mse_rtn"] for r in desc["awq"].values())


def test_awq_lowers_the_layer_output_error_of_the_quantised_model():
    """Independently of the search's own bookkeeping: fold on a copy, capture the folded model's
    own inputs (exactly x / s), round its linears, and compare each group's output MSE against
    the dense outputs with plain rounding of the original linears: AWQ <= RTN per group."""
    from actsparse.quant.awq import GROUPS, input_key

    dense, win = _tiny(), _windows()
    smap = site_map(dense)
    rows = calibration_rows(dense, win, 128, smap)
    folded = copy.deepcopy(dense)
    layouts = {smap.module_path(i, r): "rows" for i in range(smap.num_layers) for r in smap.roles}
    search_and_fold(folded, smap, rows, "q4", layouts, 20)
    rows_f = calibration_rows(folded, win, 128, smap)
    better = 0
    with torch.no_grad():
        for layer in range(smap.num_layers):
            for group, roles in GROUPS:
                key = input_key(smap, layer, roles)
                err = {"rtn": 0.0, "awq": 0.0}
                for role in roles:
                    path = smap.module_path(layer, role)
                    y = dense.get_submodule(path)(rows[key])
                    q_rtn = QuantLinear.from_linear(dense.get_submodule(path), "q4", "rows")
                    q_awq = QuantLinear.from_linear(folded.get_submodule(path), "q4", "rows")
                    # v and up also carry a later fold (their output rows / s): undo it on the output,
                    # which the row-wise blocks make exact (a row scale only rescales its blocks' scales)
                    yf = folded.get_submodule(path)(rows_f[key])
                    s = (y * yf).sum(0) / yf.pow(2).sum(0)
                    err["rtn"] += float((q_rtn(rows[key]) - y).pow(2).sum())
                    err["awq"] += float((q_awq(rows_f[key]) * s - y).pow(2).sum())
                assert err["awq"] <= err["rtn"] * (1 + 1e-4), (layer, group, err)
                better += err["awq"] < err["rtn"]
    assert better >= 4


@pytest.mark.parametrize("cfg", [Int8Config(), Q4Config(), Q4Config(awq=True, sample_rows=64, lm_head=True),
                                 Q4Config(transposed=("mlp.down",))], ids=["int8", "q4", "q4-awq-head", "q4-t"])
def test_save_load_round_trip_is_bit_exact(tmp_path, cfg):
    model, win = _tiny(), _windows()
    quantize_(model, cfg, calibration=win)
    assert all(isinstance(model.get_submodule(p), QuantLinear) for p in model.__dict__["_actsparse_quant"]["linears"])
    save_quantized(model, tmp_path)
    desc = json.loads((tmp_path / "quant.json").read_text())
    assert desc["version"] == 2 and desc["config"]["format"] == cfg.fmt
    back = load_quantized(_tiny(), tmp_path)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(_logits(model, win), _logits(back, win))
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.bin"))


def test_load_refuses_another_model_and_requantising(tmp_path):
    model = _tiny()
    quantize_(model, Int8Config())
    save_quantized(model, tmp_path)
    with pytest.raises(DataError, match="another model"):
        load_quantized(_tiny(seed=5), tmp_path)
    with pytest.raises(StateError, match="already quantised"):
        quantize_(model, Q4Config())
    with pytest.raises(DataError, match="calibration"):
        quantize_(_tiny(), Q4Config(awq=True))
    with pytest.raises(StateError, match="not quantised"):
        save_quantized(_tiny(), tmp_path / "x")


def test_old_versions_and_recast_scales_are_refused(tmp_path):
    """fp16 scales are the format: a version-1 file (fp32 scales), a file whose scales are not fp16
    and a model whose buffers were cast (model.float() casts them too) are refused, not rounded."""
    from safetensors.torch import load_file, save_file

    model = _tiny()
    quantize_(model, Q4Config())
    save_quantized(model, tmp_path / "q")
    desc = json.loads((tmp_path / "q" / "quant.json").read_text())
    (tmp_path / "q" / "quant.json").write_text(json.dumps({**desc, "version": 1}))
    with pytest.raises(DataError, match="version 1.*re-quantise"):
        load_quantized(_tiny(), tmp_path / "q")
    (tmp_path / "q" / "quant.json").write_text(json.dumps(desc))
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    key = next(k for k in state if k.endswith(".scales"))
    state[key] = state[key].float()
    save_file(state, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "actsparse-quantized"})
    with pytest.raises(DataError, match="scales is torch.float32"):
        load_quantized(_tiny(), tmp_path / "q")
    q = next(m for m in model.modules() if isinstance(m, QuantLinear))
    model.float()
    with pytest.raises(ValueError, match="re-quantise, or reload"):
        q.quant_weight()


def test_module_forward_is_the_dense_forward_of_the_dequantised_weight():
    lin = torch.nn.Linear(64, 96, bias=True)
    for fmt in ("int8", "q4"):
        for layout in ("rows", "transposed"):
            q = QuantLinear.from_linear(lin, fmt, layout)
            x = torch.randn(5, 64)
            torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.weight, lin.bias), rtol=0, atol=0)


def test_unmapped_model_is_refused():
    with pytest.raises(UnsupportedError, match="site map"):
        quantize_(torch.nn.Sequential(torch.nn.Linear(64, 64)), Int8Config())


def test_a_dense_plan_on_the_awq_model_keeps_the_dense_plans_channels(tmp_path):
    """AWQ divides each scaled linear's inputs by s; load_plan divides the plan's thresholds (and
    centres) by s too. On the folded fp model (exact folds, no rounding) the plan then computes
    what it computes on the dense model; on the AWQ-quantised model the first layer's q/k/v
    masks (its input is exact there too) are the dense model's."""
    import actsparse as asp
    from actsparse.sparsify.api import install
    from actsparse.sparsify.plan import awq_adjusted, read_plan

    dense, win = _tiny(), _windows()
    asp.sparsify_(dense, asp.TEAL(sparsity=0.5), calibration=win)
    asp.save_plan(dense, tmp_path / "plan")
    ref = _logits(dense, win)
    asp.desparsify_(dense)
    smap = site_map(dense)
    config, _, assignments, _ = read_plan(tmp_path / "plan")

    folded = copy.deepcopy(dense)
    scales = {}
    layouts = {smap.module_path(i, r): "rows" for i in range(smap.num_layers) for r in smap.roles}
    search_and_fold(folded, smap, calibration_rows(dense, win, 128, smap), "q4", layouts, 20, scales)
    assert len(scales) == 14 and any(float((s - 1).abs().max()) > 0.1 for s in scales.values())
    for path, s in scales.items():
        folded.get_submodule(path).input_scale = s
    install(folded, config, awq_adjusted(folded, assignments, "test"))
    torch.testing.assert_close(_logits(folded, win), ref, atol=1e-4, rtol=1e-4)
    # without the adjustment the folded model keeps other channels
    asp.desparsify_(folded)
    install(folded, config, assignments)
    assert float((_logits(folded, win) - ref).abs().max()) > 1e-2

    quantised = copy.deepcopy(dense)
    # packed by rows (quantised for the plan, every TEAL linear would be transposed, where AWQ
    # skips the groups): the plan runs on the torch path, the case the division is for
    desc = quantize_(quantised, Q4Config(awq=True, sample_rows=128), calibration=win)
    assert sum(v["input_scale"] for v in desc["linears"].values()) == 14
    save_quantized(quantised, tmp_path / "q")
    quantised = load_quantized(_tiny(), tmp_path / "q")  # the scales travel with the file
    asp.load_plan(quantised, tmp_path / "plan")
    masks = {}
    for m, tag in ((dense, "dense"), (quantised, "awq")):
        if tag == "dense":
            asp.load_plan(m, tmp_path / "plan")
        q = m.get_submodule("model.layers.0.self_attn.q_proj")
        h = q.register_forward_hook(lambda mod, inp, out, tag=tag: masks.__setitem__(tag, mod.keep_mask(inp[0])))
        _logits(m, win)
        h.remove()
    assert torch.equal(masks["dense"], masks["awq"])
    assert isinstance(quantised.get_submodule("model.layers.0.self_attn.q_proj").threshold, torch.Tensor)


def test_a_top_k_plan_is_refused_on_an_awq_model(tmp_path):
    import actsparse as asp
    from actsparse.errors import ConfigError

    dense, win = _tiny(), _windows()
    asp.sparsify_(dense, asp.TopK(sparsity=0.5, site="mlp.down:input"), calibration=win)
    asp.save_plan(dense, tmp_path / "plan")
    asp.desparsify_(dense)
    quantize_(dense, Q4Config(awq=True, sample_rows=64), calibration=win)
    with pytest.raises(ConfigError, match="top-k"):
        asp.load_plan(dense, tmp_path / "plan")


def test_awq_skips_transposed_groups_and_producers():
    """A transposed group's rounding is equivariant to its input scales (nothing to gain), and a
    transposed producer would be re-rounded by the fold: both skipped, with the reason."""
    model, win = _tiny(), _windows()
    desc = quantize_(model, Q4Config(awq=True, sample_rows=64, transposed=("mlp.down", "attn.v")), calibration=win)
    rec = desc["awq"]
    assert "packed transposed" in rec["model.layers.0.mlp.down"]["skipped"]
    assert "producer" in rec["model.layers.0.attn.o"]["skipped"]
    assert "packed transposed" in rec["model.layers.0.attn.qkv"]["skipped"]  # v is transposed
    assert "alpha" in rec["model.layers.0.mlp.gate_up"]
    assert not any(v["input_scale"] for p, v in desc["linears"].items() if "down_proj" in p or "o_proj" in p)
