"""`actsparse eval`: held-out perplexity of a model, dense or with a saved plan."""
from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.commands.common import (add_model_options, add_plan_options, add_protocol_option, add_text_options, check_output,
                                       load_causal_lm, load_plan_from_args, positive_int, setup, text_options,
                                       window_int)


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity on held-out text (dense, or with --plan)",
        description="Perplexity on non-overlapping windows (or sliding with --stride) of a text split; with "
                    "--plan the saved sparsity plan is applied first and the reached sparsity per site kind "
                    "is reported. Under torchrun each rank scores a block of the windows and rank 0 reports the "
                    "gathered result (the same per-window NLLs as one process).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    add_plan_options(p)
    add_text_options(p, sampling=False)
    p.add_argument("--sampling", choices=["spread", "prefix"], default=None,
                   help="which windows --tokens takes from the split: spread (evenly over it) or prefix (the "
                        "first tokens). Default: spread; prefix with --stride (sliding windows score one "
                        "contiguous stretch)")
    p.add_argument("--split", default="test", choices=["calibration", "validation", "test", "all"])
    p.add_argument("--tokens", type=positive_int, default=16384, help="tokens to evaluate")
    p.add_argument("--window", type=window_int, default=1024)
    p.add_argument("--stride", type=positive_int, default=None, help="sliding-window stride (default: = window)")
    p.add_argument("--batch-size", type=positive_int, default=1)
    add_protocol_option(p)
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from actsparse.eval.perplexity import perplexity
    from actsparse.io import write_json
    from actsparse.measure import distributed

    setup(args)
    if args.json:
        check_output(args.json, "--json")
    world = distributed.init_from_env()
    try:
        model, tok = load_causal_lm(args, "`actsparse eval`")
        if args.plan is not None:
            load_plan_from_args(model, args)
        res = perplexity(model, args.data, tokenizer=tok, split=args.split, window=args.window, stride=args.stride,
                         tokens=args.tokens, batch_size=args.batch_size, progress=not args.no_progress and world.is_main,
                         sampling=args.sampling, sparse_protocol=args.protocol, world=world,
                         **text_options(args))
        if not world.is_main:  # every rank holds the gathered result; rank 0 reports it
            return 0
        print(res)
        for kind, s in res.reached_sparsity.items():
            print(f"  reached sparsity {kind}: {s:.3f}")
        if res.bytes_skipped is not None:
            print(f"  block linear weight bytes skippable per token: {res.bytes_skipped:.3f}")
        if args.json:
            doc = {"model": args.model, "plan": str(args.plan) if args.plan else None, "dtype": args.dtype,
                   **res.to_dict()}
            if world.active:
                doc["data_parallel"] = {"world_size": world.size, "backend": world.backend}
            write_json(args.json, doc)
    finally:
        distributed.finish(world)
    return 0
