"""`actsparse sweep`: quality vs sparsity of several methods, written as JSON plus a plot."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from actsparse.commands.common import (DEFAULT_OUT, add_model_options, add_text_options, check_output,
                                       differing_fields, load_causal_lm, positive_int, read_result, setup,
                                       text_options, window_int)
from actsparse.errors import ConfigError

ORDER_HINT = (0.5, 0.3, 0.7, 0.4, 0.6)  # most informative targets first, so a partial run is useful


def register(sub) -> None:
    p = sub.add_parser(
        "sweep", help="perplexity of several methods at several sparsities (JSON + plot)",
        description="Calibrates every method once on the calibration split, then evaluates dense and each "
                    "method x sparsity on the test split (non-overlapping windows). Each point's perplexity ratio "
                    "carries a 95% paired bootstrap interval over the test windows (methods closer than it are "
                    "not ranked). Writes the JSON atomically after every point (resumable with --resume) and a "
                    "quality-vs-bytes-skipped plot.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    p.add_argument("--methods", default="teal,cats,chess,topk,wina",
                   help="comma-separated: teal, teal-greedy (TEAL with the block-wise greedy allocation), cats, "
                        "chess, chess-selective, topk, wina")
    p.add_argument("--sparsity", default="0.3,0.4,0.5,0.6,0.7", help="comma-separated targets")
    add_text_options(p)
    p.add_argument("--calib-tokens", type=positive_int, default=16384, help="calibration-split tokens")
    p.add_argument("--calib-window", type=window_int, default=1024)
    p.add_argument("--tokens", type=positive_int, default=16 * 1024, help="test-split tokens")
    p.add_argument("--window", type=window_int, default=1024)
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default {DEFAULT_OUT}/quality-<model>.json; the committed results are "
                        "regenerated only with an explicit --out benchmarks/results/...)")
    p.add_argument("--plot", type=Path, default=None, help="plot path (default: the JSON path with .png)")
    p.add_argument("--resume", action="store_true",
                   help="keep finished points of an existing JSON (refused if it was made with another model, "
                        "dtype, data or protocol)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def model_slug(name: str) -> str:
    return Path(name).name.replace("/", "-").lower()


def output_paths(args) -> tuple[Path, Path]:
    """The JSON (--out, default under actsparse-out/) and the plot (--plot, default beside it)."""
    out = args.out or DEFAULT_OUT / f"quality-{model_slug(args.model)}.json"
    return out, args.plot or out.with_suffix(".png")


# what must agree between an existing sweep file and this run for --resume (identity.* is added per key)
RESUME_FIELDS = ("format", "dtype", "protocol.data", "protocol.text_options",
                 "protocol.calibration.split", "protocol.calibration.tokens", "protocol.calibration.window",
                 "protocol.calibration.sampling", "protocol.evaluation.split", "protocol.evaluation.tokens_requested",
                 "protocol.evaluation.window", "protocol.evaluation.stride", "protocol.evaluation.windows",
                 "protocol.evaluation.mode", "protocol.evaluation.sampling")


def identity_fields(saved: dict, now: dict) -> list[str]:
    keys = set(saved.get("identity") or {}) | set(now.get("identity") or {})
    return [f"identity.{k}" for k in sorted(keys)]


def check_resumable(saved: dict, header: dict, path) -> None:
    """Refuse to add points to a sweep file made with another model, dtype, data, protocol or
    method configuration (a finished point's config must be what this version makes for it),
    naming every field that differs."""
    from actsparse.sparsify.registry import make_config

    diffs = differing_fields(saved, header, identity_fields(saved, header) + list(RESUME_FIELDS))
    for r in saved.get("results") or []:
        try:
            config = make_config(r.get("method"), r.get("target")).to_dict()
        except ConfigError as err:
            config = f"invalid ({err})"
        if r.get("config") != config:
            diffs.append(f"results[{r.get('method')} @ {r.get('target')}].config: file {r.get('config')!r}, "
                         f"now {config!r}")
    if diffs:
        raise ConfigError(f"--resume: {path} was made with other settings, so its points cannot be mixed with this "
                          f"run's ({'; '.join(diffs)}). Use another --out, or drop --resume to start it again")


def run(args) -> int:
    from actsparse.data.text import text, token_windows
    from actsparse.eval.perplexity import bootstrap_ratio, perplexity
    from actsparse.io import write_json
    from actsparse.models.loading import check_window, weights_identity
    from actsparse.provenance import environment, git_hash
    from actsparse.report.quality_report import plot_quality
    from actsparse.sparsify.api import calibrate, desparsify_, sparsify_
    from actsparse.sparsify.modules import bytes_skipped
    from actsparse.sparsify.registry import check_sparsity, make_config

    setup(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    targets = [check_sparsity(s) for s in args.sparsity.split(",") if s.strip()]
    if not methods or not targets:
        raise ConfigError("--methods and --sparsity must each name at least one value")
    for m in methods:
        make_config(m, 0.5)  # validates the name
    out, plot = output_paths(args)
    check_output(out, "--out")
    check_output(plot, "--plot")
    saved = read_result(out, "--out") if args.resume and out.is_file() else None
    model, tok = load_causal_lm(args, "`actsparse sweep`")
    check_window(model, args.calib_window, option="--calib-window")
    check_window(model, args.window)
    reading = text_options(args)
    cal = token_windows(tok, text(args.data, "calibration", **reading), window=args.calib_window,
                        max_tokens=args.calib_tokens, sampling=args.sampling)
    test = token_windows(tok, text(args.data, "test", **reading), window=args.window, max_tokens=args.tokens,
                         sampling=args.sampling)
    header = {"format": "actsparse.quality/1", "model": args.model, "identity": weights_identity(model),
              "dtype": args.dtype,
              "protocol": {"data": args.data, "text_options": reading,
                           "calibration": {"split": "calibration", "tokens": cal.tokens, "window": args.calib_window,
                                           "sampling": cal.sampling, "windows_available": cal.available},
                           "evaluation": {"split": "test", "tokens_requested": args.tokens, "window": args.window,
                                          "stride": args.window, "windows": len(test),
                                          "mode": "non-overlapping, BOS at each window start",
                                          "sampling": test.sampling, "windows_available": test.available}}}
    if saved is not None:
        check_resumable(saved, header, out)
        doc = saved
    else:
        doc = {**header, "git": git_hash(), "environment": environment(), "dense": None, "results": []}
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
            ci = bootstrap_ratio(r, doc["dense"])
            doc["results"].append({"method": m, "target": s, "config": config.to_dict(), "ppl": r.ppl,
                                   "ratio": r.ppl / dense_ppl, "ratio_ci95": list(ci),
                                   "reached_sparsity": r.reached_sparsity,
                                   "bytes_skipped": r.bytes_skipped, "nominal_bytes_skipped": nominal,
                                   "seconds": r.seconds, "window_nll": r.window_nll,
                                   "window_tokens": r.window_tokens})
            doc["ranking"] = _ranking(doc["results"])
            write_json(out, doc)
            print(f"{m} @ {s:.2f}: PPL {r.ppl:.3f} (x{r.ppl / dense_ppl:.3f}, 95% [{ci[0]:.3f}, {ci[1]:.3f}]), "
                  f"bytes skipped {r.bytes_skipped:.3f}, reached {r.reached_sparsity}", flush=True)
            try:
                plot_quality(doc, plot)
            except Exception as err:  # a plot must never lose a measurement
                print(f"plot failed: {err}")
    plot_quality(doc, plot)
    print(f"wrote {out} and {plot}")
    return 0


def _ranking(results: list[dict]) -> dict:
    """Per target: the best method and those within the noise of it (paired bootstrap)."""
    from actsparse.eval.perplexity import rank_within_noise

    targets = sorted({r["target"] for r in results})
    return {f"{t:g}": rank_within_noise([r for r in results if r["target"] == t and r.get("window_nll")])
            for t in targets}
