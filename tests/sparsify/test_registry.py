"""A new method is one module: a toy method registered here, in the test file, works through
sparsify_, save_plan / load_plan, the presets, the top-level API and the CLI's --method."""
from dataclasses import dataclass

import pytest
import torch

import actsparse as asp
from actsparse.errors import ConfigError
from actsparse.sparsify import (Handler, SparsityConfig, desparsify_, iter_sparse_modules, make_config,
                                preset_names, register_handler, register_method, register_preset, sparsify_)
from actsparse.sparsify.calibration import Request, quantile_threshold
from actsparse.sparsify.plan import load_plan, save_plan
from actsparse.sparsify.registry import Assignment, config_from_dict

from sparsify_helpers import random_windows, tiny_llama


@register_method
@dataclass(frozen=True)
class DownOnly(SparsityConfig):
    """TEAL on the down projection's input only."""

    METHOD = "down-only"
    VERSION = 1
    sparsity: float = 0.5
    overrides: tuple[tuple[str, float | None], ...] = ()


register_preset("down-only-30", DownOnly, sparsity=0.3)


@register_handler(DownOnly)
class _DownOnlyHandler(Handler):
    def requests(self, t):
        t.require("mlp.down")
        return [Request(f"{p}:input", p, "input") for p in (t.path(i, "mlp.down") for i in t.layers)]

    def assign(self, t, stats):
        out = []
        for layer in t.layers:
            path = t.path(layer, "mlp.down")
            s = t.sparsity(path)
            if s is not None:
                out.append(Assignment(path, "linear", "mlp.down:input", threshold=quantile_threshold(
                    stats[f"{path}:input"], s), skips=(path,), target=s))
        return out


def test_toy_method_through_sparsify_and_plans(tmp_path):
    model = tiny_llama()
    cal = random_windows()
    sparsify_(model, DownOnly(sparsity=0.6), calibration=cal)
    paths = [p for p, _ in iter_sparse_modules(model)]
    assert paths == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    ids = cal.input_ids[:1]
    with torch.no_grad():
        before = model(ids).logits
    save_plan(model, tmp_path / "plan")
    desparsify_(model)
    load_plan(model, tmp_path / "plan")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert model._actsparse_sparsity.config == DownOnly(sparsity=0.6)
    desparsify_(model)


def test_toy_method_in_registry_presets_and_api():
    assert "down-only" in preset_names() and "down-only-30" in preset_names()
    assert make_config("down-only-30") == DownOnly(sparsity=0.3)
    assert make_config("down-only", 0.2) == DownOnly(sparsity=0.2)
    assert config_from_dict(DownOnly(sparsity=0.4).to_dict()) == DownOnly(sparsity=0.4)
    assert asp.DownOnly is DownOnly
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("Other", (DownOnly,), {"METHOD": "teal"}))
    with pytest.raises(ConfigError, match="unknown method"):
        make_config("down-onyl")


def test_toy_method_through_the_cli(tmp_path, smollm2, capsys):
    from actsparse.cli import main

    out = tmp_path / "plan"
    assert main(["calibrate", "--method", "down-only", "--sparsity", "0.4", "--tokens", "512", "--window", "256",
                 "--out", str(out), "--no-progress"]) == 0
    assert main(["eval", "--plan", str(out), "--tokens", "512", "--window", "256", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "mlp.down:input" in text
