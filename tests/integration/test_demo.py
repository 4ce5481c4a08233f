"""The README's first command, shrunk: the demo runs end to end on the real default model."""
import json

import numpy as np
import pytest

import actsparse as asp
from actsparse.cli import main


@pytest.fixture
def planted_sweep(tmp_path, monkeypatch):
    """A working directory whose benchmarks/results holds a 1-point quality sweep, as a user's
    `actsparse sweep` run from the repo root once wrote it."""
    results = tmp_path / "cwd" / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "quality-smollm2-135m.json").write_text(json.dumps({
        "model": "smollm2-135m", "protocol": {}, "dense": {"ppl": 1.0},
        "results": [{"method": "teal", "target": 0.5, "ppl": 123.456, "ratio": 99.9, "bytes_skipped": 0.5,
                     "reached_sparsity": {}}]}))
    monkeypatch.chdir(tmp_path / "cwd")


def test_demo_writes_report_with_profile_and_quality(tmp_path, planted_sweep):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--tokens", "512", "--quality-tokens", "1024",
               "--quality-methods", "cats,teal", "--decode-tokens", "8", "--decode-repeats", "3", "--no-progress"])
    assert rc == 0
    md = (out / "report.md").read_text()
    assert "Activation profile" in md and "cats" in md.lower()
    assert "Decode speed" in md and "teal 50%" in md
    for f in ("report.html", "profile/profile.json", "plots/sparsity_per_layer.png", "decode.json",
              "plots/frontier.png", "plots/thresholds.png", "phases.json"):
        assert (out / f).stat().st_size > 0
    # the demo never reads what a user command may have overwritten (item 9)
    assert "123.46" not in md and "saved sweep" not in md and not (out / "plots" / "sweep").exists()
    assert "README" in md and "quality-smollm2-135m.json" in md
    assert not (out / "plots" / "quality.png").exists()  # the frontier replaces the scatter panels
    html = (out / "report.html").read_text()
    assert "**" not in html and "<strong>teal 50%</strong>" in html
    decode = json.loads((out / "decode.json").read_text())
    assert [r["engine"] for r in decode["rows"]] == ["dense", "cats 50%", "teal 50%"]
    for r in decode["rows"][1:]:
        assert 1.0 < r["amdahl_ceiling"] < 2.1 and r["above_ceiling"] == (r["speedup"]["median"] > r["amdahl_ceiling"])
    quality = json.loads((out / "quality.json").read_text())
    assert set(quality["thresholds"]) == {"cats", "teal"}
    phases = json.loads((out / "phases.json").read_text())["phases"]
    assert [p["phase"] for p in phases][:2] == ["load fp32 model", "profile and its plots"]
    assert all(p["peak_rss_mb"] > 0 and p["seconds"] > 0 for p in phases) and "## Time and memory" in md


def test_demo_that_fails_part_way_leaves_no_stale_report(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("the report of an earlier run")
    (out / "report.html").write_text("the report of an earlier run")
    # 100 calibration tokens are too few: calibration refuses them after the profile is saved
    rc = main(["demo", "--out", str(out), "--tokens", "512", "--quality-tokens", "100", "--quality-methods", "teal",
               "--no-progress"])
    assert rc == 2 and "too little calibration data" in capsys.readouterr().err
    assert (out / "profile" / "profile.json").is_file()
    assert not (out / "report.md").exists() and not (out / "report.html").exists()


def test_measure_plans_reports_spread_and_amdahl_ceiling(smollm2):
    from actsparse.bench.decode import bytes_per_token, measure_plans, weight_bytes
    from actsparse.data.text import text, token_windows
    from actsparse.sparsify.api import calibrate, sparsify_
    from actsparse.sparsify.registry import make_config

    model32, tok = smollm2
    config = make_config("teal", 0.5)
    stats = calibrate(model32, [config], token_windows(tok, text("wiki", "calibration"), window=256, max_tokens=512))
    model, _ = asp.load("smollm2-135m", dtype="bfloat16")
    doc = measure_plans(model, tok, {"teal 50%": lambda m: sparsify_(m, config, stats=stats)}, new_tokens=6,
                        repeats=3)
    assert doc["warmup"] == 1 and doc["repeats"] == 3
    dense, teal = doc["rows"]
    for r in doc["rows"]:
        t = r["tokens_per_s"]
        assert len(t["runs"]) == 3 and t["p10"] <= t["median"] <= t["p90"]
    ratios = np.array(teal["tokens_per_s"]["runs"]) / np.array(dense["tokens_per_s"]["runs"])
    assert teal["speedup"]["median"] == pytest.approx(float(np.median(ratios)))
    assert teal["speedup"]["p10"] <= teal["speedup"]["median"] <= teal["speedup"]["p90"]
    wb = weight_bytes(model)
    assert dense["bytes_per_token"] == pytest.approx(wb["lm_head"] + sum(wb["roles"].values()))
    skipped = sum(wb["roles"][r] * teal["weight_skip"][r] for r in wb["roles"])
    assert teal["bytes_per_token"] == pytest.approx(dense["bytes_per_token"] - skipped)
    # about half of the block linears' bytes skipped, the lm_head read in full
    assert teal["amdahl_ceiling"] == pytest.approx(dense["bytes_per_token"] / teal["bytes_per_token"])
    assert 1.4 < teal["amdahl_ceiling"] < 1.9
    assert teal["above_ceiling"] == (teal["speedup"]["median"] > teal["amdahl_ceiling"])
    assert dense["amdahl_ceiling"] == 1.0 and dense["above_ceiling"] is False
    assert bytes_per_token(wb, teal["weight_skip"]) == pytest.approx(teal["bytes_per_token"])
