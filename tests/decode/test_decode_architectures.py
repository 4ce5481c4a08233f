"""FastDecoder on every decoder family the site maps know, against each model's own forward
(its masked dense forward when sparse modules are installed), token by token.

Tiny random-config models built with ``from_config`` exercise each architecture's pieces:
Mistral's sliding window, Qwen2's q/k/v bias and untied head, Qwen3's per-head q/k norms,
Gemma's (1 + w) norms, GELU-tanh MLP and scaled embedding, Gemma 2's sandwich norms,
soft-capping and alternating sliding/global layers, Gemma 3's q/k norms and per-layer RoPE
tables, Phi-3's fused qkv / gate_up projections and partial rotary.

Sparse modules use per-channel thresholds of 0 or +inf (each input always or never kept), so
no rounding difference between the kernels and the batched forward can flip a mask.
"""
import numpy as np
import pytest
import torch

from actsparse.decode import FastDecoder
from actsparse.decode.codes import Mode, Role
from actsparse.errors import UnsupportedError
from actsparse.models.sitemaps import LINEAR_ROLES, site_map
from actsparse.sparsify.modules import MaskedLinear, ThresholdedActivation

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _build(kind: str):
    import transformers as T

    torch.manual_seed(0)
    if kind == "mistral":
        cfg = T.MistralConfig(**COMMON, sliding_window=4)
        model = T.MistralForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = T.Qwen2Config(**COMMON, tie_word_embeddings=False)
        model = T.Qwen2ForCausalLM(cfg)
    elif kind == "qwen2-sliding":
        cfg = T.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=3, max_window_layers=1)
        model = T.Qwen2ForCausalLM(cfg)
    elif kind == "qwen3":
        cfg = T.Qwen3Config(**COMMON, head_dim=16)
        model = T.Qwen3ForCausalLM(cfg)
    elif kind == "gemma":
        cfg = T.GemmaConfig(**COMMON, head_dim=16, hidden_activation="gelu_pytorch_tanh")
        model = T.GemmaForCausalLM(cfg)
    elif kind == "gemma2":
        cfg = T.Gemma2Config(**COMMON, head_dim=16, sliding_window=4, attn_logit_softcapping=5.0,
                             final_logit_softcapping=3.0, query_pre_attn_scalar=16)
        cfg._attn_implementation = "eager"
        model = T.Gemma2ForCausalLM(cfg)
    elif kind == "gemma3":
        cfg = T.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=4, sliding_window_pattern=2,
                                 query_pre_attn_scalar=16)
        model = T.Gemma3ForCausalLM(cfg)
    elif kind == "phi3":
        cfg = T.Phi3Config(**COMMON, partial_rotary_factor=0.5, pad_token_id=0)
        model = T.Phi3ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.eval()
    with torch.no_grad():  # larger weights than the init, so that attention, norms and caps matter
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
            elif p.dim() == 1 and "norm" in name:
                p.uniform_(-0.3, 0.3) if kind.startswith("gemma") else p.uniform_(0.6, 1.4)
            else:
                p.normal_(0, 0.05)
    return model


KINDS = ["mistral", "qwen2", "qwen2-sliding", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]


def _mask(n, rng):
    return torch.tensor(np.where(rng.random(n) < 0.4, np.inf, 0.0), dtype=torch.float32)


def _install(model, variant: str, seed=0):
    """Per-channel 0/inf masks on every linear ("teal"; inputs shared by several linears get one
    mask, so q/k/v and gate/up fuse) or at the MLP activation ("cats")."""
    rng = np.random.default_rng(seed)
    smap = site_map(model, warn=False)
    for layer in range(smap.num_layers):
        if variant == "teal":
            masks = {}
            for role in LINEAR_ROLES:
                if role not in smap.roles:
                    continue
                path = smap.module_path(layer, role)
                lin = model.get_submodule(path)
                src = smap.input_source(role)
                masks.setdefault(src, _mask(lin.in_features, rng))
                model.set_submodule(path, MaskedLinear(lin, masks[src]))
        elif variant == "cats":
            path = smap.module_path(layer, "mlp.act")
            width = model.get_submodule(smap.module_path(layer, "mlp.down")).in_features
            model.set_submodule(path, ThresholdedActivation(model.get_submodule(path), width, _mask(width, rng)))


IDS = torch.tensor([3, 17, 5, 91, 42, 8, 61, 7, 23, 11, 2, 64])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", ["dense", "teal", "cats"])
@pytest.mark.parametrize("kind", KINDS)
def test_decode_matches_the_models_forward_fp32(kind, variant, threads):
    model = _build(kind)
    _install(model, variant)
    with torch.no_grad():
        ref = model(IDS[None]).logits[0].float().numpy()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dec = FastDecoder(model, max_len=16)
        got = np.stack([dec.step(int(t)).copy() for t in IDS])
    finally:
        torch.set_num_threads(old)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4)
    modes = dec.plan.modes()
    if variant == "teal":
        assert (modes[:, [Role.K, Role.V, Role.UP]] == Mode.FUSED).all()
        assert 0.2 < dec.decode_sparsity()["q"] < 0.6
    if variant == "cats":
        assert (dec.plan.act_modes() == Mode.THRESHOLD).all() and dec.decode_sparsity()["mlp.act"] > 0.2


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_weights_match_the_fp32_forward_on_the_same_values(kind):
    model = _build(kind)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    _install(model, "teal")
    with torch.no_grad():
        ref = model(IDS[None]).logits[0].float().numpy()
    model.to(torch.bfloat16)
    dec = FastDecoder(model, max_len=16)
    got = np.stack([dec.step(int(t)).copy() for t in IDS])
    # the other difference: model.to(bf16) also rounds RoPE's inv_freq buffer
    np.testing.assert_allclose(got, ref, atol=2e-3)


def test_sliding_window_changes_the_result():
    """The window is applied: the same weights without a window give other logits late in the
    sequence (and the same at the first position, which sees one key either way)."""
    model = _build("mistral")
    dec = FastDecoder(model, max_len=16)
    windowed = np.stack([dec.step(int(t)).copy() for t in IDS])
    model.config.sliding_window = None
    dec = FastDecoder(model, max_len=16)
    full = np.stack([dec.step(int(t)).copy() for t in IDS])
    np.testing.assert_allclose(full[0], windowed[0], atol=1e-5)
    assert np.abs(full[-1] - windowed[-1]).max() > 1e-3


@pytest.mark.parametrize("method", ["teal", "cats"])
@pytest.mark.parametrize("kind", KINDS)
def test_real_methods_and_accelerate_on_every_family(kind, method):
    """sparsify_ with calibrated TEAL / CATS plans on each family; accelerate_'s kernel linears
    and zero-skipping down projection (found through the site map) keep model.generate exact."""
    from actsparse.data.text import Windows
    from actsparse.decode import accelerate_
    from actsparse.sparsify import CATS, TEAL, desparsify_, sparsify_

    model = _build(kind)
    g = torch.Generator().manual_seed(0)
    cal = Windows(torch.randint(0, 97, (8, 64), generator=g), torch.ones(8, 64, dtype=torch.long))
    sparsify_(model, TEAL(sparsity=0.5) if method == "teal" else CATS(sparsity=0.5), calibration=cal)
    ids = IDS[None, :6]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    report = accelerate_(model)
    assert (report.kernel_linears > 0) if method == "teal" else (report.zero_skip_linears == 3)
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert got.tolist() == ref.tolist()
    dec = FastDecoder(model, max_len=16)
    assert dec.sparse_roles["q" if method == "teal" else "mlp.act"] == 3
    desparsify_(model)


def _refused_config(feature: str):
    import transformers as T

    if feature == "dynamic-rope":
        return T.LlamaForCausalLM(T.LlamaConfig(**COMMON, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    if feature == "longrope":
        half = COMMON["hidden_size"] // COMMON["num_attention_heads"] // 2
        return T.Phi3ForCausalLM(T.Phi3Config(**COMMON, pad_token_id=0, original_max_position_embeddings=32,
                                              rope_scaling={"type": "longrope", "short_factor": [1.0] * half,
                                                            "long_factor": [2.0] * half}))
    if feature == "bidirectional":
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**COMMON, head_dim=16, use_bidirectional_attention=True))
    if feature == "layernorm-gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    if feature == "parallel-neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64))
    raise ValueError(feature)


@pytest.mark.parametrize("feature,match", [
    ("dynamic-rope", "dynamic"), ("longrope", "longrope"), ("bidirectional", "bidirectional"),
    ("layernorm-gpt2", "non-gated MLP.*learned position.*LayerNorm"),
    ("parallel-neox", "site map.*none of its pieces is mapped: the attention projections"),
])
def test_unimplemented_features_are_refused_up_front(feature, match):
    with pytest.raises(UnsupportedError, match=match):
        FastDecoder(_refused_config(feature).eval(), max_len=8)
