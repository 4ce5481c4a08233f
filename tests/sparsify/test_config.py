import json

import pytest

from actsparse.sparsify.registry import config_from_dict, config_from_json, method_names
from actsparse.errors import ConfigError
from actsparse.sparsify import CATS, CETT, CHESS, TEAL, TopK, WINA

ALL = [TEAL(sparsity=0.3, overrides=(("model.layers.0.*", None), ("re:down_proj$", 0.7))),
       TEAL(allocation="uniform", kinds=("mlp.down",)), TEAL(allocation="greedy", greedy_step=0.1), CATS(sparsity=0.6), CHESS(selective=True, attention_sparsity=0.2),
       TopK(sparsity=0.25, site="mlp.down:input"), WINA(sparsity=0.4, kinds=("mlp.down",)), CETT(cett=0.15)]


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: c.METHOD)
def test_json_round_trip(cfg):
    s = cfg.to_json()
    back = config_from_json(s)
    assert back == cfg and type(back) is type(cfg)
    assert json.loads(s)["version"] == cfg.VERSION
    assert type(cfg).from_dict(json.loads(s)) == cfg


def test_strict_unknown_key():
    d = TEAL().to_dict()
    d["sparsty"] = 0.4
    with pytest.raises(ConfigError, match="unknown key.*sparsty"):
        config_from_dict(d)


def test_wrong_types_and_versions():
    with pytest.raises(ConfigError):
        config_from_dict({"method": "teal", "sparsity": "half"})
    with pytest.raises(ConfigError, match="version"):
        config_from_dict({"method": "cats", "version": 99})


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_range(s):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        TEAL(sparsity=s)
    with pytest.raises(ConfigError):
        CATS(sparsity=s)


def test_override_sparsity_checked():
    with pytest.raises(ConfigError):
        CATS(overrides=(("*", 1.2),))
    assert CATS(overrides={"*.layers.1.*": None}).overrides == (("*.layers.1.*", None),)


def test_unknown_method_lists_valid():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"method": "deja-vu"})
    for m in ("teal", "cats", "chess", "topk", "wina", "cett"):
        assert m in str(e.value)
    assert set(method_names()) >= {"teal", "cats", "chess", "topk", "wina", "cett"}


def test_frozen():
    with pytest.raises(Exception):
        TEAL().sparsity = 0.2


def test_allocation_values():
    assert TEAL(allocation="greedy").allocation == "greedy"
    with pytest.raises(ConfigError, match="allocation"):
        TEAL(allocation="blockwise")
