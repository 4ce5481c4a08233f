"""Bad overrides and damaged plans: errors that name the input and the fix."""
import json

import pytest

from actsparse.errors import ConfigError
from actsparse.sparsify import CATS, CETT, TEAL, desparsify_, sparsify_
from actsparse.sparsify.plan import load_plan, save_plan
from sparsify_helpers import random_windows, tiny_llama


def test_override_matching_nothing_is_an_error_naming_the_closest_paths(tiny_stats):
    """Before: a pattern with a typo was ignored and every site got the default sparsity."""
    model, _, stats = tiny_stats
    with pytest.raises(ConfigError,
                       match=r"no module that TEAL sparsifies.*'model.layer.0.\*'; closest: model.layers.0"):
        sparsify_(model, TEAL(sparsity=0.5, overrides=(("model.layer.0.*", None),)), stats=stats)
    # a real module that the method does not sparsify counts as no match too (CATS: only the MLP activation)
    with pytest.raises(ConfigError, match=r"no module that CATS sparsifies.*'model.layers.0.self_attn.q_proj'"):
        sparsify_(model, CATS(sparsity=0.5, overrides=(("model.layers.0.self_attn.q_proj", None),)), stats=stats)
    with pytest.raises(ConfigError, match=r"'re:nothing_here'"):
        sparsify_(model, CETT(overrides=(("re:nothing_here", None), ("re:layers\\.0\\.", None))), stats=stats)
    assert not hasattr(model, "_actsparse_sparsity")  # nothing was installed
    # patterns that match are applied, as before
    sparsify_(model, TEAL(sparsity=0.5, overrides=(("model.layers.0.*", None), ("re:down_proj$", 0.7))),
              stats=stats)
    paths = {a.path: a.target for a in model._actsparse_sparsity.assignments}
    desparsify_(model)
    assert [p for p in paths if p.startswith("model.layers.0.")] == ["model.layers.0.mlp.down_proj"]  # last wins
    assert paths["model.layers.1.mlp.down_proj"] == 0.7 and paths["model.layers.1.self_attn.q_proj"] == 0.5


@pytest.fixture
def plan_dir(tmp_path):
    model = tiny_llama()
    sparsify_(model, TEAL(sparsity=0.5), calibration=random_windows())
    return save_plan(model, tmp_path / "plan")


def _edit_modules(plan, edit):
    doc = json.loads((plan / "plan.json").read_text())
    edit(doc["modules"])
    (plan / "plan.json").write_text(json.dumps(doc))


def test_plan_entry_without_path_is_named(plan_dir):
    """Before: KeyError: 'path'."""
    _edit_modules(plan_dir, lambda mods: mods[3].pop("path"))
    with pytest.raises(ConfigError, match=r"plan.json: module entry 3 \('no path'\) lacks the string field 'path'"):
        load_plan(tiny_llama(), plan_dir)


def test_plan_path_not_in_the_model_is_named(plan_dir):
    """Before: AttributeError from get_submodule."""
    def rename(mods):
        mods[0]["path"] = "model.layers.0.self_attn.qq_proj"

    _edit_modules(plan_dir, rename)
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"'model.layers.0.self_attn.qq_proj' \(closest: "
                                          r"model.layers.0.self_attn.q_proj"):
        load_plan(model, plan_dir)
    assert not hasattr(model, "_actsparse_sparsity")


def test_truncated_plan_tensors_are_named(plan_dir):
    """Before: a raw SafetensorError."""
    tf = plan_dir / "plan.safetensors"
    tf.write_bytes(tf.read_bytes()[: tf.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"plan.safetensors is truncated or corrupt .*actsparse calibrate"):
        load_plan(tiny_llama(), plan_dir)
