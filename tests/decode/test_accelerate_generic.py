"""An architecture outside the site maps (GPT-NeoX): TEAL on its linears, accelerate_ on the
kernels, a plan that round-trips, and refusals of what needs a map."""
import pytest
import torch

import actsparse as asp
from actsparse.cli import main
from actsparse.decode.accelerate import KernelLinear
from actsparse.errors import ConfigError
from actsparse.models.sitemaps import generic_linears, site_map
from actsparse.sparsify.modules import MaskedLinear, reached_sparsity, reset_counts


def tiny_neox(seed=0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=256)
    return GPTNeoXForCausalLM(cfg).eval()


def windows(n=8, window=64, seed=1):
    from actsparse.data.text import Windows

    ids = torch.randint(0, 500, (n, window), generator=torch.Generator().manual_seed(seed))
    return Windows(ids, torch.ones_like(ids))


def test_generic_linears_are_every_linear_but_the_head():
    model = tiny_neox()
    paths = generic_linears(model)
    assert len(paths) == 2 * 4  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h per layer
    assert "embed_out" not in paths and all(isinstance(model.get_submodule(p), torch.nn.Linear) for p in paths)


def test_teal_on_an_unmapped_model_thresholds_every_linear_input():
    model = tiny_neox()
    assert site_map(model, warn=False).family == "generic"
    cal = windows()
    asp.sparsify_(model, asp.TEAL(sparsity=0.5), calibration=cal)
    sparse = {p: m for p, m in model.named_modules() if isinstance(m, MaskedLinear)}
    assert sorted(sparse) == sorted(generic_linears(model))
    assert not isinstance(model.get_output_embeddings(), MaskedLinear)
    # each threshold is its own input's calibration median: about half the inputs drop on that data
    reset_counts(model)
    with torch.no_grad():
        model(cal.input_ids, attention_mask=cal.attention_mask)
    assert reached_sparsity(model)["linear:input"] == pytest.approx(0.5, abs=0.02)
    # the masked dense forward is the linear on the masked input
    lin = sparse["gpt_neox.layers.0.mlp.dense_4h_to_h"]
    x = torch.randn(3, 128)
    torch.testing.assert_close(lin(x), lin.linear(x * (x.abs() > lin.threshold)))


def test_accelerate_on_an_unmapped_model_decodes_as_the_masked_model_and_warns():
    model = tiny_neox()
    asp.sparsify_(model, asp.TEAL(sparsity=0.5), calibration=windows())
    ids = windows(n=1, window=12, seed=5).input_ids
    kw = dict(max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    with pytest.warns(UserWarning, match="no site map.*8 sparse linears for kernel linears.*FastDecoder refuses"):
        report = asp.accelerate_(model)
    assert report.kernel_linears == 8 and report.zero_skip_linears == 0
    assert sum(isinstance(m, KernelLinear) for m in model.modules()) == 8
    with torch.no_grad():
        got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    asp.desparsify_(model)
    assert not any(isinstance(m, MaskedLinear) for m in model.modules())


def test_generic_plan_round_trips(tmp_path):
    model = tiny_neox()
    asp.sparsify_(model, asp.TEAL(sparsity=0.4, overrides=(("*.attention.dense", None),)), calibration=windows())
    asp.save_plan(model, tmp_path / "plan")
    other = tiny_neox()
    asp.load_plan(other, tmp_path / "plan")
    a = {p: m.threshold for p, m in model.named_modules() if isinstance(m, MaskedLinear)}
    b = {p: m.threshold for p, m in other.named_modules() if isinstance(m, MaskedLinear)}
    assert a == b and len(a) == 6  # the two attention output linears stay dense


@pytest.mark.parametrize("config, match", [
    (lambda: asp.CATS(sparsity=0.5), "needs an architecture site map.*TEAL \\(uniform\\) runs"),
    (lambda: asp.TEAL(sparsity=0.5, allocation="greedy"), "allocation='uniform'"),
    (lambda: asp.TEAL(sparsity=0.5, kinds=("mlp.down",)), "kinds.*selects roles"),
])
def test_what_needs_a_site_map_is_refused(config, match):
    with pytest.raises(ConfigError, match=match):
        asp.sparsify_(tiny_neox(), config(), calibration=windows())


def test_cli_calibrates_and_generates_an_unmapped_model(tmp_path, smollm2, capsys):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    _, tok = smollm2
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model_dir = tmp_path / "neox"
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    plan = tmp_path / "plan"
    assert main(["calibrate", "--model", str(model_dir), "--method", "teal", "--sparsity", "0.5", "--tokens", "1024",
                 "--window", "128", "--out", str(plan), "--no-progress"]) == 0
    assert main(["generate", "--model", str(model_dir), "--engine", "hf", "--plan", str(plan),
                 "--max-new-tokens", "4", "--no-stream"]) == 0
    err = capsys.readouterr().err
    assert "engine hf" in err
