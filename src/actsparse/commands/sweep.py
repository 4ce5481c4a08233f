"""`actsparse sweep`: quality vs sparsity of several methods, written as JSON plus a plot."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from actsparse.commands.common import add_model_options, apply_threads

ORDER_HINT = (0.5, 0.3, 0.7, 0.4, 0.6)  # most informative targets first, so a partial run is useful


def register(sub) -> None:
    p = sub.add_parser(
        "sweep", help="perplexity of several methods at several sparsities (JSON + plot)",
        description="Calibrates every method once on the calibration split, then evaluates dense and each "
                    "method x sparsity on the test split (non-overlapping windows). Writes the JSON "
                    "atomically after every point (resumable with --resume) and a quality-vs-bytes-skipped plot.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    p.add_argument("--methods", default="teal,cats,chess,topk,wina",
                   help="comma-separated: teal, teal-greedy (TEAL with the block-wise greedy allocation), cats, "
                        "chess, chess-selective, topk, wina")
    p.add_argument("--sparsity", default="0.3,0.4,0.5,0.6,0.7", help="comma-separated targets")
    p.add_argument("--data", default="wiki")
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration-split tokens")
    p.add_argument("--calib-window", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=16 * 1024, help="test-split tokens")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/quality-<model>.json)")
    p.add_argument("--plot", type=Path, default=None, help="plot path (default: the JSON path with .png)")
    p.add_argument("--resume", action="store_true", help="keep finished points of an existing JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def model_slug(name: str) -> str:
    return Path(name).name.replace("/", "-").lower()


def run(args) -> int:
    import actsparse as asp
    from actsparse.data.text import text, token_windows
    from actsparse.eval.perplexity import perplexity
    from actsparse.io import read_json, write_json
    from actsparse.models.loading import weights_identity
    from actsparse.provenance import environment, git_hash
    from actsparse.report.quality_report import plot_quality
    from actsparse.sparsify.api import calibrate, desparsify_, sparsify_
    from actsparse.sparsify.modules import bytes_skipped
    from actsparse.sparsify.registry import check_sparsity, make_config

    apply_threads(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    targets = [check_sparsity(s) for s in args.sparsity.split(",") if s.strip()]
    for m in methods:
        make_config(m, 0.5)  # validates the name
    out = args.out or Path("benchmarks/results") / f"quality-{model_slug(args.model)}.json"
    plot = args.plot or out.with_suffix(".png")
    model, tok = asp.load(args.model, dtype=args.dtype)
    cal = token_windows(tok, text(args.data, "calibration"), window=args.calib_window, max_tokens=args.calib_tokens)
    test = token_windows(tok, text(args.data, "test"), window=args.window, max_tokens=args.tokens)
    doc = read_json(out) if args.resume and out.is_file() else None
    if doc is None:
        doc = {"format": "actsparse.quality/1", "model": args.model, "identity": weights_identity(model),
               "dtype": args.dtype, "git": git_hash(), "environment": environment(),
               "protocol": {"data": args.data, "calibration": {"split": "calibration", "tokens": cal.tokens,
                                                               "window": args.calib_window},
                            "evaluation": {"split": "test", "tokens_requested": args.tokens, "window": args.window,
                                           "stride": args.window, "windows": len(test),
                                           "mode": "non-overlapping, BOS at each window start"}},
               "dense": None, "results": []}
    doc["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.perf_counter()
    configs = [make_config(m, 0.5) for m in methods]
    stats = calibrate(model, configs, cal, progress=not args.no_progress)
    doc["protocol"]["calibration"]["seconds"] = time.perf_counter() - t0
    if doc["dense"] is None:
        d = perplexity(model, test, progress=not args.no_progress)
        doc["dense"] = d.to_dict()
        doc["protocol"]["evaluation"]["scored_tokens"] = d.tokens
        write_json(out, doc)
        print(f"dense: {d}", flush=True)
    dense_ppl = doc["dense"]["ppl"]
    done = {(r["method"], r["target"]) for r in doc["results"]}
    order = sorted(targets, key=lambda s: (ORDER_HINT.index(s) if s in ORDER_HINT else 99, s))
    for s in order:
        for m in methods:
            if (m, s) in done:
                continue
            config = make_config(m, s)
            sparsify_(model, config, stats=stats)
            try:
                nominal = bytes_skipped(model, nominal={a.path: a.target for a in model._actsparse_sparsity.assignments
                                                        if a.target is not None})
                r = perplexity(model, test, progress=not args.no_progress)
            finally:
                desparsify_(model)
            doc["results"].append({"method": m, "target": s, "config": config.to_dict(), "ppl": r.ppl,
                                   "ratio": r.ppl / dense_ppl, "reached_sparsity": r.reached_sparsity,
                                   "bytes_skipped": r.bytes_skipped, "nominal_bytes_skipped": nominal,
                                   "seconds": r.seconds})
            write_json(out, doc)
            print(f"{m} @ {s:.2f}: PPL {r.ppl:.3f} (x{r.ppl / dense_ppl:.3f}), bytes skipped "
                  f"{r.bytes_skipped:.3f}, reached {r.reached_sparsity}", flush=True)
            try:
                plot_quality(doc, plot)
            except Exception as err:  # a plot must never lose a measurement
                print(f"plot failed: {err}")
    plot_quality(doc, plot)
    print(f"wrote {out} and {plot}")
    return 0
