"""Every mapped family gets every method on every linear: GPT-2's Conv1D linears (a transposed
weight) and MLPs without a gate (OPT, GPT-2), where TEAL's "mlp.gate" input kind is the MLP's
input and must reach the up projection."""
import pytest
import torch

from actsparse.decode import accelerate_
from actsparse.sparsify import CATS, CETT, TEAL, WINA, TopK, desparsify_, iter_sparse_modules, sparsify_
from actsparse.sparsify.modules import MaskedLinear

from sparsify_helpers import random_windows


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=500, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=500, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32)).eval()


@pytest.mark.parametrize("cfg", [TEAL(sparsity=0.5), CATS(sparsity=0.5), TopK(sparsity=0.5),
                                 TopK(sparsity=0.5, site="mlp.down:input"), WINA(sparsity=0.5),
                                 CETT(cett=0.2, sample_tokens=256)], ids=lambda c: f"{c.METHOD}")
def test_gpt2_conv1d_linears_are_sparsified(cfg):
    """Issue: sparsify_ crashed on GPT-2's Conv1D (TEAL TypeError, CATS / Top-K AttributeError)."""
    model = tiny_gpt2()
    sparsify_(model, cfg, calibration=random_windows(window=32))
    try:
        mods = dict(iter_sparse_modules(model))
        assert mods
        x = torch.randn(1, 3, 32)
        for path, m in mods.items():
            if isinstance(m, MaskedLinear):
                xm = torch.randn(1, 3, m.in_features)
                want = m.linear(xm * m.keep_mask(xm))  # the dense Conv1D on the masked input
                torch.testing.assert_close(m(xm), want)
        with torch.no_grad():
            assert torch.isfinite(model(torch.randint(0, 500, (1, 8))).logits).all()
        if cfg.METHOD == "teal":
            assert sorted(p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1] for p in mods if ".0." in p) == \
                ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    finally:
        desparsify_(model)
    assert not any(isinstance(m, MaskedLinear) for m in model.modules())


def test_gpt2_plan_runs_on_the_kernels():
    model = tiny_gpt2()
    sparsify_(model, TEAL(sparsity=0.5), calibration=random_windows(window=32))
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    report = accelerate_(model)
    assert report.kernel_linears == 8
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert got.tolist() == ref.tolist()
    desparsify_(model)


def test_teal_reaches_the_up_projection_of_an_ungated_mlp():
    """Issue: TEAL silently left OPT's fc1 (GPT-2's c_fc, BERT's intermediate) dense."""
    model = tiny_opt()
    sparsify_(model, TEAL(sparsity=0.5), calibration=random_windows(window=32))
    try:
        mods = [p for p, _ in iter_sparse_modules(model) if ".layers.0." in p]
        names = sorted(p.split(".layers.0.")[1] for p in mods)
        assert names == ["fc1", "fc2", "self_attn.k_proj", "self_attn.out_proj", "self_attn.q_proj",
                         "self_attn.v_proj"]
        fc1 = dict(iter_sparse_modules(model))["model.decoder.layers.0.fc1"]
        assert fc1.site_kind == "mlp.up:input" and fc1.threshold > 0
    finally:
        desparsify_(model)
