"""`actsparse eval`: held-out perplexity of a model, dense or with a saved plan."""
from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.commands.common import add_model_options, apply_threads


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity on held-out text (dense, or with --plan)",
        description="Perplexity on non-overlapping windows (or sliding with --stride) of a text split; with "
                    "--plan the saved sparsity plan is applied first and the reached sparsity per site kind "
                    "is reported.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    p.add_argument("--plan", type=Path, default=None, help="plan directory from `actsparse calibrate`")
    p.add_argument("--data", default="wiki", help="corpus name or path")
    p.add_argument("--split", default="test", choices=["calibration", "validation", "test", "all"])
    p.add_argument("--tokens", type=int, default=16384, help="tokens to evaluate")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: = window)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    import actsparse as asp
    from actsparse.eval.perplexity import perplexity
    from actsparse.io import write_json

    apply_threads(args)
    model, tok = asp.load(args.model, dtype=args.dtype)
    if args.plan is not None:
        from actsparse.sparsify.plan import load_plan

        load_plan(model, args.plan)
    res = perplexity(model, args.data, tokenizer=tok, split=args.split, window=args.window, stride=args.stride,
                     tokens=args.tokens, batch_size=args.batch_size, progress=not args.no_progress)
    print(res)
    for kind, s in res.reached_sparsity.items():
        print(f"  reached sparsity {kind}: {s:.3f}")
    if res.bytes_skipped is not None:
        print(f"  block linear weight bytes skippable per token: {res.bytes_skipped:.3f}")
    if args.json:
        write_json(args.json, {"model": args.model, "plan": str(args.plan) if args.plan else None,
                               "dtype": args.dtype, **res.to_dict()})
    return 0
