"""moefy on the real SmolLM2-135M and real wiki text: function-preserving permutation, the
expert MLP against its masked-dense reference on real hidden states, the routers beating
chance, the plan's round trip and its refusals, and the CLI."""
import pytest
import torch

from actsparse.errors import ConfigError, StateError
from actsparse.moe import ExpertMLP, MoEPlan, apply_moe_, moefy, permute_mlp_, remove_moe_
from actsparse.moe.plan import mlp_paths

PROMPT = "The history of the city begins in the twelfth century, when a small market grew up beside the river"


@pytest.fixture(scope="module")
def plan16(smollm2):
    model, tok = smollm2
    return moefy(model, tok, "wiki", experts=16, top_k=8, tokens=1024, router_rows=1024, validation_tokens=512,
                 window=256)


def logits(model, tok, text=PROMPT):
    with torch.no_grad():
        return model(tok(text, return_tensors="pt").input_ids).logits


def test_permuting_every_mlp_preserves_the_logits(smollm2, plan16):
    model, tok = smollm2
    dense = logits(model, tok)
    paths = mlp_paths(model)
    try:
        for p in paths:
            permute_mlp_(model.get_submodule(p), plan16.layers[p]["perm"])
        permuted = logits(model, tok)
    finally:  # the inverse permutation puts every weight back exactly
        for p in paths:
            permute_mlp_(model.get_submodule(p), torch.argsort(plan16.layers[p]["perm"]))
    assert torch.equal(logits(model, tok), dense)
    torch.testing.assert_close(permuted, dense, atol=2e-4, rtol=1e-4)
    # every expert computed: the expert MLPs are the dense model
    apply_moe_(model, plan16.with_top_k(16))
    try:
        torch.testing.assert_close(logits(model, tok), dense, atol=2e-4, rtol=1e-4)
    finally:
        remove_moe_(model)
    assert torch.equal(logits(model, tok), dense)


def test_expert_mlps_match_masked_dense_on_real_hidden_states(smollm2, plan16):
    model, tok = smollm2
    apply_moe_(model, plan16)
    seen = []

    def check(module, args, output):
        ref = module.masked_dense(args[0])
        seen.append(float((output - ref).abs().max() / ref.abs().max()))

    experts = [m for m in model.modules() if isinstance(m, ExpertMLP)]
    handles = [m.register_forward_hook(check) for m in experts]
    try:
        logits(model, tok)
        with pytest.raises(StateError, match="already"):
            apply_moe_(model, plan16)
    finally:
        for h in handles:
            h.remove()
        remove_moe_(model)
    assert len(experts) == 30 and len(seen) == 30
    assert max(seen) < 1e-5
    assert experts[0].weight_fraction == pytest.approx(0.5 + 16 / (3 * 1536))


def test_routers_recall_beats_chance_and_the_plan_round_trips(smollm2, plan16, tmp_path):
    model, _ = smollm2
    v = plan16.meta["validation"]
    # a router that ignores the token recalls k / E = 0.5 of the oracle's experts on average
    assert v["tokens"] == 512 and v["recall"] > 0.6 and min(v["per_layer_recall"]) > 0.55
    assert 0 < v["mass_share"] <= v["mass_recall"] <= 1
    plan16.save(tmp_path / "moe")
    back = MoEPlan.load(tmp_path / "moe")
    assert (back.experts, back.top_k, back.identity, back.meta) == (16, 8, plan16.identity, plan16.meta)
    for p, t in plan16.layers.items():
        for k, x in t.items():
            assert torch.equal(back.layers[p][k], x)
    with pytest.raises(Exception, match="moe.json is missing"):
        MoEPlan.load(tmp_path)


def test_plan_refuses_other_weights(smollm2, plan16):
    model, tok = smollm2
    w = model.get_submodule("model.layers.0.self_attn.q_proj").weight
    with torch.no_grad():
        saved = w[0, 0].clone()
        w[0, 0] += 1.0
    try:
        with pytest.raises(ConfigError, match="weights_fingerprint"):
            apply_moe_(model, plan16)
    finally:
        with torch.no_grad():
            w[0, 0] = saved
    bad = plan16.with_top_k(8)
    p = next(iter(bad.layers))
    bad.layers[p]["router_weight"] = bad.layers[p]["router_weight"][:, :-1]
    with pytest.raises(ConfigError, match="do not fit"):
        apply_moe_(model, bad)


def test_cli_help_and_refusals(capsys):
    from actsparse.cli import main

    with pytest.raises(SystemExit):
        main(["moefy", "--help"])
    out = capsys.readouterr().out
    assert "--experts" in out and "--top-k" in out and "recall" in out
    assert main(["moefy", "--experts", "4", "--top-k", "5", "--out", "x"]) == 2
    assert "more than --experts" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_writes_a_plan_that_loads(tmp_path, smollm2, capsys):
    from actsparse.cli import main

    out = tmp_path / "moe"
    assert main(["moefy", "--experts", "8", "--top-k", "2", "--tokens", "1024", "--router-rows", "1024",
                 "--validation-tokens", "512", "--window", "256", "--no-progress", "--out", str(out)]) == 0
    assert "router recall" in capsys.readouterr().out
    plan = MoEPlan.load(out)
    model, _ = smollm2
    apply_moe_(model, plan)
    remove_moe_(model)
    assert plan.meta["model"] == "smollm2-135m" and plan.experts == 8
