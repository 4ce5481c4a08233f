"""Real-model integration: profile SmolLM2-135M on the embedded Wikipedia text."""
import json
import math

import pytest
import torch
import transformers as T

import actsparse as asp
from actsparse.cli import main


@pytest.fixture(scope="module")
def smollm2_profile(smollm2):
    model, tok = smollm2
    return asp.profile(model, tok, "wiki", tokens=512, window=256, batch_size=2, progress=False)


def test_silu_model_profile_looks_right(smollm2_profile):
    kinds = smollm2_profile.kind_tables()
    assert set(kinds) == {"mlp.act:output", "attn.q:input", "attn.o:input", "mlp.gate:input", "mlp.down:input"}
    down = kinds["mlp.down:input"]["over_layers"]
    assert down["zero_sparsity"] < 0.01  # SiLU: exact zeros are rare
    assert 0.4 < down["threshold_sparsity"]["0.1"] < 0.85  # ... but |v| < 0.1 is common
    assert len(kinds["mlp.down:input"]["layers"]) == 30
    assert smollm2_profile.meta["data"]["tokens"] >= 512


def test_kind_summary_is_per_layer_then_aggregated(smollm2_profile):
    """SmolLM2's first layers have dormant q inputs (8.9% in layer 0 at 4,096 tokens); pooling
    per-neuron sums across the 30 layers hid them (0.0% for every kind)."""
    kinds = smollm2_profile.kind_tables()
    for kind, table in kinds.items():
        layers, agg = table["layers"], table["over_layers"]
        for key in ("dormant_ratio_0.1", "zero_sparsity"):
            assert agg[key] == pytest.approx(sum(r[key] for r in layers) / len(layers)), (kind, key)
        shared = [r["activation_flow"]["shared_frac"] for r in layers]
        assert agg["activation_flow"]["shared_frac"] == pytest.approx(sum(shared) / len(shared)), kind
        assert agg["static_dead"] == sum(r["static_dead"] for r in layers)
    q = kinds["attn.q:input"]["over_layers"]
    assert q["dormant_ratio_0.1"] > 0
    assert q["dormant_ratio_0.1_max"]["layer"] == 0 and q["dormant_ratio_0.1_max"]["value"] > 0.03


def test_profile_save_load_roundtrip(smollm2_profile, tmp_path):
    smollm2_profile.save(tmp_path)
    back = asp.Profile.load(tmp_path)
    assert back.summary == json.loads((tmp_path / "profile.json").read_text())["summary"]
    for name, st in smollm2_profile.stats.items():
        for k, v in st.to_tensors().items():
            assert torch.equal(back.stats[name].to_tensors()[k], v)


def test_tiny_relu_model_shows_exact_zeros(smollm2):
    _, tok = smollm2
    torch.manual_seed(0)
    cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=tok.vocab_size + 64, hidden_act="relu")
    model = T.LlamaForCausalLM(cfg).eval()
    prof = asp.profile(model, tok, "news", tokens=256, window=128, progress=False, sites=["mlp.act", "mlp.down:input"])
    kinds = prof.kind_tables()
    act = kinds["mlp.act:output"]["over_layers"]
    assert 0.3 < act["zero_sparsity"] < 0.7  # ReLU of a random pre-activation: about half
    assert act["zero_sparsity"] == pytest.approx(1 - act["nonzero_per_token"])
    # h = relu(g) * u is zero wherever relu(g) is
    assert kinds["mlp.down:input"]["over_layers"]["zero_sparsity"] >= act["zero_sparsity"] - 1e-9


def test_nonfinite_activations_are_counted(smollm2):
    model, tok = smollm2
    layer = model.model.layers[0].mlp.act_fn
    handle = layer.register_forward_hook(lambda m, i, o: o.index_fill(-1, torch.tensor([0]), float("nan")))
    try:
        prof = asp.profile(model, tok, "wiki", tokens=128, window=64, sites=["mlp.act"], progress=False)
    finally:
        handle.remove()
    assert prof.meta["nonfinite_values"] > 0
    assert prof.stats["model.layers.0.mlp.act_fn:output"].nonfinite == prof.meta["data"]["tokens"]


def test_cli_profile_writes_json_and_report(tmp_path, capsys):
    out = tmp_path / "prof"
    rc = main(["profile", "--model", "smollm2-135m", "--data", "wiki", "--tokens", "256", "--window", "128",
               "--sites", "mlp", "--out", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads((out / "profile.json").read_text())
    assert doc["meta"]["data"]["tokens"] >= 256
    for f in ("report.md", "report.html", "stats.safetensors", "plots/sparsity_per_layer.png",
              "plots/abs_histograms.png", "plots/dormant_per_layer.png"):
        assert (out / f).stat().st_size > 0
    assert "Per-layer sparsity" in (out / "report.md").read_text()


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["profile", "--model", "nope", "--out", str(tmp_path)]) == 2
    assert "Embedded models" in capsys.readouterr().err
    assert main(["profile", "--tokens", "10", "--window", "64", "--out", str(tmp_path)]) == 2
    assert "fewer than one window" in capsys.readouterr().err
    assert not (tmp_path / "profile.json").exists()


@pytest.fixture
def inf_weight(smollm2):
    """SmolLM2 with one weight of layer 3's up projection set to inf (restored afterwards): from
    layer 3's down input on, the activations are inf / NaN."""
    model, tok = smollm2
    w = model.model.layers[3].mlp.up_proj.weight
    old = w.data[0, 0].item()
    w.data[0, 0] = math.inf
    try:
        yield model, tok
    finally:
        w.data[0, 0] = old


def test_profile_report_renders_non_finite_activations(inf_weight, tmp_path):
    from actsparse.report.profile_report import write_profile_report

    model, tok = inf_weight
    prof = asp.profile(model, tok, "wiki", tokens=256, window=128, progress=False)
    prof.save(tmp_path)
    md_path, html_path = write_profile_report(tmp_path)  # raised TypeError in report/plots.py
    md = md_path.read_text()
    assert prof.meta["nonfinite_values"] > 0
    assert "**Warning**" in md and "Layers without any finite value" in md and "mlp.down:input: 4-29" in md
    down = prof.kind_tables()["mlp.down:input"]
    assert down["layers_without_finite_values"] == list(range(4, 30))
    assert down["layers"][3]["nonfinite"] > 0 and down["layers"][3]["finite_entries"] > 0
    assert down["over_layers"]["layers_with_finite_values"] == 4
    assert 0 <= down["over_layers"]["dormant_ratio_0.1"] < 1
    for f in ("plots/sparsity_per_layer.png", "plots/abs_histograms.png", "plots/dormant_per_layer.png"):
        assert (tmp_path / f).stat().st_size > 0


def test_cli_profile_keeps_the_profile_and_drops_a_stale_report_when_rendering_fails(tmp_path, capsys):
    out = tmp_path / "prof"
    out.mkdir()
    for stale in ("report.md", "report.html"):
        (out / stale).write_text("an old report of another profile")
    (out / "plots").write_text("a file where the plots directory should go")  # rendering must fail
    rc = main(["profile", "--tokens", "256", "--window", "128", "--sites", "mlp.act", "--out", str(out),
               "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "the profile was saved to" in err and "rendering its report failed" in err and "was removed" in err
    assert json.loads((out / "profile.json").read_text())["meta"]["data"]["tokens"] >= 256
    assert (out / "stats.safetensors").is_file()
    assert not (out / "report.md").exists() and not (out / "report.html").exists()


def test_report_refuses_a_format_1_profile(smollm2_profile, tmp_path):
    from actsparse.errors import DataError
    from actsparse.report.profile_report import write_profile_report

    smollm2_profile.save(tmp_path)
    doc = json.loads((tmp_path / "profile.json").read_text())
    doc["format"] = "actsparse.profile/1"
    (tmp_path / "profile.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="Re-save it"):
        write_profile_report(tmp_path)
    asp.Profile.load(tmp_path).save(tmp_path)  # its statistics still load; re-saved as format 2
    assert write_profile_report(tmp_path)[0].is_file()
