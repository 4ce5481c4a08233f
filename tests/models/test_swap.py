"""The module-swap ledger: every swap is recorded and unwound newest first; what depends on
an owner goes with it; hooks and class changes are undone too."""
import torch
from torch import nn

from actsparse.models import swap


def _net():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2)))


def test_unwind_restores_the_very_objects_newest_first():
    net = _net()
    originals = dict(net.named_modules())
    swap.swap_module(net, "1", nn.GELU(), owner="a")
    inner = nn.Identity()
    swap.swap_module(net, "2.0", inner, owner="b")
    swap.swap_module(net, "2.0", nn.Tanh(), owner="b")  # stacked on b's own swap
    assert swap.has(net, "a") and swap.has(net, "b")
    undone = swap.unwind(net, "b")
    assert [e.owner for e in undone] == ["b", "b"]
    assert net[2][0] is originals["2.0"] and isinstance(net[1], nn.GELU)
    swap.unwind(net, "a")
    assert all(originals[n] is m for n, m in net.named_modules())
    assert swap.unwind(net, "a") == [] and not swap.has(net, "a")


def test_unwinding_an_owner_takes_later_entries_and_dependents_with_it():
    net = _net()
    originals = dict(net.named_modules())
    swap.swap_module(net, "2.0", nn.Identity(), owner="accelerate", depends_on=("sparsify",))  # before any sparsify
    swap.swap_module(net, "1", nn.GELU(), owner="sparsify")
    swap.swap_module(net, "0", nn.Identity(), owner="later")  # recorded after sparsify's first entry
    swap.unwind(net, "sparsify")
    assert all(originals[n] is m for n, m in net.named_modules())
    assert swap.ledger(net).entries == []


def test_hooks_and_class_changes_are_undone():
    net = _net()
    calls = []
    handle = net.register_forward_pre_hook(lambda m, a: calls.append(1))
    swap.add_hook(net, handle, owner="x")

    class LoudNorm(nn.LayerNorm):
        pass

    swap.swap_class(net, "2.1", LoudNorm, owner="x")
    net(torch.randn(1, 4))
    assert calls == [1] and type(net[2][1]) is LoudNorm
    swap.unwind(net, "x")
    net(torch.randn(1, 4))
    assert calls == [1] and type(net[2][1]) is nn.LayerNorm


def test_the_ledger_is_not_part_of_the_state_dict():
    net = _net()
    keys = set(net.state_dict())
    swap.swap_module(net, "1", nn.GELU(), owner="a")
    assert set(net.state_dict()) == keys


def test_relufy_is_recorded_and_can_be_unwound():
    from transformers import LlamaConfig, LlamaForCausalLM

    from actsparse.train.relufy import OWNER, relufy_

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    acts = [l.mlp.act_fn for l in model.model.layers]
    norm_cls = type(model.model.layers[0].input_layernorm)
    relufy_(model, after_norms=True)
    assert all(isinstance(l.mlp.act_fn, nn.ReLU) for l in model.model.layers)
    swap.unwind(model, OWNER)
    assert [l.mlp.act_fn for l in model.model.layers] == acts
    assert type(model.model.layers[0].input_layernorm) is norm_cls
