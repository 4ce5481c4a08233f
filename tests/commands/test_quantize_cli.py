"""`actsparse quantize` -> `actsparse generate --quantized --plan` on the real model, and the refusals."""
import json

import pytest

from actsparse.cli import main


@pytest.mark.slow  # calibrate + quantise + save + load + decode the real model: ~2 min on 2 cores
def test_quantize_for_a_plan_then_generate_from_the_saved_weights(teal_plan, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", "--format", "q4", "--plan", str(teal_plan), "--out", str(out), "--no-progress"]) == 0
    desc = json.loads((out / "quant.json").read_text())
    assert {d["layout"] for d in desc["linears"].values()} == {"transposed"}  # TEAL masks every linear input
    assert desc["layouts_from_plan"] == str(teal_plan)
    capsys.readouterr()
    assert main(["generate", "--quantized", str(out), "--plan", str(teal_plan), "--max-new-tokens", "4",
                 "--prompt", "The history of Paris"]) == 0
    err = capsys.readouterr().err
    assert "weights q4" in err and "copies 0 MiB" in err and "inputs skipped during decode" in err
    ratio = float(err.split("x the model stored once")[0].rsplit("(", 1)[1])
    assert ratio <= 1.05
    # the saved format is the format: another --weights is refused, and so is the HF engine
    assert main(["generate", "--quantized", str(out), "--weights", "int8", "--max-new-tokens", "2"]) == 2
    assert "holds q4 weights" in capsys.readouterr().err
    assert main(["generate", "--quantized", str(out), "--engine", "hf", "--max-new-tokens", "2"]) == 2
    assert "fast engine" in capsys.readouterr().err


@pytest.mark.slow
def test_quantize_refuses_a_plan_for_another_model(teal_plan, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    doc = json.loads((teal_plan / "plan.json").read_text())
    doc["model"]["shape_hash"] = "0" * 16  # a plan calibrated on a model of other shapes
    (other / "plan.json").write_text(json.dumps(doc))
    (other / "plan.safetensors").write_bytes((teal_plan / "plan.safetensors").read_bytes())
    assert main(["quantize", "--format", "int8", "--plan", str(other), "--out", str(tmp_path / "q"),
                 "--no-progress"]) == 2
    assert "shape_hash" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_quantize_help_explains_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = capsys.readouterr().out
    assert "--awq" in out and "--plan" in out and "transposed" in out
