"""Data-parallel calibration and evaluation: two gloo ranks on the loopback give what one
process gives (counts bit-identical, float sums to summation order, equal thresholds), and
bad worlds (different configs or models on the ranks, empty shards) fail on every rank with
a clear message and write nothing."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_worker.py"
SRC = str(HERE.parents[1] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def torchrun(args, nproc=2, timeout=300, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port())] + [str(a) for a in args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, **kw)


def single(args, timeout=300):
    return subprocess.run([sys.executable] + [str(a) for a in args], env=env(), capture_output=True, text=True,
                          timeout=timeout)


def assert_same_stats(got: dict, want: dict):
    assert set(got) == set(want)
    for k, v in want.items():
        g = got[k]
        if v.dtype.is_floating_point and not k.endswith("/rows") and not k.endswith("/eps"):
            torch.testing.assert_close(g, v, rtol=1e-9, atol=1e-9, msg=k)  # float64 sums: summation order
        else:
            assert torch.equal(g, v), k  # counts, histograms, row samples: bit-identical


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    r = single([WORKER, "calibrate", out])
    assert r.returncode == 0, r.stderr
    return out


def test_two_gloo_ranks_calibrate_the_one_process_plan(one_process, tmp_path):
    r = torchrun([WORKER, "calibrate", tmp_path])
    assert r.returncode == 0, r.stderr[-3000:]
    want = load_file(one_process / "rank0.safetensors")
    want_thr = json.loads((one_process / "rank0.json").read_text())["thresholds"]
    assert any(k.endswith("/rows") for k in want) and any(k.endswith(":chess/hist") for k in want)
    for rank in (0, 1):  # every rank holds the merged statistics
        assert_same_stats(load_file(tmp_path / f"rank{rank}.safetensors"), want)
        assert json.loads((tmp_path / f"rank{rank}.json").read_text())["thresholds"] == want_thr


def test_uneven_shards_give_the_same_statistics(one_process, tmp_path):
    # 9 windows in batches of 2: 5 batches, 2 and 3 per rank; 3 ranks: 1, 2, 2 batches
    r = torchrun([WORKER, "calibrate", tmp_path], nproc=3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_stats(load_file(tmp_path / "rank2.safetensors"), load_file(one_process / "rank0.safetensors"))


def test_all_reduced_counts_are_exact_beyond_float64(tmp_path):
    from actsparse.measure.accumulators import SiteStats

    r = torchrun([WORKER, "reduce", tmp_path])
    assert r.returncode == 0, r.stderr[-3000:]
    parts = []
    for rank in (0, 1):
        g = torch.Generator().manual_seed(100 + rank)
        st = SiteStats(16)
        st.update(torch.randn(50 + 7 * rank, 16, generator=g))
        st.count += 2 ** 60 + rank
        st.hist[3] += 2 ** 55 + 1
        parts.append(st)
    want = parts[0].copy().merge(parts[1]).to_tensors()
    got = load_file(tmp_path / "rank1.safetensors")
    assert int(got["count"][0]) == int(want["count"][0]) == 2 ** 61 + 1 + 107  # float64 would round this
    assert int(got["hist"][3]) == int(want["hist"][3])
    assert_same_stats(got, want)


def test_perplexity_gathers_the_one_process_windows(tmp_path):
    r1 = single([WORKER, "ppl", tmp_path / "one"])
    r2 = torchrun([WORKER, "ppl", tmp_path / "two"])
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr[-2000:] + r2.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    for rank in (0, 1):
        two = json.loads((tmp_path / "two" / f"rank{rank}.json").read_text())
        assert two["window_nll"] == one["window_nll"] and two["window_tokens"] == one["window_tokens"]
        assert (two["nll"], two["tokens"], two["windows"]) == (one["nll"], one["tokens"], one["windows"])


@pytest.mark.parametrize("flag, field", [("--sparsity-on-rank1", "configs"), ("--seed-on-rank1", "model")])
def test_ranks_with_different_runs_fail_on_every_rank(tmp_path, flag, field):
    r = torchrun([WORKER, "calibrate", tmp_path, flag, {"--sparsity-on-rank1": 0.3, "--seed-on-rank1": 1}[flag]])
    assert r.returncode != 0
    for rank in (0, 1):
        assert not (tmp_path / f"rank{rank}.json").exists()
        err = json.loads((tmp_path / f"rank{rank}.error.json").read_text())
        assert err["type"] == "ConfigError", err
        assert "do not run the same calibration" in err["message"] and field in err["message"]
        assert "rank 1" in err["message"]


def test_empty_shards_fail_on_every_rank(tmp_path):
    r = torchrun([WORKER, "calibrate", tmp_path, "--windows", "3", "--batch-size", "2"], nproc=3)
    assert r.returncode != 0
    # every rank raises on its own (the shard sizes are a function of the counts), but torchrun
    # stops the other ranks as soon as one exits, so a loaded machine may not let all three report
    files = [tmp_path / f"rank{rank}.error.json" for rank in range(3)]
    reported = [json.loads(f.read_text()) for f in files if f.is_file()]
    assert reported, r.stderr[-3000:]
    for err in reported:
        assert err["type"] == "DataError"
        assert "2 batches for 3 ranks" in err["message"] and "3 windows in batches of 2" in err["message"]


# ---------------------------------------------------------------- the CLI on SmolLM2
CLI = ["-m", "actsparse", "calibrate", "--method", "chess", "--tokens", "768", "--window", "128",
       "--batch-size", "2", "--no-progress", "--threads", "1"]


def test_torchrun_calibrate_writes_the_one_process_plan_smollm2(smollm2, tmp_path):
    r1 = single(CLI + ["--out", tmp_path / "one"])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = torchrun(CLI + ["--out", tmp_path / "two"])
    assert r2.returncode == 0, r2.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "plan.json").read_text())
    two = json.loads((tmp_path / "two" / "plan.json").read_text())
    assert two["meta"].pop("data_parallel") == {"world_size": 2, "backend": "gloo"}
    assert one["modules"] == two["modules"] and one["meta"] == two["meta"] and one["model"] == two["model"]
    a, b = load_file(tmp_path / "one" / "plan.safetensors"), load_file(tmp_path / "two" / "plan.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_with_empty_shards_writes_no_plan(smollm2, tmp_path):
    r = torchrun(["-m", "actsparse", "calibrate", "--method", "teal", "--tokens", "300", "--window", "512",
                  "--no-progress", "--out", tmp_path / "plan"])
    assert r.returncode != 0
    assert "1 batches for 2 ranks" in r.stderr and "fewer ranks" in r.stderr
    assert not (tmp_path / "plan").exists()
