"""`actsparse eval`: held-out perplexity of a model, dense or with a saved plan; with --tasks,
downstream accuracy (BLiMP, cloze) through lm-eval, dense and with the plan."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from actsparse.commands.common import (add_model_options, add_plan_options, add_protocol_option, add_text_options, check_output,
                                       load_causal_lm, load_plan_from_args, positive_int, setup, text_options,
                                       window_int)


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity on held-out text (dense, or with --plan); downstream tasks with --tasks",
        description="Perplexity on non-overlapping windows (or sliding with --stride) of a text split; with "
                    "--plan the saved sparsity plan is applied first and the reached sparsity per site kind "
                    "is reported. Under torchrun each rank scores a block of the windows and rank 0 reports the "
                    "gathered result (the same per-window NLLs as one process). With --tasks blimp,cloze it runs "
                    "downstream tasks through lm-eval-harness instead (pip install 'actsparse[lmeval]'): the dense "
                    "model, then with --plan the sparse one on the same items, and reports both accuracies (BLiMP "
                    "overall and per field, cloze), the number of items and the paired difference.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    g = p.add_argument_group("downstream tasks (lm-eval; replace the perplexity run)")
    g.add_argument("--tasks", default=None, metavar="LIST",
                   help="comma-separated downstream tasks instead of perplexity: blimp (BLiMP minimal pairs, from "
                        "--blimp-dir), cloze (last-word prediction on passages of --data's --split)")
    g.add_argument("--blimp-dir", type=Path, default=None,
                   help="folder of BLiMP's <paradigm>.jsonl files (default: $ACTSPARSE_BLIMP_DIR, else "
                        "../shared/data/blimp beside the repository if it exists)")
    g.add_argument("--limit", type=limit_arg, default=100,
                   help="items per task: pairs per BLiMP paradigm (its first ones), cloze passages (spread over the "
                        "split); 'all' for every item")
    g.add_argument("--cloze-context-words", type=positive_int, default=64,
                   help="words of context before each cloze target")
    g.add_argument("--task-batch-size", type=positive_int, default=32, help="lm-eval requests per forward")
    p.set_defaults(func=run)


def limit_arg(value: str):
    """A positive count, or 'all' (None)."""
    return None if value == "all" else positive_int(value)



def run(args) -> int:
    from actsparse.eval.perplexity import perplexity
    from actsparse.io import write_json
    from actsparse.measure import distributed

    setup(args)
    if args.json:
        check_output(args.json, "--json")
    if args.tasks is not None:
        return run_tasks(args)
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


def run_tasks(args) -> int:
    """``eval --tasks``: the tasks on the dense model, then (with --plan) on the sparse one."""
    from actsparse.errors import ConfigError, UnsupportedError
    from actsparse.eval.downstream import (check_tasks, evaluate_tasks, format_results, paired_difference,
                                           require_lm_eval, resolve_blimp_dir)
    from actsparse.io import write_json

    tasks = check_tasks(args.tasks)
    if args.protocol != "all":
        raise ConfigError("downstream tasks score every token of the sparse model (protocol all); the decode protocol "
                          "(dense context, sparse continuation) is not offered for them: drop --protocol decode")
    if args.stride is not None:
        raise ConfigError("--stride is a perplexity option; downstream tasks (--tasks) do not take it")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UnsupportedError("downstream tasks (--tasks) run in one process; run them without torchrun")
    if "blimp" in tasks:
        resolve_blimp_dir(args.blimp_dir)  # a missing folder is an error before the model loads
    require_lm_eval()
    model, tok = load_causal_lm(args, "`actsparse eval --tasks`")
    kw = dict(blimp_dir=args.blimp_dir, limit=args.limit, cloze_data=args.data, cloze_split=args.split,
              cloze_context_words=args.cloze_context_words, text_options=text_options(args),
              batch_size=args.task_batch_size)
    runs = {"dense": evaluate_tasks(model, tok, tasks, **kw)}
    if any(r.details["sparse_modules"] for r in runs["dense"].values()):  # pragma: no cover - a fresh load is dense
        raise ConfigError("the dense baseline ran with sparse modules")
    if args.plan is not None:
        load_plan_from_args(model, args)
        runs["sparse"] = evaluate_tasks(model, tok, tasks, **kw)
    print(format_results(runs))
    doc = {"model": args.model, "plan": str(args.plan) if args.plan else None, "dtype": args.dtype,
           "tasks": {label: {t: r.to_dict() for t, r in res.items()} for label, res in runs.items()}}
    if "sparse" in runs:
        doc["difference"] = {}
        for t in tasks:
            d = doc["difference"][t] = paired_difference(runs["sparse"][t], runs["dense"][t])
            lo, hi = d["ci"]
            print(f"  {t}: sparse - dense {100 * d['difference']:+.1f} points (stderr {100 * d['stderr']:.1f}, "
                  f"95% paired bootstrap [{100 * lo:+.1f}, {100 * hi:+.1f}]; {d['items']} items, "
                  f"{d['discordant']} discordant)")
        if "blimp" in tasks:
            dense_f, sparse_f = runs["dense"]["blimp"].per_field, runs["sparse"]["blimp"].per_field
            doc["difference"]["blimp_per_field"] = {f: sparse_f[f]["accuracy"] - dense_f[f]["accuracy"]
                                                   for f in dense_f}
    if args.json:
        write_json(args.json, doc)
    return 0
