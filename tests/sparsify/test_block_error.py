"""The true block-output error of TEAL's greedy (actsparse.sparsify.block_error), against a
brute-force reference: the whole model run with real MaskedLinear modules in one layer."""
import pytest
import torch

from actsparse.errors import ConfigError
from actsparse.models.sitemaps import site_map
from actsparse.sparsify import TEAL, calibrate
from actsparse.sparsify.allocation import BlockOutputGreedy, block_greedy
from actsparse.sparsify.block_error import sequence_key
from actsparse.sparsify.modules import MaskedLinear
from actsparse.sparsify.targets import Target

from sparsify_helpers import random_windows, tiny_llama

GREEDY = TEAL(allocation="greedy", greedy_sequences=3, greedy_sequence_tokens=48)


def tiny_gemma3(seed=0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                           sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(cfg).eval()


def reference_error(model, ids, layer, thresholds: dict[str, float], target) -> float:
    """Run the whole model twice: dense, and with MaskedLinear (threshold t_kind) on every
    linear of ``layer`` reading kind's input; the relative squared error of that layer's
    output, mean over tokens."""
    blocks = model.get_submodule(target.smap.blocks_path)
    outs = []
    h = blocks[layer].register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
    originals = {}
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
            for kind, t in thresholds.items():
                for role in target.readers(kind):
                    path = target.path(layer, role)
                    parent, _, name = path.rpartition(".")
                    orig = model.get_submodule(path)
                    originals[path] = (model.get_submodule(parent), name, orig)
                    setattr(model.get_submodule(parent), name, MaskedLinear(orig, t))
            model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
        for parent, name, orig in originals.values():
            setattr(parent, name, orig)
    dense, sparse = outs[0].float(), outs[1].float()
    return float(((sparse - dense).pow(2).sum(-1) / dense.pow(2).sum(-1)).mean())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_block_error_equals_the_masked_model(make):
    model = make()
    stats = calibrate(model, [GREEDY], random_windows())
    ids = stats[sequence_key(3, 48)]
    assert tuple(ids.shape) == (3, 48)
    target = Target(model, GREEDY, site_map(model, warn=False))
    for layer in range(2):
        g = block_greedy(target, stats, layer)
        assert isinstance(g, BlockOutputGreedy)
        # states that change the attention kinds and the MLP kinds (the latter replay attention)
        for state in ({"attn.q": 6, "attn.o": 4, "mlp.gate": 10, "mlp.down": 8},
                      {"attn.q": 6, "attn.o": 4, "mlp.gate": 12, "mlp.down": 8},
                      {"attn.q": 0, "attn.o": 9, "mlp.gate": 0, "mlp.down": 15}):
            thr = {k: g._t(k, i) for k, i in state.items()}
            ref = reference_error(model, ids, layer, thr, target)
            assert ref > 0
            assert g.error(state) == pytest.approx(ref, rel=1e-5, abs=1e-9)
        assert g.error({k: 0 for k in g.kinds}) == 0.0


def test_block_error_refuses_a_layerwise_calibration_and_other_families():
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    phi = Phi3ForCausalLM(Phi3Config(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)).eval()
    with pytest.raises(ConfigError, match="greedy"):
        calibrate(phi, [TEAL(allocation="greedy")], random_windows(window=32))
    with pytest.raises(ConfigError, match="greedy_error"):
        TEAL(allocation="greedy", greedy_error="output")
    with pytest.raises(ConfigError, match="greedy_sequences"):
        TEAL(allocation="greedy", greedy_sequences=0)


def test_block_greedy_on_the_real_model(smollm2):
    """SmolLM2-135M on wiki calibration text: the greedy's block error is the masked model's,
    its path lands on the target exactly, and it beats uniform on that error."""
    from actsparse.data.text import text, token_windows

    model, tok = smollm2
    cal = token_windows(tok, text("wiki", "calibration"), window=256, max_tokens=1024)
    cfg = TEAL(sparsity=0.5, allocation="greedy", greedy_sequences=2, greedy_sequence_tokens=64)
    stats = calibrate(model, [cfg], cal)
    ids = stats[sequence_key(2, 64)]
    target = Target(model, cfg, site_map(model, warn=False))
    for layer in (0, 20):
        g = block_greedy(target, stats, layer)
        alloc = g.allocation(0.5)
        assert sum(g.params[k] * s for k, s in alloc.items()) / g.total == pytest.approx(0.5, abs=1e-12)
        state = next(st for w, st, _, _ in g.path if w >= 0.5 - 1e-12)
        ref = reference_error(model, ids, layer, {k: g._t(k, i) for k, i in state.items()}, target)
        assert g.error(state) == pytest.approx(ref, rel=1e-4)
        assert g.error(state) < g.error({k: 10 for k in g.kinds})  # uniform 0.5
