"""CLI options: counts that make no sense, outputs that cannot be written, default outputs,
the data options, --no-progress. Checked before any model is loaded or work is done."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from actsparse.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command, option, value", [
    ("eval", "--tokens", "0"), ("eval", "--tokens", "-5"), ("eval", "--threads", "0"), ("eval", "--stride", "0"),
    ("eval", "--batch-size", "0"), ("eval", "--window", "1"),
    ("profile --out x", "--tokens", "0"), ("profile --out x", "--batch-size", "0"),
    ("profile --out x", "--window", "1"), ("profile --out x", "--threads", "-1"),
    ("calibrate --method teal --out x", "--tokens", "0"),
    ("sweep", "--tokens", "0"), ("sweep", "--calib-tokens", "-1"), ("sweep", "--window", "1"),
    ("pplp", "--steps", "0"), ("pplp", "--tokens", "0"), ("pplp", "--calib-tokens", "0"),
    ("generate", "--max-new-tokens", "0"), ("generate", "--threads", "0"),
    ("finetune --out x", "--steps", "0"), ("finetune --steps 1 --out x", "--threads", "0"),
    ("finetune --steps 1 --out x", "--eval-tokens", "-1"),
    ("bench decode", "--repeats", "0"), ("bench kernel", "--repeats", "0"),
    ("prune --out x", "--cycles", "0"), ("prune-experiment", "--seeds", "0"), ("prune-experiment", "--threads", "0"),
])
def test_zero_and_negative_counts_are_refused(command, option, value, capsys):
    """Before: --tokens 0 meant the whole split, -5 was accepted, --threads 0 / --stride 0 were
    ignored, --batch-size 0 ended in ZeroDivisionError."""
    with pytest.raises(SystemExit) as exc:
        main(command.split() + [option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be" in err and value in err


# ---------------------------------------------------------------- outputs, checked first
def _refused(argv, capsys, *fragments):
    # --model no-such-model: if the output were checked after loading, the error would be the model's
    assert main(argv + ["--model", "no-such-model"] if argv[0] in MODEL_COMMANDS else argv) == 2
    err = capsys.readouterr().err
    assert "unknown model" not in err
    for f in fragments:
        assert f in err, err
    return err


MODEL_COMMANDS = {"eval", "profile", "calibrate", "sweep", "pplp", "finetune"}


def test_outputs_are_validated_before_any_work(tmp_path, capsys):
    """Before: an --out that is a file, a --json that is a directory or an unwritable target
    raised after minutes of computation."""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    _refused(["eval", "--json", str(a_dir)], capsys, f"--json {a_dir} is a directory")
    _refused(["profile", "--out", str(a_file)], capsys, f"--out {a_file} is an existing file")
    _refused(["calibrate", "--method", "teal", "--out", str(a_file / "plan")], capsys, "is a file, so")
    _refused(["sweep", "--out", str(a_dir)], capsys, "is a directory")
    _refused(["sweep", "--out", str(tmp_path / "q.json"), "--plot", str(a_dir)], capsys, "--plot")
    _refused(["pplp", "--json", str(a_dir)], capsys, "--json")
    _refused(["pplp", "--into", str(tmp_path / "missing.json")], capsys, "--into", "does not exist")
    _refused(["pplp", "--into", str(a_file)], capsys, "--into", "not a readable JSON result")
    _refused(["finetune", "--steps", "1", "--out", str(a_file)], capsys, "is an existing file")
    _refused(["bench", "kernel", "--quick", "--out", str(a_dir)], capsys, "is a directory")
    _refused(["bench", "decode", "--out", str(a_dir)], capsys, "is a directory")
    _refused(["prune-experiment", "--quick", "--out", str(a_file)], capsys, "is an existing file")
    _refused(["prune", "--out", str(a_file)], capsys, "is an existing file")
    unwritable = "/proc/actsparse-test/result.json"  # /proc takes no new files, even for root
    _refused(["eval", "--json", unwritable], capsys, "cannot write in /proc")
    _refused(["bench", "kernel", "--quick", "--out", unwritable], capsys, "cannot write in /proc")
    assert a_file.read_text() == "keep me" and not list(a_dir.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _refused(["eval", "--json", str(ro / "r.json")], capsys, "cannot write in")
    finally:
        ro.chmod(0o755)


def test_default_outputs_never_go_into_benchmarks_results():
    """Before: sweep, bench kernel, bench decode and prune-experiment wrote into
    benchmarks/results/ by default and replaced the committed results."""
    from actsparse.commands.sweep import output_paths

    parser = build_parser()
    outs = {
        "sweep": output_paths(parser.parse_args(["sweep"])),
        "bench kernel": parser.parse_args(["bench", "kernel"]).out,
        "bench decode": parser.parse_args(["bench", "decode"]).out,
        "prune-experiment": parser.parse_args(["prune-experiment"]).out,
        "contrast": parser.parse_args(["contrast", "--a", "news", "--b", "wiki"]).out,
        "intervene": parser.parse_args(["intervene", "--contrast", "c"]).out,
        "recover": parser.parse_args(["recover", "--tokens", "1"]).out,
    }
    assert [str(p) for p in outs["sweep"]] == ["actsparse-out/quality-smollm2-135m.json",
                                               "actsparse-out/quality-smollm2-135m.png"]
    for name, out in outs.items():
        for p in (out if isinstance(out, tuple) else (out,)):
            assert Path(p).parts[0] == "actsparse-out", (name, p)


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.py")))
def test_benchmark_scripts_default_outside_the_results(script):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    help_text = re.sub(r"-\s+", "-", " ".join(out.stdout.split()))  # argparse wraps at hyphens
    assert "(default: actsparse-out/" in help_text
    assert "default: benchmarks/results" not in help_text


# ---------------------------------------------------------------- data options
@pytest.mark.parametrize("command", ["profile", "calibrate", "eval", "sweep", "pplp"])
def test_data_options_everywhere(command):
    """Before: --text-field was promised by the README and an error message but did not exist."""
    extra = {"profile": ["--out", "x"], "calibrate": ["--method", "teal", "--out", "x"]}.get(command, [])
    args = build_parser().parse_args([command, "--data", "plays.jsonl", "--text-field", "body", "--encoding",
                                      "latin-1", "--doc-separator", r"\n===\n", "--sampling", "prefix"] + extra)
    assert (args.text_field, args.encoding, args.doc_separator, args.sampling) == (
        "body", "latin-1", r"\n===\n", "prefix")
    defaults = build_parser().parse_args([command] + extra)
    assert (defaults.text_field, defaults.encoding, defaults.doc_separator) == ("text", "utf-8", None)
    assert defaults.sampling == (None if command == "eval" else "spread")  # eval: spread, prefix with --stride


def test_data_help_documents_the_txt_format(capsys):
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "documents separated by --doc-separator, by default a blank line" in text
    assert "--text-field" in text and "--encoding" in text and "--sampling" in text


def test_override_and_sites_errors_name_the_input(tmp_path, capsys):
    """Before: --override 'x=abc' raised ValueError, --sites mlp.foo KeyError (tracebacks)."""
    assert main(["calibrate", "--method", "teal", "--override", "x=abc", "--out", str(tmp_path / "p")]) == 2
    assert "--override 'x=abc': 'abc' is not a sparsity" in capsys.readouterr().err
    assert main(["profile", "--sites", "mlp.foo", "--tokens", "512", "--out", str(tmp_path / "prof"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--sites: unknown site 'mlp.foo'" in err and "Roles: attn.k" in err
    assert not (tmp_path / "prof").exists()
