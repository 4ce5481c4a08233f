"""`actsparse pplp`: PPL-p% sparsity (Sparsing Law): the sparsity reached when validation
perplexity rises by p% — by bisection on one CETT value shared by all layers, and optionally
on the uniform sparsity of other method families."""
from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.commands.common import (add_model_options, add_text_options, check_output, differing_fields,
                                       load_causal_lm, positive_int, read_result, setup, text_options, window_int)
from actsparse.errors import ConfigError

# default upper end of the bisection range: the CETT value for cett (PPL-1% lies near 0.03 on
# SmolLM2), the uniform sparsity for the other families (PPL-1% lies below 0.4 for all of them)
HI = {"cett": 0.25}


def register(sub) -> None:
    p = sub.add_parser(
        "pplp", help="PPL-p%% sparsity: bisection so that validation perplexity rises by p%%",
        description="Bisects one CETT value shared by all layers (per layer, the threshold on "
                    "|h_i|*||W_down[:,i]|| giving that CETT) so that validation perplexity rises by at most p%%, "
                    "and reports the sparsity reached. --methods adds a bisection on the uniform sparsity of "
                    "other families (teal, teal-greedy, cats, chess, topk, wina).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    p.add_argument("--p", type=float, default=1.0, help="allowed perplexity rise in percent")
    p.add_argument("--methods", default="cett", help="comma-separated families to search (cett always makes sense)")
    add_text_options(p)
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
    p.set_defaults(func=run)


def check_into(saved: dict, now: dict, path) -> None:
    """Refuse to store PPL-p% results in a sweep file of another model, dtype or data."""
    from actsparse.commands.sweep import identity_fields

    if saved.get("format") != "actsparse.quality/1":
        raise ConfigError(f"--into {path} is not a sweep result (format {saved.get('format')!r}, expected "
                          "'actsparse.quality/1' from `actsparse sweep`)")
    diffs = differing_fields(saved, now, identity_fields(saved, now) + ["dtype", "protocol.data",
                                                                         "protocol.text_options"])
    if diffs:
        raise ConfigError(f"--into {path} was made with other settings ({'; '.join(diffs)}); store the results in "
                          "the sweep of this model and data, or use --json alone")


def run(args) -> int:
    from actsparse.data.text import text, token_windows
    from actsparse.eval.perplexity import perplexity, ppl_p_search
    from actsparse.io import read_json, write_json
    from actsparse.models.loading import check_window, weights_identity
    from actsparse.sparsify.api import calibrate
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
    model, tok = load_causal_lm(args, "`actsparse pplp`")
    check_window(model, args.window)
    if args.into:
        check_into(into, {"identity": weights_identity(model), "dtype": args.dtype,
                          "protocol": {"data": args.data, "text_options": reading}}, args.into)
    cal = token_windows(tok, text(args.data, "calibration", **reading), window=args.window,
                        max_tokens=args.calib_tokens, sampling=args.sampling)
    val = token_windows(tok, text(args.data, "validation", **reading), window=args.window, max_tokens=args.tokens,
                        sampling=args.sampling)
    dense = perplexity(model, val, progress=not args.no_progress, desc="perplexity, dense")
    results = {}
    for m in methods:
        # one family's statistics at a time: all families together held > 11 GB on SmolLM2
        stats = calibrate(model, [make_config(m, 0.5)], cal, progress=not args.no_progress)
        hi = args.hi if args.hi is not None else HI.get(m, 0.6)
        r = ppl_p_search(model, lambda x, m=m: make_config(m, x), stats, val, dense.ppl, p=args.p, hi=hi,
                         steps=args.steps, progress=not args.no_progress, desc=f"pplp {m}")
        r["protocol"].update({"data": args.data, "text_options": reading, "split": "validation",
                              "sampling": val.sampling, "calibration_tokens": cal.tokens,
                              "calibration_sampling": cal.sampling})
        r["config"] = make_config(m, r["knob"]).to_dict()
        results[m] = r
        del stats
        print(f"{m}: PPL-{args.p:g}% knob {r['knob']:.4f}, x{r['ratio']:.4f}, reached {r['reached_sparsity']}, "
              f"bytes skipped {r['bytes_skipped']:.3f}", flush=True)
        # written after every family, so an interrupted run keeps what it finished
        if args.json:
            write_json(args.json, {"model": args.model, "p": args.p, "dense_validation": dense.to_dict(),
                                   "results": results})
        if args.into:
            doc = read_json(args.into)
            doc.setdefault("pplp", {})[m] = r
            write_json(args.into, doc)
    return 0
