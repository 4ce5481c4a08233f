"""`sweep --ray` and `pplp --ray` on a local Ray cluster started here (2 CPUs, loopback only) with
a tiny LLaMA saved to a folder: the same JSON as in-process, a dead worker retried, a worker
that always dies reported by cell with the file holding only finished points, then resumed.
Skipped without ray (`pip install 'actsparse[ray]'`; CI installs it)."""
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason="needs ray (pip install 'actsparse[ray]'; .ci/run installs it)")

from actsparse.cli import build_parser, main  # noqa: E402
from actsparse.commands import pplp, sweep  # noqa: E402
from actsparse.errors import StateError  # noqa: E402
from actsparse.eval.cells import run_cell_here  # noqa: E402

# fields that differ between any two runs (timings, dates, the machine and how it ran)
RUN_FIELDS = {"seconds", "created", "environment", "git", "executor"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer LLaMA with SmolLM2's tokenizer, saved as a model folder (workers load it by path)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from actsparse.models.loading import _embedded_dir

    tok = AutoTokenizer.from_pretrained(_embedded_dir("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def sweep_argv(model, out, *extra):
    return ["sweep", "--model", str(model), "--methods", "teal,cats", "--sparsity", "0.5,0.3",
            "--calib-tokens", "512", "--calib-window", "128", "--tokens", "384", "--window", "128",
            "--threads", "1", "--no-progress", "--out", str(out), *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- before any cluster is up
def test_an_unreachable_address_is_a_clear_error_and_writes_nothing(tiny_model, tmp_path, capsys):
    assert not ray.is_initialized()
    out = tmp_path / "q.json"
    address = f"127.0.0.1:{free_port()}"
    assert main(sweep_argv(tiny_model, out, "--ray", address)) == 2
    err = capsys.readouterr().err
    assert f"--ray {address}: cannot reach a Ray cluster there" in err and "ray start --head" in err, err
    assert main(sweep_argv(tiny_model, out, "--ray", "no-port-here")) == 2
    assert "is not a Ray address" in capsys.readouterr().err
    assert not out.exists() and not ray.is_initialized()


# ---------------------------------------------------------------- on a local cluster
@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_sweep(tiny_model, tmp_path_factory):
    """The in-process sweep: the reference every Ray run must reproduce."""
    out = tmp_path_factory.mktemp("local") / "q.json"
    assert main(sweep_argv(tiny_model, out)) == 0
    return json.loads(out.read_text())


def comparable(obj):
    """``obj`` without the fields of the run (timings, dates, machine), for comparing two runs."""
    if isinstance(obj, dict):
        return {k: comparable(v) for k, v in obj.items() if k not in RUN_FIELDS}
    if isinstance(obj, list):
        return [comparable(v) for v in obj]
    return obj


def assert_same_results(a, b, path="doc"):
    """Same keys, lists and strings exactly; numbers to a tight tolerance."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same_results(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_results(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_a_ray_sweep_writes_the_in_process_json(cluster, tiny_model, local_sweep, tmp_path):
    out = tmp_path / "q.json"
    assert main(sweep_argv(tiny_model, out, "--ray", "auto")) == 0
    doc = json.loads(out.read_text())
    assert [(r["method"], r["target"]) for r in doc["results"]] == [
        ("teal", 0.5), ("cats", 0.5), ("teal", 0.3), ("cats", 0.3)]
    assert_same_results(comparable(local_sweep), comparable(doc))
    assert "unfinished" not in doc and "unfinished" not in local_sweep
    assert local_sweep["environment"]["executor"] == {"kind": "in-process"}
    ex = doc["environment"]["executor"]
    assert ex["kind"] == "ray" and ex["resources"]["CPU"] == 2 and ex["max_retries"] == 2


def dies_once(flag: Path):
    """A cell function whose first sparse cell kills its worker process (later ones run)."""
    def cell(workload, c):
        if c["kind"] == "sparse" and not flag.exists():
            flag.write_text("died")
            os._exit(1)
        return run_cell_here(workload, c)
    return cell


def always_dies_on(method: str, target: float):
    def cell(workload, c):
        if c["kind"] == "sparse" and (c["method"], c["target"]) == (method, target):
            os._exit(1)
        return run_cell_here(workload, c)
    return cell


def parse(argv):
    return build_parser().parse_args(argv)


def test_a_worker_that_dies_is_retried_and_the_sweep_completes(cluster, tiny_model, local_sweep, tmp_path):
    out, flag = tmp_path / "q.json", tmp_path / "died"
    assert sweep.run(parse(sweep_argv(tiny_model, out, "--ray", "auto")), cell_fn=dies_once(flag)) == 0
    assert flag.exists()  # a worker did die
    assert_same_results(comparable(local_sweep), comparable(json.loads(out.read_text())))


def test_a_worker_that_always_dies_is_named_and_resume_completes(cluster, tiny_model, local_sweep, tmp_path):
    out = tmp_path / "q.json"
    with pytest.raises(StateError) as err:
        sweep.run(parse(sweep_argv(tiny_model, out, "--ray", "auto")), cell_fn=always_dies_on("cats", 0.3))
    msg = str(err.value)
    assert "1 cell(s) did not finish" in msg and "cats @ 0.3: its worker died in all 3 tries" in msg, msg
    assert "--resume" in msg and str(out) in msg
    partial = json.loads(out.read_text())
    assert partial["unfinished"] == ["cats @ 0.3"]  # the file says it is not complete
    assert [(r["method"], r["target"]) for r in partial["results"]] == [("teal", 0.5), ("cats", 0.5), ("teal", 0.3)]
    assert main(sweep_argv(tiny_model, out, "--ray", "auto", "--resume")) == 0
    assert_same_results(comparable(local_sweep), comparable(json.loads(out.read_text())))


def test_a_ray_pplp_gives_the_in_process_results(cluster, tiny_model, tmp_path):
    argv = ["pplp", "--model", str(tiny_model), "--methods", "teal,cats", "--steps", "2", "--window", "128",
            "--calib-tokens", "512", "--tokens", "256", "--threads", "1", "--no-progress"]
    a, b = tmp_path / "local.json", tmp_path / "ray.json"
    assert main(argv + ["--json", str(a)]) == 0
    assert main(argv + ["--json", str(b), "--ray", "auto"]) == 0
    local, remote = json.loads(a.read_text()), json.loads(b.read_text())
    assert list(remote["results"]) == ["teal", "cats"] and remote["executor"]["kind"] == "ray"
    assert_same_results(comparable(local), comparable(remote))


def test_a_cell_that_raises_is_named_with_its_error_and_not_retried(cluster, tmp_path, capsys):
    out = tmp_path / "q.json"
    assert main(sweep_argv(tmp_path / "no-such-model", out, "--ray", "auto")) == 2
    err = capsys.readouterr().err
    assert "describe: unknown model" in err and "no-such-model" in err, err
    assert not out.exists()
