"""Real-model integration: profile SmolLM2-135M on the embedded Wikipedia text."""
import json

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
    down = kinds["mlp.down:input"]["pooled"]
    assert down["zero_sparsity"] < 0.01  # SiLU: exact zeros are rare
    assert 0.4 < down["threshold_sparsity"]["0.1"] < 0.85  # ... but |v| < 0.1 is common
    assert len(kinds["mlp.down:input"]["layers"]) == 30
    assert smollm2_profile.meta["data"]["tokens"] >= 512


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
    act = kinds["mlp.act:output"]["pooled"]
    assert 0.3 < act["zero_sparsity"] < 0.7  # ReLU of a random pre-activation: about half
    assert act["zero_sparsity"] == pytest.approx(1 - act["nonzero_per_token"])
    # h = relu(g) * u is zero wherever relu(g) is
    assert kinds["mlp.down:input"]["pooled"]["zero_sparsity"] >= act["zero_sparsity"] - 1e-9


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
