import copy

import pytest
import torch
from torch import nn

from actsparse.errors import ConfigError
from actsparse.train.fatrelu import FATReLU, fatrelu_
from actsparse.train.relufy import ReLUAfterNorm, relufy_


def tiny_llama(seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_relufy_tiny_llama_idempotent_and_forward():
    model = tiny_llama()
    keys = list(model.state_dict())
    changes = relufy_(model)
    paths = [c.path for c in changes]
    assert paths == ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn", "config.hidden_act"]
    assert all(isinstance(model.model.layers[i].mlp.act_fn, nn.ReLU) for i in range(2))
    assert model.config.hidden_act == "relu"
    assert relufy_(model) == []
    ids = torch.randint(0, 64, (2, 8))
    captured = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    model(ids)
    h.remove()
    gate = model.model.layers[0].mlp.gate_proj
    # zeros in the down input exactly where the gate pre-activation is <= 0
    assert (captured[0] == 0).float().mean() > 0.3
    # after_norms: class swap keeps parameters and state-dict keys
    norm = model.model.layers[0].input_layernorm
    w = norm.weight
    changes = relufy_(model, after_norms=True)
    assert [c.path for c in changes] == [f"model.layers.{i}.{n}" for i in range(2)
                                         for n in ("input_layernorm", "post_attention_layernorm")]
    assert model.model.layers[0].input_layernorm is norm and norm.weight is w and isinstance(norm, ReLUAfterNorm)
    assert list(model.state_dict()) == keys
    x = torch.randn(3, 16)
    assert (norm(x) >= 0).all() and (norm(x) == 0).any()
    assert relufy_(model, after_norms=True) == []
    assert not isinstance(model.model.norm, ReLUAfterNorm)  # the final norm is left alone
    model(ids)
    assert gate is model.model.layers[0].mlp.gate_proj


def test_relufy_gpt2_and_generic_and_errors():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    ch = relufy_(gpt, after_norms=True)
    assert {c.path for c in ch} >= {"transformer.h.0.mlp.act", "transformer.h.1.ln_2", "config.activation_function"}
    assert isinstance(gpt.transformer.h[1].mlp.act, nn.ReLU)
    gpt(torch.randint(0, 50, (1, 5)))
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16))
    assert any(c.path.endswith("intermediate_act_fn") for c in relufy_(bert))
    with pytest.raises(ConfigError, match="pre-norm"):
        relufy_(bert, after_norms=True)
    generic = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 4), nn.SiLU())
    ch = relufy_(generic)
    assert [c.path for c in ch] == ["1", "3"] and isinstance(generic[3], nn.ReLU)
    with pytest.raises(ConfigError):
        relufy_(nn.Sequential(nn.Linear(2, 2)))
    from actsparse.train.topk import TopKActivation

    kept = nn.Sequential(nn.Linear(3, 4), TopKActivation(2, nn.ReLU()))
    assert relufy_(kept) == [] and isinstance(kept[1], TopKActivation)


def test_fatrelu_swap():
    model = tiny_llama(layers=1)
    relufy_(model)
    ch = fatrelu_(model, 0.01)
    assert len(ch) == 1 and isinstance(model.model.layers[0].mlp.act_fn, FATReLU)
    assert relufy_(model) == []  # FATReLU counts as ReLU
    assert fatrelu_(model, 0.01) == []
    assert len(fatrelu_(model, 0.02)) == 1 and model.model.layers[0].mlp.act_fn.threshold == 0.02


def test_relufy_real_smollm2(smollm2):
    model = copy.deepcopy(smollm2.model)
    changes = relufy_(model, after_norms=True)
    n = model.config.num_hidden_layers
    assert sum(c.path.endswith("mlp.act_fn") for c in changes) == n == 30
    assert sum(c.path.endswith("layernorm") for c in changes) == 2 * n
    assert type(smollm2.model.model.layers[0].mlp.act_fn).__name__ != "ReLU"  # the fixture is untouched
    assert smollm2.model.config.hidden_act != "relu"
    ids = smollm2.tokenizer("The cat sat on the mat.", return_tensors="pt")["input_ids"]
    seen = []
    h = model.model.layers[3].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        out = model(ids)
    h.remove()
    assert torch.isfinite(out.logits).all()
    assert float((seen[0] == 0).float().mean()) > 0.3
