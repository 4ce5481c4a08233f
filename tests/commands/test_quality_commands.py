"""`actsparse eval`, `sweep` and `pplp` on the real model and wiki text, small budgets."""
import json
import math

import pytest

from actsparse.cli import main

SMALL = ["--calib-tokens", "512", "--tokens", "512", "--no-progress"]


def test_calibrate_records_the_sampling_in_the_plan(teal_plan):
    meta = json.loads((teal_plan / "plan.json").read_text())["meta"]
    assert meta["sampling"] == "spread" and meta["windows"] == 3 and meta["windows_available"] > 1000


def test_eval_dense_and_with_a_plan(tmp_path, teal_plan, capsys):
    dense_json, sparse_json = tmp_path / "dense.json", tmp_path / "sparse.json"
    assert main(["eval", "--tokens", "1024", "--window", "256", "--batch-size", "2", "--json", str(dense_json),
                 "--no-progress"]) == 0
    assert main(["eval", "--plan", str(teal_plan), "--ignore-plan-weights", "--tokens", "1024", "--window", "256",
                 "--json", str(sparse_json), "--no-progress"]) == 0
    out = capsys.readouterr().out
    dense, sparse = json.loads(dense_json.read_text()), json.loads(sparse_json.read_text())
    assert dense["tokens"] == sparse["tokens"] == 1024 and dense["sampling"] == "spread" and dense["windows"] == 5
    assert dense["plan"] is None and sparse["plan"] == str(teal_plan)
    assert 5 < dense["ppl"] < 100 and sparse["ppl"] > dense["ppl"]  # TEAL 50% costs perplexity
    assert 0.35 < sparse["reached_sparsity"]["attn.q:input"] < 0.65
    assert "reached sparsity attn.q:input" in out and "spread" in out


def test_eval_sliding_windows_take_a_prefix(tmp_path, capsys):
    res = tmp_path / "sliding.json"
    assert main(["eval", "--tokens", "600", "--window", "256", "--stride", "128", "--json", str(res),
                 "--no-progress"]) == 0
    doc = json.loads(res.read_text())
    assert doc["sampling"] == "prefix" and doc["stride"] == 128 and doc["tokens"] == 600
    assert main(["eval", "--tokens", "600", "--window", "256", "--stride", "128", "--sampling", "spread",
                 "--no-progress"]) == 2
    assert "sliding evaluation" in capsys.readouterr().err


def test_eval_refuses_bad_inputs_with_clear_errors(tmp_path, capsys):
    """Before: minilm ended in IndexError, --window past the positions in a size mismatch,
    a latin-1 .jsonl in UnicodeDecodeError."""
    assert main(["eval", "--model", "minilm", "--no-progress"]) == 2
    assert "minilm (BertModel) is not a causal language model" in capsys.readouterr().err
    assert main(["eval", "--window", "9000", "--no-progress"]) == 2
    assert "--window 9000 is longer than smollm2-135m's 8192 positions" in capsys.readouterr().err
    latin = tmp_path / "notes.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9 cr\xe8me"}\n' * 300)
    assert main(["eval", "--data", str(latin), "--split", "all", "--tokens", "256", "--window", "128",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{latin} is not valid utf-8 text: byte offset 13" in err and "--encoding" in err
    assert main(["eval", "--data", str(latin), "--encoding", "latin-1", "--split", "all", "--tokens", "256",
                 "--window", "128", "--no-progress"]) == 0
    assert main(["eval", "--data", str(latin), "--text-field", "body", "--split", "all", "--encoding",
                 "latin-1", "--no-progress"]) == 2
    assert "no string field 'body'" in capsys.readouterr().err


# ---------------------------------------------------------------- sweep and pplp
@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "quality.json"
    argv = ["sweep", "--methods", "teal", "--sparsity", "0.5", "--calib-window", "256", "--window", "256",
            "--out", str(out)] + SMALL
    assert main(argv) == 0
    return out, argv


def test_sweep_writes_the_protocol_and_a_plot(sweep_file):
    out, _ = sweep_file
    doc = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    prot = doc["protocol"]
    assert prot["calibration"]["sampling"] == prot["evaluation"]["sampling"] == "spread"
    assert prot["text_options"] == {"text_field": "text", "encoding": "utf-8", "doc_separator": None}
    assert prot["evaluation"]["windows"] == 3 and doc["dense"]["tokens"] == 512
    assert prot["evaluation"]["sparse_protocol"] == doc["dense"]["sparse_protocol"] == "all"
    [r] = doc["results"]
    assert (r["method"], r["target"]) == ("teal", 0.5) and r["ratio"] > 1
    assert math.isclose(r["ratio"], r["ppl"] / doc["dense"]["ppl"])


def test_sweep_resume_adds_points_of_the_same_protocol_only(sweep_file, capsys):
    """Before: --resume appended results of another model, dtype or protocol to the file."""
    out, argv = sweep_file
    before = json.loads(out.read_text())
    sparsity = argv.index("--sparsity") + 1
    more = argv[:sparsity] + ["0.5,0.3"] + argv[sparsity + 1:] + ["--resume"]
    assert main(more) == 0
    after = json.loads(out.read_text())
    assert after["dense"] == before["dense"] and after["results"][0] == before["results"][0]
    assert [(r["method"], r["target"]) for r in after["results"]] == [("teal", 0.5), ("teal", 0.3)]
    capsys.readouterr()
    for change, field in ((["--dtype", "bfloat16"], "dtype: file 'float32', now 'bfloat16'"),
                          (["--tokens", "768"], "protocol.evaluation.tokens_requested: file 512, now 768"),
                          (["--data", "news"], "protocol.data: file 'wiki', now 'news'"),
                          (["--sampling", "prefix"], "protocol.calibration.sampling: file 'spread', now 'prefix'"),
                          (["--protocol", "decode"], "protocol.evaluation.sparse_protocol: file 'all', now 'decode'")):
        assert main(more + change) == 2, change
        err = capsys.readouterr().err
        assert f"--resume: {out} was made with other settings" in err and field in err, err
    assert json.loads(out.read_text()) == after  # the refused runs wrote nothing


def test_pplp_into_the_sweep_of_the_same_model_only(sweep_file, tmp_path, capsys):
    out, _ = sweep_file
    res = tmp_path / "pplp.json"
    argv = ["pplp", "--methods", "teal", "--steps", "2", "--window", "256", "--json", str(res), "--into", str(out)]
    assert main(argv + SMALL) == 0
    doc = json.loads(res.read_text())
    r = doc["results"]["teal"]
    assert len(r["search"]) == 2 and r["protocol"]["sampling"] == "spread" and r["ratio"] <= 1.01
    assert json.loads(out.read_text())["pplp"]["teal"] == r
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(out.read_text()), "dtype": "bfloat16"}))
    assert main(argv[:-1] + [str(other)] + SMALL) == 2
    assert "--into" in (err := capsys.readouterr().err) and "dtype: file 'bfloat16', now 'float32'" in err
    assert main(argv + SMALL + ["--protocol", "decode"]) == 2
    assert "sparse protocol: file 'all', now 'decode'" in capsys.readouterr().err
    other.write_text(json.dumps({"format": "actsparse.eval/1"}))
    assert main(argv[:-1] + [str(other)] + SMALL) == 2
    assert "is not a sweep result" in capsys.readouterr().err


def test_sweep_under_the_decode_protocol(tmp_path):
    """The dense reference and every point score the second half of each window only."""
    out = tmp_path / "decode.json"
    assert main(["sweep", "--methods", "teal", "--sparsity", "0.5", "--calib-window", "256", "--window", "256",
                 "--protocol", "decode", "--out", str(out)] + SMALL) == 0
    doc = json.loads(out.read_text())
    assert doc["protocol"]["evaluation"]["sparse_protocol"] == doc["dense"]["sparse_protocol"] == "decode"
    scored = doc["dense"]["window_tokens"]  # of each 256-token window, the predictions after its half
    assert sum(scored) == doc["dense"]["tokens"] and max(scored) == 127
    [r] = doc["results"]
    assert r["window_tokens"] == doc["dense"]["window_tokens"] and 1 < r["ratio"]


def test_no_progress_also_silences_the_loading_bars(capsys):
    """Before: --no-progress hid actsparse's bars but transformers still drew 'Loading weights'."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    argv = ["eval", "--tokens", "256", "--window", "128"]
    try:
        hf_logging.enable_progress_bar()
        assert main(argv) == 0
        assert "Loading weights" in capsys.readouterr().err
        assert main(argv + ["--no-progress"]) == 0
        err = capsys.readouterr().err
        assert "Loading weights" not in err and "perplexity:" not in err
    finally:
        hf_logging.enable_progress_bar()
        enable_progress_bars()


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_generate_dense_with_a_plan_is_the_dense_model(teal_plan, engine, capsys):
    """Before: with --engine hf, --dense was ignored and model.generate ran the plan's masked
    modules (the fast engine already ran dense, prefill included)."""
    base = ["generate", "--engine", engine, "--max-new-tokens", "6", "--no-stream", "--prompt", "The capital of France is"]
    assert main(base) == 0
    dense = capsys.readouterr().out
    assert main(base + ["--plan", str(teal_plan), "--dense"]) == 0
    assert capsys.readouterr().out == dense
    assert main(base + ["--plan", str(teal_plan)]) == 0
    assert capsys.readouterr().out != dense  # the plan does change the text: the comparison can fail
