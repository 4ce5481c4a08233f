"""`bench decode --weights`: the quantised engines' wiring and their bytes per token."""
import json

import pytest
import torch

from actsparse.bench.decode import build_synthetic, parse_weights
from actsparse.cli import main
from actsparse.errors import ConfigError


def test_weights_option_is_checked_before_any_work():
    assert parse_weights(["bf16", "int8", "q4"], ["bfloat16"]) == ("int8", "q4")
    with pytest.raises(ConfigError, match="add bfloat16 to --dtypes"):
        parse_weights(["bf16", "q4"], ["float32"])
    with pytest.raises(ConfigError, match="unknown weight format 'q3'"):
        parse_weights(["q3"], ["float32"])


@pytest.mark.slow  # calibrates and times six engines on a tiny model: ~1-3 min on 2 busy cores
def test_bench_decode_with_q4_weights_reports_the_formats_bytes(tmp_path):
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--models", "llama-tiny", "--dtypes", "float32", "--weights", "fp32,q4",
                 "--threads", "1", "--repeats", "1", "--new-tokens", "3", "--prompt-tokens", "4",
                 "--calib-tokens", "512", "--llama-cpp", "off", "--no-plot", "--no-progress", "--out", str(out)]) == 0
    g = json.loads(out.read_text())["groups"][0]
    assert {"fast-dense-q4", "fast-sparse-q4"} <= set(g["engines"])
    q = g["quantized"]["q4"]
    model, _ = build_synthetic("llama-tiny")
    n = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    # q4: half a byte per weight, plus an fp32 scale and min per block of 32
    assert q["bytes_per_token"]["block_linears"] == n // 2 + (n // 32) * 8
    assert q["bytes_per_token"]["lm_head"] == g["bytes_per_token"]["lm_head"]  # the head stays fp32
    assert q["bytes_per_token"]["sparse"] < q["bytes_per_token"]["dense"]
    assert q["speedup"] == pytest.approx(q["engines"]["fast-sparse-q4"]["median"] /
                                         q["engines"]["fast-dense-q4"]["median"])
