"""`actsparse generate` on the real model and plan; `actsparse bench decode` wiring."""
import json

import pytest

from actsparse.cli import main


@pytest.fixture(scope="module")
def teal_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "teal"
    assert main(["calibrate", "--method", "teal", "--sparsity", "0.5", "--tokens", "512", "--window", "256",
                 "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_generate_with_plan_prints_text_and_speed(teal_plan, engine, capsys):
    rc = main(["generate", "--plan", str(teal_plan), "--engine", engine, "--max-new-tokens", "8",
               "--prompt", "The history of Paris"])
    assert rc == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("The history of Paris") and len(cap.out) > len("The history of Paris") + 5
    assert "tokens/s decode" in cap.err and f"engine {engine}" in cap.err
    if engine == "fast":
        assert "inputs skipped during decode" in cap.err
    else:
        assert "210 kernel linears" in cap.err


def test_generate_rejects_bad_options(capsys):
    assert main(["generate", "--temperature", "-1", "--max-new-tokens", "2"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_bench_decode_tiny_run(tmp_path, capsys):
    out = tmp_path / "decode.json"
    rc = main(["bench", "decode", "--models", "llama-tiny", "--dtypes", "float32,bfloat16", "--threads", "1",
               "--repeats", "2", "--new-tokens", "6", "--prompt-tokens", "8", "--calib-tokens", "512",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert (tmp_path / "decode.png").stat().st_size > 0
    assert len(res["groups"]) == 2
    for g in res["groups"]:
        assert set(g["engines"]) == {"hf-dense", "hf-sparse", "fast-dense", "fast-sparse"}
        assert all(len(e["runs"]) == 2 and e["median"] > 0 for e in g["engines"].values())
        assert 0.3 < g["decode_sparsity"]["q"] < 0.7
        assert g["bytes_per_token"]["sparse"] < g["bytes_per_token"]["dense"]
        assert 1.0 < g["amdahl_ceiling"] < 2.1 and g["speedup"] > 0
    assert main(["bench", "decode", "--sparsity", "1.5"]) == 2
