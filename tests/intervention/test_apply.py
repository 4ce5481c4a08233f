"""Switching neurons and experts off / on against references built without hooks: a LLaMA whose
down-projection columns are edited by hand, and MoE models with the expert removed outright."""
import copy

import pytest
import torch

from actsparse.errors import ConfigError, StateError
from actsparse.intervention import Intervention, Switch, active_intervention, intervene, intervene_, unintervene_
from actsparse.models.routers import routers
from mote_helpers import constructed_llama, tiny_moe, without_expert

IDS = torch.randint(3, 30, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def edited_reference(model, switches):
    """Off: the neuron's down-projection column zeroed; on at value v: the column zeroed and
    v times it added as a bias (what the neuron contributes when it holds v at every token)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for s in switches:
            down = ref.model.layers[s.layer].mlp.down_proj
            col = down.weight[:, s.index].clone()
            down.weight[:, s.index] = 0.0
            if s.mode == "on":
                if down.bias is None:
                    down.bias = torch.nn.Parameter(torch.zeros(down.out_features))
                down.bias += s.value * col
    return ref


def test_neuron_switches_equal_edited_weights():
    model = constructed_llama()
    switches = [Switch(0, 2, "off"), Switch(0, 4, "on", value=1.5), Switch(1, 0, "on", value=-0.7), Switch(1, 5, "off")]
    iv = Intervention("neurons", switches)
    dense = logits(model)
    with intervene(model, iv):
        got = logits(model)
    torch.testing.assert_close(got, logits(edited_reference(model, switches)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, dense)
    torch.testing.assert_close(logits(model), dense, rtol=0, atol=0)  # gone after the block


def test_act_site_off_equals_down_input_off():
    model = constructed_llama()
    sw = [Switch(0, 1, "off"), Switch(1, 3, "off")]
    with intervene(model, Intervention("neurons", sw, site="mlp.act")):
        act = logits(model)
    with intervene(model, Intervention("neurons", sw)):
        down = logits(model)
    torch.testing.assert_close(act, down, rtol=1e-6, atol=1e-7)


def test_hooks_are_owned_and_removed_on_error():
    model = constructed_llama()
    user = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: None)
    base = hook_count(model)
    iv = Intervention("neurons", [Switch(0, 2, "off")])
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(model, iv):
            assert hook_count(model) > base
            raise RuntimeError("boom")
    assert hook_count(model) == base and user.id in model.model.layers[0].mlp.down_proj._forward_pre_hooks


def test_persistent_apply_and_remove():
    model = constructed_llama()
    dense = logits(model)
    iv = Intervention("neurons", [Switch(0, 2, "off")])
    intervene_(model, iv)
    assert active_intervention(model) is iv
    with intervene(model, iv):
        pass
    with pytest.raises(StateError, match="already has"):
        intervene_(model, iv)
    torch.testing.assert_close(logits(model), logits(edited_reference(model, iv.switches)), rtol=1e-5, atol=1e-6)
    unintervene_(model)
    assert active_intervention(model) is None
    torch.testing.assert_close(logits(model), dense, rtol=0, atol=0)


def test_a_replaced_module_is_an_error_not_a_silent_no_op():
    model = constructed_llama()
    intervene_(model, Intervention("neurons", [Switch(0, 2, "off")]))
    mlp = model.model.layers[0].mlp
    mlp.down_proj = copy.deepcopy(mlp.down_proj)
    with pytest.raises(StateError, match="replaced after the intervention"):
        logits(model)
    unintervene_(model)
    logits(model)


def test_json_round_trip_and_model_checks(tmp_path):
    model = constructed_llama()
    iv = Intervention("neurons", [Switch(0, 2, "off"), Switch(1, 1, "on", value=0.25)], meta={"note": "t"})
    iv.save(tmp_path / "iv.json", model)
    back = Intervention.load(tmp_path / "iv.json", model)
    assert back.switches == iv.switches and back.site == iv.site and back.meta == iv.meta
    with pytest.raises(ConfigError, match="other weights"):
        Intervention.load(tmp_path / "iv.json", constructed_llama(seed=3))
    Intervention.load(tmp_path / "iv.json", constructed_llama(seed=3), check_weights=False)
    with pytest.raises(ConfigError, match="another model"):
        Intervention.load(tmp_path / "iv.json", tiny_moe("mixtral"))
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=7, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ConfigError, match="widths"):
        Intervention.load(tmp_path / "iv.json", wider)
    (tmp_path / "bad.json").write_text('{"format": "actsparse.intervention/1", "units": "neurons", "extra": 1}')
    with pytest.raises(ConfigError, match="unknown key"):
        Intervention.load(tmp_path / "bad.json")


def test_invalid_switches_are_refused():
    model = constructed_llama()
    with pytest.raises(ConfigError, match="finite value"):
        Intervention("neurons", [Switch(0, 1, "on")])
    with pytest.raises(ConfigError, match="switched twice"):
        Intervention("neurons", [Switch(0, 1, "off"), Switch(0, 1, "on", value=1.0)])
    with pytest.raises(ConfigError, match="mode"):
        Intervention("neurons", [Switch(0, 1, "dim")])
    with pytest.raises(ConfigError, match="has 6 neurons"):
        with intervene(model, Intervention("neurons", [Switch(0, 6, "off")])):
            pass
    with pytest.raises(ConfigError, match="no neurons in layer 2"):
        with intervene(model, Intervention("neurons", [Switch(2, 0, "off")])):
            pass


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_route_repeats_the_router_exactly(family):
    model = tiny_moe(family)
    h = torch.randn(20, 16)
    for r in routers(model):
        router = model.get_submodule(r.path)
        logits_, weights, idx = router(h)
        w2, i2 = r.kind.route(router, logits_)
        assert torch.equal(i2, idx) and torch.equal(w2, weights)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_switched_off_expert_is_never_routed_and_equals_the_model_without_it(family):
    model = tiny_moe(family)
    seen = []
    handles = [model.get_submodule(f"model.layers.{i}.mlp.experts").register_forward_pre_hook(
        lambda m, a, i=i: seen.append((i, a[1].clone()))) for i in (0, 1)]
    with intervene(model, Intervention("experts", [Switch(1, 2, "off")])):
        got = logits(model)
    dense_seen = list(seen)
    seen.clear()
    logits(model)
    for h in handles:
        h.remove()
    routed_off = [idx for layer, idx in dense_seen if layer == 1]
    assert routed_off and not (routed_off[0] == 2).any()
    assert (seen[1][1] == 2).any()  # the dense model does route to it
    torch.testing.assert_close(got, logits(without_expert(model, 1, 2)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, logits(model))


def test_forced_expert_is_always_selected_and_refusals():
    model = tiny_moe("qwen2_moe")
    seen = []
    h = model.model.layers[0].mlp.experts.register_forward_pre_hook(lambda m, a: seen.append(a[1].clone()))
    with intervene(model, Intervention("experts", [Switch(0, 3, "on"), Switch(0, 1, "off")])):
        logits(model)
    h.remove()
    idx = seen[0]
    assert (idx == 3).any(1).all() and not (idx == 1).any()
    with pytest.raises(ConfigError, match="forced on"):
        with intervene(model, Intervention("experts", [Switch(0, e, "on") for e in range(3)])):
            pass
    with pytest.raises(ConfigError, match="fewer than"):
        with intervene(model, Intervention("experts", [Switch(0, e, "off") for e in range(3)])):
            pass
    with pytest.raises(ConfigError, match="only a neuron"):
        Intervention("experts", [Switch(0, 1, "on", value=2.0)])
