"""A site kind's summary is computed per layer, then aggregated: neuron i of layer 0 and neuron i
of layer 1 are different neurons, so per-neuron sums must never be pooled across layers."""
import pytest
import torch

from actsparse.measure.accumulators import SiteStats
from actsparse.measure.profile import AGGREGATION, Profile
from actsparse.models.sitemaps import Site

WIDTH, TOKENS = 4, 40


def _stats(values: torch.Tensor) -> SiteStats:
    st = SiteStats(WIDTH)
    st.update_sequence(values[None], flow_threshold=0.1, backend="torch")
    return st


def _two_layer_profile() -> Profile:
    """Layer 0: neuron 0 almost silent (dormant), the others on for the whole sequence (one long
    run each). Layer 1: neuron 0 large, the others alternate on/off every token (runs of 1)."""
    on = torch.ones(TOKENS, WIDTH)
    layer0 = on.clone()
    layer0[:, 0] = 1e-3
    layer1 = torch.zeros(TOKENS, WIDTH)
    layer1[:, 0] = 5.0
    layer1[::2, 1:] = 1.0
    sites = [Site(f"layers.{i}.mlp.down_proj", "input", "mlp.down:input", i) for i in range(2)]
    stats = {sites[0].name: _stats(layer0), sites[1].name: _stats(layer1)}
    return Profile({}, sites, stats)


def test_dormant_ratio_is_per_layer_then_averaged():
    table = _two_layer_profile().kind_tables()["mlp.down:input"]
    per_layer = [r["dormant_ratio_0.1"] for r in table["layers"]]
    assert per_layer == [0.25, 0.0]  # layer 0: neuron 0 of 4; layer 1: none
    # pooled by neuron index, neuron 0's E|v| would be (1e-3 + 5) / 2: nobody dormant
    assert table["over_layers"]["dormant_ratio_0.1"] == pytest.approx(0.125)
    assert table["over_layers"]["dormant_ratio_0.1_max"] == {"value": 0.25, "layer": 0}


def test_activation_flow_is_per_layer_then_averaged():
    table = _two_layer_profile().kind_tables()["mlp.down:input"]
    shared = [r["activation_flow"]["shared_frac"] for r in table["layers"]]
    specialised = [r["activation_flow"]["specialised_frac"] for r in table["layers"]]
    assert shared == [0.75, 0.25] and specialised == [0.0, 0.75]
    flow = table["over_layers"]["activation_flow"]
    # pooled, neurons 1-3 would have mean runs (40 + 20) / (1 + 20) < 4: not shared
    assert flow["shared_frac"] == pytest.approx(0.5)
    assert flow["specialised_frac"] == pytest.approx(0.375)


def test_fractions_of_entries_and_counts():
    table = _two_layer_profile().kind_tables()["mlp.down:input"]
    agg = table["over_layers"]
    zero = [r["zero_sparsity"] for r in table["layers"]]
    assert agg["zero_sparsity"] == pytest.approx(sum(zero) / 2)  # equal widths and tokens: the mean
    assert agg["threshold_sparsity"]["0.01"] == pytest.approx((0.25 + 0.375) / 2)
    assert agg["static_dead"] == sum(r["static_dead"] for r in table["layers"]) == 0
    assert agg["layers"] == 2 and agg["neurons"] == 2 * WIDTH
    assert table["aggregation"] is AGGREGATION
    assert AGGREGATION["dormant_ratio_0.1"].startswith("mean over layers")
    assert AGGREGATION["static_dead"] == "sum over layers"


def test_layer_without_finite_values_is_left_out():
    """All values NaN: no metric for that layer (not '100% dormant'), and the aggregate is over
    the layers that saw finite values."""
    prof = _two_layer_profile()
    bad = Site("layers.2.mlp.down_proj", "input", "mlp.down:input", 2)
    prof = Profile({}, prof.sites + [bad], {**prof.stats, bad.name: _stats(torch.full((TOKENS, WIDTH), float("nan")))})
    table = prof.kind_tables()["mlp.down:input"]
    assert table["layers_without_finite_values"] == [2]
    row = table["layers"][2]
    assert row["dormant_ratio_0.1"] is None and row["zero_sparsity"] is None and row["nonfinite"] == TOKENS * WIDTH
    assert prof.summary[bad.name]["dormant_ratio_0.1"] is None
    assert table["over_layers"]["dormant_ratio_0.1"] == pytest.approx(0.125)
    assert table["over_layers"]["layers_with_finite_values"] == 2
    assert table["over_layers"]["nonfinite"] == TOKENS * WIDTH
