"""`actsparse quantize --from-gguf`: a tiny LLaMA directory + GGUF files of it, the real embedded file (slow)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

from actsparse.cli import main

sys.path.insert(0, str(Path(__file__).parents[1] / "quant"))
from gguf_files import tiny_llama, write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2):
    """A tiny LLaMA directory (with SmolLM2's tokenizer) and three GGUF files of it: Q8_0 (its
    weights are that file's dequantised values), Q5_0 in the MLP, and Q8_0 mixed with Q4_1."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    model = tiny_llama()
    write_tiny_gguf(root / "q8.gguf", model, T.Q8_0)  # adopts the file's values
    model.save_pretrained(root / "hf")
    smollm2.tokenizer.save_pretrained(root / "hf")
    write_tiny_gguf(root / "q5.gguf", tiny_llama(), lambda layer, role: T.Q5_0 if role == "ffn_up" else T.Q8_0,
                    adopt=False)
    write_tiny_gguf(root / "mixed.gguf", tiny_llama(), lambda layer, role: T.Q4_1 if role == "ffn_up" else T.Q8_0,
                    adopt=False)
    return root


def test_help_explains_from_gguf(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--from-gguf FILE" in out and "Q8_0 -> int8" in out and "Q4_0 / Q4_1 -> q4" in out
    assert "bit for bit" in out and "requantised transposed" in out


def test_from_gguf_writes_what_load_quantized_reads(tiny, tmp_path, capsys):
    import actsparse as asp
    from actsparse.quant import QuantLinear, load_quantized

    out = tmp_path / "q8"
    assert main(["quantize", "--from-gguf", str(tiny / "q8.gguf"), "--model", str(tiny / "hf"), "--out", str(out),
                 "--no-progress"]) == 0
    assert "as int8 (bit for bit)" in capsys.readouterr().out
    desc = json.loads((out / "quant.json").read_text())
    assert desc["config"]["format"] == "int8" and desc["gguf"]["types"] == {"Q8_0": 14}
    model = load_quantized(asp.load(str(tiny / "hf")).model, out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14


@pytest.mark.parametrize("argv,message", [
    (["--from-gguf", "{root}/missing.gguf"], "not found"),
    (["--from-gguf", "{root}/q5.gguf", "--model", "{root}/hf"], "Q5_0 cannot be loaded"),
    (["--from-gguf", "{root}/mixed.gguf", "--model", "{root}/hf"], "int8 and q4"),
    (["--from-gguf", "{root}/q8.gguf", "--model", "{root}/hf", "--format", "q4"], "--format q4 but"),
    (["--from-gguf", "{root}/q8.gguf", "--model", "{root}/hf", "--awq"], "--awq does not apply"),
    (["--from-gguf", "{root}/q8.gguf", "--model", "smollm2-135m"], "the model was converted from"),
    (["--from-gguf", "{root}/q8.gguf"], "transformers cannot load the GGUF file"),  # no tokenizer, no config
])
def test_from_gguf_refusals_write_nothing(tiny, tmp_path, capsys, argv, message):
    out = tmp_path / "q"
    argv = [a.format(root=tiny) for a in argv]
    assert main(["quantize", *argv, "--out", str(out), "--no-progress"]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not out.exists()


@pytest.mark.slow  # load + save + decode the real model: ~1 min on 2 cores
def test_from_the_embedded_file_then_generate(tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", "--from-gguf", "smollm2-135m", "--out", str(out), "--no-progress"]) == 0
    assert "210 x Q4_1" in capsys.readouterr().out
    assert main(["generate", "--quantized", str(out), "--max-new-tokens", "4", "--prompt", "The history of Paris"]) == 0
    assert "weights q4" in capsys.readouterr().err


@pytest.mark.slow  # the session's TEAL plan + 210 linears requantised transposed
def test_from_gguf_with_a_plan_requantises_its_input_sparse_linears(teal_plan, tmp_path, capsys, caplog):
    out = tmp_path / "q4t"
    assert main(["quantize", "--from-gguf", "smollm2-135m", "--plan", str(teal_plan), "--out", str(out),
                 "--no-progress"]) == 0
    assert "210 requantised transposed for the plan (lossy)" in capsys.readouterr().out
    assert "re-rounds" in caplog.text
    desc = json.loads((out / "quant.json").read_text())
    assert {d["layout"] for d in desc["linears"].values()} == {"transposed"}  # TEAL masks every linear input
