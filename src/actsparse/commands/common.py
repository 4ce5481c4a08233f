"""Options and checks shared by several commands."""
from __future__ import annotations

import argparse
import inspect
import tempfile
from pathlib import Path

import torch

from actsparse.errors import ConfigError

# where commands write by default; benchmarks/results/ is written only with an explicit --out
DEFAULT_OUT = Path("actsparse-out")


# ---------------------------------------------------------------- argparse types
def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def window_int(value: str) -> int:
    """A window length: at least 2 tokens (one predicts the next)."""
    n = positive_int(value)
    if n < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 tokens, got {value}")
    return n


def nonnegative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return n


# ---------------------------------------------------------------- options
def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded name (smollm2-135m, gemma3-270m, minilm), a local Hugging Face model directory, "
                        "a .gguf file, or a hub id (needs internet). Default: %(default)s")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and activations dtype. Default: %(default)s")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: torch's choice, usually the number of cores)")


DATA_HELP = ("embedded corpus (wiki: gensim's Wikipedia articles; news: the Lee corpus), a .txt file "
             "(UTF-8 unless --encoding; documents separated by --doc-separator, by default a blank line), "
             "a .jsonl file (one JSON object per line, text in --text-field), or a folder of .txt/.md/.jsonl "
             "files (each .txt/.md file one document). Default: %(default)s")


def add_text_options(p: argparse.ArgumentParser, *, sampling: bool = True) -> None:
    """--data and how its files are read (--text-field, --encoding, --doc-separator) and,
    unless ``sampling=False``, which windows a token budget takes (--sampling)."""
    p.add_argument("--data", default="wiki", help=DATA_HELP)
    p.add_argument("--text-field", default="text", help=".jsonl files: the field that holds the text. "
                                                        "Default: %(default)s")
    p.add_argument("--encoding", default="utf-8", help="text encoding of .txt/.md/.jsonl files (e.g. latin-1). "
                                                       "Default: %(default)s")
    p.add_argument("--doc-separator", default=None, metavar="REGEX",
                   help=".txt files: regular expression between documents (default: a blank line, "
                        r"'\n\s*\n'); e.g. '\n={3,}\n' for a line of ===")
    if sampling:
        p.add_argument("--sampling", choices=["spread", "prefix"], default="spread",
                       help="with a token budget smaller than the split: spread = windows evenly spaced over "
                            "the whole split (deterministic), prefix = the first windows. Default: %(default)s")


def add_data_options(p: argparse.ArgumentParser, *, split: str = "calibration", tokens: int = 4096) -> None:
    add_text_options(p)
    p.add_argument("--split", default=split, choices=["calibration", "validation", "test", "all"],
                   help="document split: calibration = first 40%% of documents, validation = next 30%%, "
                        "test = last 30%%. Default: %(default)s")
    p.add_argument("--tokens", type=positive_int, default=tokens, help="tokens to run. Default: %(default)s")
    p.add_argument("--window", type=window_int, default=512, help="tokens per window (sequence). Default: %(default)s")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward. Default: %(default)s")


def add_protocol_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", choices=["all", "decode"], default="all",
                   help="which tokens are sparse: all (every token of every window) or decode (TEAL's evaluation: "
                        "the first half of each window dense, filling the KV cache, the second half sparse and "
                        "scored; the dense reference is evaluated the same way)")


def add_ray_option(p: argparse.ArgumentParser, unit: str) -> None:
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help=f"run on a Ray cluster ({unit}; the JSON is the in-process one): auto = the running cluster "
                        "($RAY_ADDRESS, or one started here with `ray start --head`), local = a cluster of this "
                        "machine for this run, or HOST:PORT / ray://HOST:PORT of a head node. Needs "
                        "pip install 'actsparse[ray]'. Default: in-process, without Ray")


def text_options(args) -> dict:
    """The keyword arguments of actsparse.data.text's reading functions the options name."""
    return {"text_field": args.text_field, "encoding": args.encoding, "doc_separator": args.doc_separator}


def add_plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", type=Path, default=None, help="a plan directory written by `actsparse calibrate`")
    p.add_argument("--ignore-plan-weights", action="store_true",
                   help="load the plan even if it was calibrated on different weights of the same architecture; "
                        "its thresholds then do not give the planned sparsity")


def load_plan_from_args(model, args) -> None:
    """``load_plan(model, args.plan)``, passing --ignore-plan-weights where load_plan checks weights."""
    from actsparse.sparsify.plan import load_plan

    kw = {}
    if "check_weights" in inspect.signature(load_plan).parameters:
        kw["check_weights"] = not args.ignore_plan_weights
    load_plan(model, args.plan, **kw)


# ---------------------------------------------------------------- set-up
def apply_threads(args) -> None:
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def quiet_progress() -> None:
    """Silence transformers' and the hub's progress bars (weight loading, downloads)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # pragma: no cover - older hub
        return
    disable_progress_bars()


def setup(args) -> None:
    """What every command does first: torch threads, and with --no-progress no progress bars."""
    apply_threads(args)
    if getattr(args, "no_progress", False):
        quiet_progress()


def load_causal_lm(args, what: str):
    """Load ``args.model`` (``args.dtype``) for a command that needs a causal LM head."""
    import actsparse as asp
    from actsparse.models.loading import require_causal_lm

    model, tok = asp.load(args.model, dtype=args.dtype)
    require_causal_lm(model, args.model, what)
    return model, tok


# ---------------------------------------------------------------- outputs
def check_output(path, option: str, *, directory: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written: a directory where a file
    is needed, a file where a directory is needed, or a location that is not writable.
    Creates nothing (a probe file in the nearest existing folder is removed at once)."""
    path = Path(path).expanduser()
    if directory and path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is an existing file; it must be a directory (give a folder path)")
    if not directory and path.is_dir():
        raise ConfigError(f"{option} {path} is a directory; it must be a file path (e.g. {path / 'result.json'})")
    folder = path if directory else path.parent
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option} {path}: {existing} is a file, so {folder} cannot be created")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"{option} {path}: cannot write in {existing} ({err.strerror or err}); "
                          f"choose another location") from None
    return path


def check_sites(model, sites) -> None:
    """Resolve ``--sites`` on ``model`` now, as an error that names the site and the choices."""
    from actsparse.measure.capture import resolve_sites

    try:
        resolve_sites(model, sites)
    except KeyError as err:
        raise ConfigError(f"--sites: {err.args[0] if err.args else err}") from None


# ---------------------------------------------------------------- result files
def read_result(path, option: str) -> dict:
    """A JSON result file written by an earlier run, or a clear error."""
    import json

    from actsparse.io import read_json

    try:
        doc = read_json(path)
    except FileNotFoundError:
        raise ConfigError(f"{option} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{option} {path} is not a readable JSON result ({err})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{option} {path} is not a result object")
    return doc


def _field(doc: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def differing_fields(saved: dict, now: dict, fields) -> list[str]:
    """``"field: file X, now Y"`` for each dotted field whose values differ."""
    return [f"{f}: file {_field(saved, f)!r}, now {_field(now, f)!r}"
            for f in fields if _field(saved, f) != _field(now, f)]
