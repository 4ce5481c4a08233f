"""Folded rotations: the rotated model computes the original's function (real SmolLM2 and tiny
random LLaMA / Qwen2 with GQA, tied and untied), the activations are in the PCA bases, the
saved rotation re-applies exactly and only to its weights, and unsupported models are refused."""
import copy

import pytest
import torch

from sparsify_helpers import random_windows

from actsparse.errors import ActsparseError, ConfigError, UnsupportedError
from actsparse.sparsify.rotation import load_rotation, rotate_, save_rotation

# fp32 logits of SmolLM2 (|logit| up to ~40) move by at most 3.3e-4 after rotating (measured)
SMOLLM2_ATOL = 1e-3
TINY_ATOL = 1e-4


def _gains_random_(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def tiny(kind="llama", tied=False, seed=0, **extra):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied, **extra)
    if kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    return _gains_random_(model.eval())


@torch.no_grad()
def logits(model, windows):
    return model(input_ids=windows.input_ids, attention_mask=windows.attention_mask).logits


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("heads", [True, False])
def test_tiny_llama_gqa_equivalent(tied, heads):
    model, cal, data = tiny(tied=tied), random_windows(pad_last=5), random_windows(n=2, seed=7)
    ref = logits(model, data)
    rotate_(model, cal, heads=heads)
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert torch.allclose(logits(model, data), ref, atol=TINY_ATOL)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if n.endswith("norm.weight"))


def test_qwen2_v_bias_equivalent():
    model, data = tiny("qwen2"), random_windows(n=2, seed=7)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.bias.normal_()
    ref = logits(model, data)
    rotate_(model, random_windows())
    assert torch.allclose(logits(model, data), ref, atol=TINY_ATOL)


def _inputs(model, module_name, windows):
    got = []
    mod = model.get_submodule(module_name)
    h = mod.register_forward_pre_hook(lambda _m, a: got.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    logits(model, windows)
    h.remove()
    return torch.cat(got)


def test_activations_are_in_the_pca_bases():
    """The rotated q_proj input is n(h) Q and the rotated o_proj input is, head by head, the
    original's times its KV group's R: a wrong side, transpose or head-group mapping fails."""
    model, cal = tiny(), random_windows()
    orig = copy.deepcopy(model)
    rot = rotate_(model, cal)
    site = "model.layers.1.self_attn"
    x0 = _inputs(orig, f"{site}.q_proj", cal).double() / orig.model.layers[1].input_layernorm.weight.double()
    x1 = _inputs(model, f"{site}.q_proj", cal).double()
    assert torch.allclose(x0 @ rot.q, x1, atol=1e-4)
    a0, a1 = _inputs(orig, f"{site}.o_proj", cal).double(), _inputs(model, f"{site}.o_proj", cal).double()
    r = rot.heads[1]  # (kv=2, 16, 16); query heads 0,1 read kv head 0, heads 2,3 kv head 1
    for h in range(4):
        cols = slice(16 * h, 16 * (h + 1))
        assert torch.allclose(a0[:, cols] @ r[h // 2], a1[:, cols], atol=1e-4)
    cov = x1.T @ x1  # a diagonal of descending variances in the PCA basis (of q_proj's layer only roughly)
    assert not torch.allclose(rot.q, torch.eye(64, dtype=rot.q.dtype))
    assert cov.diagonal()[:8].mean() > cov.diagonal()[-8:].mean()


def test_save_load_roundtrip_and_identity(tmp_path):
    model, cal, data = tiny(), random_windows(), random_windows(n=2, seed=7)
    fresh, other = copy.deepcopy(model), tiny(seed=5)
    rotate_(model, cal)
    save_rotation(model, tmp_path / "rot")
    load_rotation(fresh, tmp_path / "rot")
    for (n, p), (_, q) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(p, q), n
    with pytest.raises(ConfigError, match="other weights"):
        load_rotation(other, tmp_path / "rot")
    with pytest.raises(ConfigError, match="already rotated"):
        load_rotation(fresh, tmp_path / "rot")
    assert torch.equal(logits(model, data), logits(fresh, data))


def test_plan_of_rotated_model_refused_on_unrotated(tmp_path):
    import actsparse as asp

    model, cal = tiny(), random_windows()
    orig = copy.deepcopy(model)
    rotate_(model, cal)
    asp.sparsify_(model, asp.TEAL(sparsity=0.5), calibration=cal)
    asp.save_plan(model, tmp_path / "plan")
    with pytest.raises(ActsparseError):
        asp.load_plan(orig, tmp_path / "plan")
    with pytest.raises(ConfigError, match="desparsify_"):
        rotate_(model, cal)


def test_refuses_unsupported():
    import transformers as tf

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedError, match="'gpt2'"):
        rotate_(gpt2, random_windows())
    gemma = tf.GemmaForCausalLM(tf.GemmaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               head_dim=16))
    with pytest.raises(UnsupportedError, match="'gemma'"):
        rotate_(gemma, random_windows())
    with pytest.raises(UnsupportedError, match="down_proj has a bias"):
        rotate_(tiny(mlp_bias=True), random_windows())


def test_smollm2_rotated_logits_equal(smollm2):
    from actsparse.data.text import text, token_windows

    model, tok = copy.deepcopy(smollm2.model), smollm2.tokenizer
    cal = token_windows(tok, text("wiki", "calibration"), window=256, max_tokens=512)
    data = token_windows(tok, text("wiki", "test"), window=256, max_tokens=256)
    ref = logits(model, data)
    rotate_(model, cal)
    assert (logits(model, data) - ref).abs().max() < SMOLLM2_ATOL


def test_damaged_rotation_files_refused(tmp_path):
    """A missing file, or a saved matrix that is not orthogonal, is refused before folding."""
    from safetensors.torch import load_file, save_file

    model = tiny()
    fresh = copy.deepcopy(model)
    rotate_(model, random_windows())
    save_rotation(model, tmp_path / "rot")
    with pytest.raises(ConfigError, match="no rotation.json"):
        load_rotation(copy.deepcopy(fresh), tmp_path / "missing")
    t = load_file(str(tmp_path / "rot" / "rotation.safetensors"))
    t["q"] = t["q"] * 1.01
    save_file(t, str(tmp_path / "rot" / "rotation.safetensors"), metadata={"format": "actsparse-rotation/1"})
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ConfigError, match="not orthogonal"):
        load_rotation(fresh, tmp_path / "rot")
    for n, p in fresh.state_dict().items():
        assert torch.equal(p, before[n]), n
