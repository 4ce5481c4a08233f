"""`actsparse prune-experiment --quick`: the AP sweep's command, its outputs and its resume."""
import json
import os

from actsparse.cli import main


def test_prune_experiment_quick_writes_results_and_plots_and_resumes(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["prune-experiment", "--quick", "--models", "mlp", "--hosts", "imp,random", "--out", str(out),
            "--work-dir", str(work)]
    assert main(argv) == 0
    doc = json.loads((out / "ap.json").read_text())
    assert doc["complete"] and doc["runs_done"] == doc["runs_total"] == 4  # 2 hosts x AP on/off x 1 seed
    runs = doc["runs"]
    assert {(r["config"]["host"], r["config"]["ap"]) for r in runs} == {("imp", 0.0), ("imp", 0.02),
                                                                        ("random", 0.0), ("random", 0.02)}
    for r in runs:
        levels = r["levels"]
        assert len(levels) == 3  # dense + 2 pruning cycles
        assert all(0 <= lv["test_acc"] <= 1 and 0 <= lv["dnr"] <= 1 for lv in levels)
        assert [lv["remaining_frac"] for lv in levels] == sorted((lv["remaining_frac"] for lv in levels),
                                                                 reverse=True)
    assert all((out / p).stat().st_size > 0 for p in ("ap_accuracy.png", "ap_dnr_levels.png", "ap_dnr_epochs.png"))
    assert f"wrote {out / 'ap.json'}" in capsys.readouterr().out
    # a second run resumes every finished run from the work folder: same results
    assert main(argv) == 0
    again = json.loads((out / "ap.json").read_text())
    assert [r["levels"] for r in again["runs"]] == [r["levels"] for r in runs]


def test_quick_switches_numba_off_only_while_it_runs(tmp_path, monkeypatch):
    """main() in-process (tests, notebooks): --quick must not leave numba off for the caller."""
    monkeypatch.delenv("ACTSPARSE_DISABLE_NUMBA", raising=False)
    assert main(["prune-experiment", "--quick", "--models", "mlp", "--hosts", "random", "--out", str(tmp_path / "o"),
                 "--work-dir", str(tmp_path / "w")]) == 0
    assert "ACTSPARSE_DISABLE_NUMBA" not in os.environ
