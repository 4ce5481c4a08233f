"""`actsparse generate` on the real model and plan; `actsparse bench decode` wiring."""
import json
import statistics

import pytest
import torch

from actsparse.bench.decode import build_synthetic
from actsparse.cli import main


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
    model, _ = build_synthetic("llama-tiny")
    linear_params = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    head_params = model.lm_head.weight.numel()
    for g in res["groups"]:
        engines = g["engines"]
        assert set(engines) == {"hf-dense", "hf-sparse", "fast-dense", "fast-sparse"}
        assert all(len(e["runs"]) == 2 and e["median"] == pytest.approx(statistics.median(e["runs"]))
                   for e in engines.values())
        # the speedup is fast-sparse over the faster dense engine, the ceiling the bytes ratio
        best = max(("hf-dense", "fast-dense"), key=lambda e: engines[e]["median"])
        assert g["best_dense"] == best
        assert g["speedup"] == pytest.approx(engines["fast-sparse"]["median"] / engines[best]["median"])
        bpt = g["bytes_per_token"]
        assert g["amdahl_ceiling"] == pytest.approx(bpt["dense"] / bpt["sparse"])
        # the read probe ran as often as the engines; fractions and the HF bound are GB/s over its median
        read = g["read_GBps"]
        assert len(read["runs"]) == 2 and read["best"] == max(read["runs"]) > 0
        assert g["of_read_bandwidth"]["fast-dense"] == pytest.approx(g["effective_GBps"]["fast-dense"] / read["best"])
        assert g["read_bound_vs_hf"] == pytest.approx(read["best"] / g["effective_GBps"]["hf-dense"])
        # dense bytes per token are the model's block linear weights plus the lm_head, at the dtype's width
        width = {"float32": 4, "bfloat16": 2}[g["dtype"]]
        assert bpt["block_linears"] == linear_params * width and bpt["lm_head"] == head_params * width
        assert bpt["dense"] == (linear_params + head_params) * width
        # TEAL 50% on every linear: the decode skips about half of the inputs of the linears that read
        # the normed residual stream and the MLP activation; o's input (the attention output over a
        # few positions of a random model) is less sparse than on the calibration windows, not dense
        sp = g["decode_sparsity"]
        assert all(0.35 < sp[r] < 0.65 for r in ("q", "k", "v", "gate", "up", "down")), sp
        assert 0.05 < sp["o"] < 0.65 and sp["mlp.act"] == 0.0, sp
        assert 1.3 < g["amdahl_ceiling"] < 2.1
    assert main(["bench", "decode", "--sparsity", "1.5"]) == 2
