"""``actsparse bench kernel`` on tiny shapes: parser wiring and the JSON it writes."""
from __future__ import annotations

import argparse
import json

import pytest

from actsparse.commands import bench


def _parser():
    p = argparse.ArgumentParser(prog="actsparse")
    sub = p.add_subparsers(dest="command")
    bench.register(sub)
    return p


def test_bench_help_lists_kernel(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["bench", "kernel", "--help"])
    text = capsys.readouterr().out
    for opt in ("--quick", "--repeats", "--threads", "--dtypes", "--out"):
        assert opt in text


def test_bench_without_subcommand_returns_2(capsys):
    args = _parser().parse_args(["bench"])
    assert args.func(args) == 2


def test_bench_kernel_tiny_run(tmp_path, capsys):
    out = tmp_path / "kernel.json"
    args = _parser().parse_args(
        ["bench", "kernel", "--shapes", "96x80", "--mlp", "32x72", "--dtypes", "fp32,bf16",
         "--threads", "1", "--sparsities", "0,0.5,0.9", "--repeats", "3", "--flush-mb", "1",
         "--no-progress", "--out", str(out)]
    )
    assert args.func(args) == 0
    res = json.loads(out.read_text())
    assert (tmp_path / "kernel.png").stat().st_size > 0
    assert res["config"]["repeats"] == 3 and "cpu_count" in res["machine"]
    layer = [g for g in res["groups"] if g["kind"] == "layer"]
    mlp = [g for g in res["groups"] if g["kind"] == "gated_mlp"]
    assert len(layer) == 2 and len(mlp) == 2
    for g in layer + mlp:
        assert g["best_dense"] in g["dense"]
        for r in g["rows"]:
            assert len(g["raw_ms"][r["impl"]]) == 3
            assert r["speedup"] > 0 and r["fraction_of_ideal"] > 0
    rows = {r["sparsity"]: r for r in layer[0]["rows"]}
    assert rows[0.5]["active"] == 40 and rows[0.9]["active"] == 8


def test_bench_kernel_rejects_bad_dtype():
    from actsparse.errors import ConfigError

    args = _parser().parse_args(["bench", "kernel", "--dtypes", "fp16", "--no-progress"])
    with pytest.raises(ConfigError, match="fp16"):
        args.func(args)
