"""`actsparse pplp`: PPL-p% sparsity (Sparsing Law): the sparsity reached when validation
perplexity rises by p% — by bisection on one CETT value shared by all layers, and optionally
on the uniform sparsity of other method families."""
from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.commands.common import (add_model_options, add_protocol_option, add_ray_option, add_text_options,
                                       check_output, differing_fields, positive_int, read_result, setup, text_options, window_int)
from actsparse.errors import ConfigError, StateError



def register(sub) -> None:
    p = sub.add_parser(
        "pplp", help="PPL-p%% sparsity: bisection so that validation perplexity rises by p%%",
        description="Bisects one CETT value shared by all layers (per layer, the threshold on "
                    "|h_i|*||W_down[:,i]|| giving that CETT) so that validation perplexity rises by at most p%%, "
                    "and reports the sparsity reached. --methods adds a bisection on the uniform sparsity of "
                    "other families (teal, teal-greedy, teal-greedy-linear, rsparse, cats, chess, topk, wina).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    p.add_argument("--p", type=float, default=1.0, help="allowed perplexity rise in percent")
    p.add_argument("--methods", default="cett", help="comma-separated families to search (cett always makes sense)")
    add_text_options(p)
    add_protocol_option(p)
    p.add_argument("--calib-tokens", type=positive_int, default=8192)
    p.add_argument("--tokens", type=positive_int, default=2048, help="validation-split tokens per evaluation")
    p.add_argument("--window", type=window_int, default=1024)
    p.add_argument("--steps", type=positive_int, default=7, help="bisection steps per family")
    p.add_argument("--hi", type=float, default=None,
                   help="upper end of the bisection range for every family (default: 0.25 for cett's CETT "
                        "value, 0.6 for the sparsity of the other families)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--into", type=Path, default=None,
                   help="also store them under 'pplp' in this sweep JSON (refused if it was made with another "
                        "model, dtype or data)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_ray_option(p, "each family's search is a Ray task")
    p.set_defaults(func=run)


def check_into(saved: dict, now: dict, path) -> None:
    """Refuse to store PPL-p% results in a sweep file of another model, dtype or data."""
    from actsparse.commands.sweep import identity_fields

    if saved.get("format") != "actsparse.quality/1":
        raise ConfigError(f"--into {path} is not a sweep result (format {saved.get('format')!r}, expected "
                          "'actsparse.quality/1' from `actsparse sweep`)")
    diffs = differing_fields(saved, now, identity_fields(saved, now) + ["dtype", "protocol.data",
                                                                         "protocol.text_options"])
    saved_protocol = (saved.get("protocol") or {}).get("evaluation", {}).get("sparse_protocol", "all")
    if saved_protocol != now.get("sparse_protocol", "all"):
        diffs.append(f"sparse protocol: file {saved_protocol!r}, now {now.get('sparse_protocol')!r}")
    if diffs:
        raise ConfigError(f"--into {path} was made with other settings ({'; '.join(diffs)}); store the results in "
                          "the sweep of this model and data, or use --json alone")


def run(args, *, cell_fn=None) -> int:
    """``cell_fn``: with --ray, the function a worker runs per cell (None: the real one)."""
    from actsparse.eval.cells import Workload
    from actsparse.experiments.executors import CellsFailed, executor
    from actsparse.io import read_json, write_json
    from actsparse.sparsify.registry import make_config

    setup(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods must name at least one family")
    for m in methods:
        make_config(m, 0.5)
    if not args.p > 0:
        raise ConfigError(f"--p must be a positive percentage, got {args.p}")
    if args.json:
        check_output(args.json, "--json")
    if args.into:
        check_output(args.into, "--into")
        into = read_result(args.into, "--into")
    reading = text_options(args)
    workload = Workload(model=args.model, dtype=args.dtype, data=args.data, text_options=reading,
                        sparse_protocol=args.protocol,
                        sampling=args.sampling, calib_tokens=args.calib_tokens, calib_window=args.window,
                        tokens=args.tokens, window=args.window, split="validation", threads=args.threads,
                        what="`actsparse pplp`", progress=not args.no_progress and args.ray is None)
    results, got = {}, {}
    with executor(workload, args.ray, cell_fn=cell_fn) as ex:
        if args.into:
            info = {}
            ex.map([{"kind": "describe"}], lambda cell, res: info.update(res["result"]))
            check_into(into, {"identity": info["identity"], "dtype": args.dtype,
                              "protocol": {"data": args.data, "text_options": reading},
                              "sparse_protocol": args.protocol}, args.into)
        ex.map([{"kind": "dense"}], lambda cell, res: got.update(dense=res["result"]))
        dense = got["dense"]

        def on_result(cell, res):
            m, r = cell["method"], res["result"]
            results[m] = r
            print(f"{m}: PPL-{args.p:g}% knob {r['knob']:.4f}, x{r['ratio']:.4f}, reached {r['reached_sparsity']}, "
                  f"bytes skipped {r['bytes_skipped']:.3f}", flush=True)
            # written after every family, so an interrupted run keeps what it finished
            if args.json:
                doc = {"model": args.model, "p": args.p, "dense_validation": dense,
                       "results": {k: results[k] for k in methods if k in results}, "executor": ex.record}
                missing = [k for k in methods if k not in results]
                if missing:  # the file of an unfinished run says so
                    doc["unfinished"] = missing
                write_json(args.json, doc)
            if args.into:
                doc = read_json(args.into)
                doc.setdefault("pplp", {})[m] = r
                write_json(args.into, doc)

        cells = [{"kind": "pplp", "method": m, "dense_ppl": dense["ppl"], "p": args.p, "hi": args.hi,
                  "steps": args.steps} for m in methods]
        try:
            ex.map(cells, on_result)
        except CellsFailed as err:
            where = f"; {args.json} holds the finished families" if args.json and results else ""
            raise StateError(f"{err}{where}. Run again for the missing families (--methods "
                             f"{','.join(m for m in methods if m not in results)})") from None
    return 0
