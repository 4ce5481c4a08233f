"""Each architecture site map on a tiny randomly initialised model of that HF class."""
import warnings

import pytest
import torch
import transformers as T
from torch import nn

from actsparse.measure import capture
from actsparse.models.sitemaps import site_map

TINY = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                       num_attention_heads=2, num_key_value_heads=1, vocab_size=101)),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=101)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                       num_attention_heads=2, num_key_value_heads=1, vocab_size=101)),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                                       vocab_size=101)),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                                              vocab_size=101)),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_layer=2, n_embd=32, n_head=2, vocab_size=101, bos_token_id=0,
                                                   eos_token_id=0)),
    "opt": (T.OPTConfig, T.OPTForCausalLM, dict(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                                                vocab_size=101, word_embed_proj_dim=32)),
    "bert": (T.BertConfig, T.BertModel, dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=2, vocab_size=101)),
}
FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gemma": "gemma", "gemma3": "gemma",
          "gpt2": "gpt2", "opt": "opt", "bert": "bert"}


def _tiny(name):
    cfg_cls, model_cls, kw = TINY[name]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**kw)).eval()


@pytest.mark.parametrize("name", sorted(TINY))
def test_site_map_finds_every_role(name):
    model = _tiny(name)
    smap = site_map(model)
    assert smap.family == FAMILY[name]
    assert smap.num_layers == 2
    for role, rel in smap.roles.items():
        for layer in range(2):
            assert model.get_submodule(smap.module_path(layer, role)) is not None
    ids = torch.randint(0, 100, (2, 7))
    sites = ["mlp.act", "mlp.down:input", "attn.o:input"]
    with capture(model, sites=sites + ["linear_inputs"]) as cap:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    stats = cap.stats()
    for s in cap.sites:
        assert s.name in stats, f"{s.name} never fired"
        assert stats[s.name].rows == 14
    # the MLP activation output feeds the down projection directly in plain MLPs
    act = [n for n in stats if n.endswith(smap.roles["mlp.act"] + ":output")][0]
    assert stats[act].width == model.get_submodule(smap.module_path(0, "mlp.down")).weight.shape[
        0 if name == "gpt2" else 1]


def test_shared_inputs_are_captured_once():
    smap = site_map(_tiny("llama"))
    names = [s.name for s in smap.linear_input_sites()]
    assert len(names) == len(set(names)) == 2 * 4  # q(=k=v), o, gate(=up), down per layer
    assert smap.role_sites("attn.k:input")[0].name == smap.role_sites("attn.q:input")[0].name


def test_generic_fallback_warns_and_names_what_it_uses():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match="generic fallback: 1 activation modules and 2 linear inputs"):
        smap = site_map(model)
    assert smap.family == "generic"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with capture(model, sites="default") as cap:
            model(torch.randn(3, 4))
    assert set(cap.stats()) == {"1:output", "0:input", "2:input"}
    with pytest.raises(KeyError, match="needs an architecture site map"):
        smap.role_sites("mlp.act")


def test_smollm2_site_map_is_llama(smollm2):
    model, _ = smollm2
    smap = site_map(model)
    assert (smap.family, smap.blocks_path, smap.num_layers) == ("llama", "model.layers", 30)
    assert smap.role_sites("mlp.down:input")[3].name == "model.layers.3.mlp.down_proj:input"
