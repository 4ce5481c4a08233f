"""`actsparse calibrate`: compute a method's thresholds on calibration text and save a plan."""
from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.commands.common import (add_data_options, add_model_options, check_output, load_causal_lm, setup,
                                       text_options)


def config_from_args(args):
    """The method config the options name: ``--method`` (a method or preset), ``--sparsity``
    (``--cett`` for a method whose knob is the CETT value), ``--override``, ``--allocation``."""
    from actsparse.errors import ConfigError
    from actsparse.sparsify.registry import PRESETS, make_config

    if args.method not in PRESETS:
        raise ConfigError(f"unknown method {args.method!r}; valid: {', '.join(PRESETS)}")
    cls = PRESETS[args.method][0]
    extra = {}
    if args.allocation is not None:
        if cls.METHOD != "teal":
            raise ConfigError(f"--allocation applies to TEAL only, not {args.method!r}")
        extra["allocation"] = args.allocation
    overrides = parse_overrides(args.override)
    if overrides:
        extra["overrides"] = tuple(overrides)
    knob = args.cett if cls.KNOB == "cett" and args.cett is not None else args.sparsity
    return make_config(args.method, knob, **extra)


def parse_overrides(items) -> list:
    from actsparse.errors import ConfigError

    out = []
    for item in items or []:
        pat, sep, val = item.rpartition("=")
        if not sep or not pat:
            raise ConfigError(f"--override takes PATTERN=SPARSITY or PATTERN=dense, got {item!r}")
        val = val.strip().lower()
        if val in ("dense", "none"):
            out.append((pat, None))
            continue
        try:
            out.append((pat, float(val)))
        except ValueError:
            raise ConfigError(f"--override {item!r}: {val!r} is not a sparsity; use PATTERN=S with S in [0, 1) "
                              "(e.g. 'model.layers.0.*=0.3') or PATTERN=dense") from None
    return out


def add_method_options(p: argparse.ArgumentParser) -> None:
    from actsparse.sparsify.registry import preset_names

    p.add_argument("--method", required=True, help=f"one of: {', '.join(preset_names())}")
    p.add_argument("--sparsity", type=float, default=0.5, help="target sparsity in [0, 1)")
    p.add_argument("--cett", type=float, default=None, help="CETT target (method cett)")
    p.add_argument("--allocation", choices=["uniform", "greedy"], default=None,
                   help="TEAL only: uniform sparsity for every input kind, or the paper's block-wise greedy "
                        "allocation (per block, parameter-weighted sparsity = --sparsity). Default: uniform "
                        "(greedy for method teal-greedy)")
    p.add_argument("--override", action="append", default=[], metavar="PATTERN=S",
                   help="per-site sparsity by module-path glob (or re:REGEX); S='dense' leaves matches dense. "
                        "Repeatable, last match wins. Example: 'model.layers.0.*=dense'")


def register(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="calibrate a training-free sparsity method and save a plan",
        description="Run the model over calibration text, set the thresholds of a method (teal, cats, chess, "
                    "topk, wina, cett, rsparse) and write a plan directory (plan.json + plan.safetensors) that "
                    "`actsparse eval --plan` and load_plan() apply. Under torchrun (`torchrun --nproc-per-node N "
                    "-m actsparse calibrate ...`) each rank runs a block of the batches, the statistics are "
                    "all-reduced, and rank 0 writes the plan one process would write.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    add_data_options(p, split="calibration", tokens=8192)
    add_method_options(p)
    p.add_argument("--layerwise", action="store_true",
                   help="models larger than memory: read one decoder layer at a time from the model's safetensors "
                        "(memory-mapped), run the calibration hidden states through it and free it; the plan is "
                        "the in-memory plan. LLaMA family; one process")
    p.add_argument("--out", required=True, type=Path, help="plan directory to write")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from actsparse.data.text import text, token_windows
    from actsparse.measure import distributed
    from actsparse.models.loading import check_window
    from actsparse.sparsify.api import sparsify_
    from actsparse.sparsify.plan import save_plan

    setup(args)
    check_output(args.out, "--out", directory=True)
    world = distributed.init_from_env()
    try:
        if args.layerwise:
            if world.active:
                from actsparse.errors import ConfigError

                raise ConfigError("--layerwise calibrates in one process; run it without torchrun (or drop "
                                  "--layerwise to calibrate data-parallel)")
            return _run_layerwise(args)
        config = config_from_args(args)
        model, tok = load_causal_lm(args, "`actsparse calibrate`")
        check_window(model, args.window)
        windows = token_windows(tok, text(args.data, args.split, **text_options(args)), window=args.window,
                                max_tokens=args.tokens, sampling=args.sampling)
        sparsify_(model, config, calibration=windows, batch_size=args.batch_size,
                  progress=not args.no_progress and world.is_main, world=world)
        meta = {"model": args.model, "data": args.data, "split": args.split, "tokens": windows.tokens,
                "window": args.window, "sampling": windows.sampling, "windows": len(windows),
                "windows_available": windows.available}
        if world.active:
            meta["data_parallel"] = {"world_size": world.size, "backend": world.backend}
        if world.is_main:  # the other ranks hold the same merged statistics and write nothing
            save_plan(model, args.out, meta=meta)
            ranks = f" on {world.size} ranks" if world.active else ""
            print(f"calibrated {config.METHOD} on {windows.tokens} tokens of {args.data}/{args.split}{ranks}; "
                  f"wrote {args.out}")
    finally:
        distributed.finish(world)
    return 0


def _run_layerwise(args) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from actsparse.data.text import text, token_windows
    from actsparse.errors import ConfigError
    from actsparse.models.loading import weights_directory
    from actsparse.sparsify.layerwise import assign_layerwise, calibrate_layerwise, identity_layerwise
    from actsparse.sparsify.plan import write_plan

    config = config_from_args(args)
    directory = weights_directory(args.model)
    limit = getattr(AutoConfig.from_pretrained(str(directory)), "max_position_embeddings", None)
    if limit is not None and args.window > limit:
        raise ConfigError(f"--window {args.window} is longer than {args.model}'s max_position_embeddings ({limit})")
    tok = AutoTokenizer.from_pretrained(str(directory))
    windows = token_windows(tok, text(args.data, args.split, **text_options(args)), window=args.window,
                            max_tokens=args.tokens, sampling=args.sampling)
    stats = calibrate_layerwise(args.model, config, windows, batch_size=args.batch_size, dtype=args.dtype,
                                progress=not args.no_progress)
    assignments = assign_layerwise(args.model, config, stats, dtype=args.dtype)
    meta = {"model": args.model, "data": args.data, "split": args.split, "tokens": windows.tokens,
            "window": args.window, "sampling": windows.sampling, "windows": len(windows),
            "windows_available": windows.available, "layerwise": True}
    write_plan(args.out, config, identity_layerwise(args.model, dtype=args.dtype), assignments, meta=meta)
    print(f"calibrated {config.METHOD} layer by layer on {windows.tokens} tokens of {args.data}/{args.split}; "
          f"wrote {args.out}")
    return 0
