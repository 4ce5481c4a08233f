"""TEAL's block-wise greedy allocation (actsparse.sparsify.allocation)."""
import pytest
import torch

from actsparse.errors import ConfigError
from actsparse.eval.perplexity import perplexity
from actsparse.sparsify import TEAL, calibrate, desparsify_, sparsify_
from actsparse.sparsify.api import plan_assignments
from actsparse.sparsify.modules import MaskedLinear
from actsparse.sparsify.plan import load_plan, save_plan
from actsparse.sparsify.teal import INPUT_KINDS

from sparsify_helpers import random_windows, tiny_llama

GREEDY = TEAL(allocation="greedy")


@pytest.fixture(scope="module")
def greedy_stats():
    model = tiny_llama()
    cal = random_windows()
    return model, cal, calibrate(model, [GREEDY, TEAL(allocation="greedy", greedy_error="linear")], cal)


def _by_layer(assignments):
    """{layer: {kind: sparsity}} from the assignments' targets."""
    out = {}
    for a in assignments:
        layer = int(a.path.split(".layers.")[1].split(".")[0])
        out.setdefault(layer, {})[a.site_kind.split(":")[0]] = a.target
    return out


def _kind_params(model, layer):
    from actsparse.models.sitemaps import site_map

    smap = site_map(model, warn=False)
    return {k: sum(model.get_submodule(smap.module_path(layer, r)).weight.numel() for r in roles)
            for k, roles in INPUT_KINDS.items()}


def _weighted(alloc, params):
    return sum(params[k] * s for k, s in alloc.items()) / sum(params[k] for k in alloc)


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_nominal_weighted_sparsity_is_the_target(greedy_stats, s):
    model, _, stats = greedy_stats
    alloc = _by_layer(plan_assignments(model, TEAL(sparsity=s, allocation="greedy"), stats=stats))
    for layer, kinds in alloc.items():
        assert set(kinds) == set(INPUT_KINDS)
        assert _weighted(kinds, _kind_params(model, layer)) == pytest.approx(s, abs=1e-9)
        assert all(0 <= v <= 0.95 + 1e-9 for v in kinds.values())


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_reached_weighted_sparsity_on_calibration_data(greedy_stats, s):
    """The thresholds, applied to the dense model's calibration activations, mask a
    parameter-weighted fraction within 1 point of the target in every block."""
    model, cal, stats = greedy_stats
    counters, handles = [], []
    for a in plan_assignments(model, TEAL(sparsity=s, allocation="greedy"), stats=stats):
        orig = model.get_submodule(a.path)
        m = MaskedLinear(orig, a.threshold)
        handles.append(orig.register_forward_pre_hook(lambda mod, args, m=m: m._count(m.keep_mask(args[0]))))
        counters.append((a.path, m))
    try:
        perplexity(model, cal)
    finally:
        for h in handles:
            h.remove()
    per_layer = {}
    for path, m in counters:
        layer = int(path.split(".layers.")[1].split(".")[0])
        w = model.get_submodule(path).weight.numel()
        acc = per_layer.setdefault(layer, [0.0, 0])
        acc[0] += w * m.reached
        acc[1] += w
    for layer, (num, den) in per_layer.items():
        assert abs(num / den - s) <= 0.01, (layer, num / den)


@pytest.mark.parametrize("norm", ["block", "linear", "pooled", "sublayer", "token"])
@pytest.mark.parametrize("norm_layer, cheap", [("input_layernorm", "attn.q"), ("post_attention_layernorm", "mlp.gate")])
def test_greedy_spends_sparsity_where_the_inputs_matter_least(norm, norm_layer, cheap):
    """Shrink 80% of the channels of a norm's gain 10^4 times: 80% of the input of the
    linears after it is almost zero, so masking it costs (almost) nothing. The greedy raises
    that kind to about 0.8 before anything else, whatever the block error."""
    model = tiny_llama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(f"{norm_layer}.weight"):
                p[: int(0.8 * p.numel())] *= 1e-4
    target = 0.15
    cfg = TEAL(sparsity=target, allocation="greedy", greedy_error=norm)
    alloc = _by_layer(plan_assignments(model, cfg, calibration=random_windows()))
    for layer, kinds in alloc.items():
        params = _kind_params(model, layer)
        assert kinds[cheap] >= min(0.75, target * sum(params.values()) / params[cheap] - 1e-9), (layer, kinds)
        assert all(kinds[cheap] > v for k, v in kinds.items() if k != cheap), (layer, kinds)
        assert _weighted(kinds, params) == pytest.approx(target)


@pytest.mark.parametrize("config", [GREEDY, TEAL(allocation="greedy", greedy_error="linear")], ids=["block", "linear"])
def test_greedy_beats_uniform_on_its_block_error(greedy_stats, config):
    from actsparse.models.sitemaps import site_map
    from actsparse.sparsify.allocation import block_greedy
    from actsparse.sparsify.targets import Target

    model, _, stats = greedy_stats
    smap = site_map(model, warn=False)
    for layer in range(smap.num_layers):
        g = block_greedy(Target(model, config, smap), stats, layer)
        g.extend_to(0.5)
        greedy_state = next(st for w, st, _, _ in g.path if w >= 0.5 - 1e-12)
        uniform_state = {k: 10 for k in g.kinds}  # 10 x 0.05 = 0.5
        assert g.weighted(uniform_state) == pytest.approx(0.5)
        assert g.error(greedy_state) <= g.error(uniform_state)
        # the path is cached: a second lookup returns the same object (a bisection pays once)
        assert block_greedy(Target(model, config, smap), stats, layer) is g


def test_greedy_plan_round_trip_and_sparse_model(greedy_stats, tmp_path):
    model, cal, stats = greedy_stats
    cfg = TEAL(sparsity=0.5, allocation="greedy")
    sparsify_(model, cfg, stats=stats)
    try:
        before = perplexity(model, cal)
        save_plan(model, tmp_path / "plan")
    finally:
        desparsify_(model)
    load_plan(model, tmp_path / "plan")
    try:
        after = perplexity(model, cal)
        assert model._actsparse_sparsity.config == cfg
    finally:
        desparsify_(model)
    assert after.ppl == before.ppl
    assert abs(before.bytes_skipped - 0.5) < 0.03  # sequential effects: later inputs shift a little


def test_greedy_config_checks_and_variant():
    from actsparse.sparsify.registry import make_config

    assert make_config("teal-greedy", 0.4) == TEAL(sparsity=0.4, allocation="greedy")
    assert make_config("teal-greedy", 0.4).greedy_error == "block"
    assert make_config("teal-greedy-linear", 0.4) == TEAL(sparsity=0.4, allocation="greedy", greedy_error="linear")
    with pytest.raises(ConfigError, match="greedy_step"):
        TEAL(allocation="greedy", greedy_step=0)
    with pytest.raises(ConfigError, match="greedy_tokens"):
        TEAL(allocation="greedy", greedy_tokens=10)
    with pytest.raises(ConfigError, match="allocation"):
        TEAL(allocation="optimal")


def test_greedy_needs_a_llama_style_block():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=500, n_embd=32, n_layer=1, n_head=2, n_positions=128)).eval()
    with pytest.raises(ConfigError, match="greedy"):
        sparsify_(model, TEAL(allocation="greedy"), calibration=random_windows(window=32))
