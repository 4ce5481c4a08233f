"""`actsparse sweep`: quality vs sparsity of several methods, written as JSON plus a plot."""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from actsparse.commands.common import (DEFAULT_OUT, add_model_options, add_protocol_option, add_ray_option, add_text_options,
                                       check_output, differing_fields, positive_int, read_result, setup,
                                       text_options, window_int)
from actsparse.errors import ConfigError, StateError

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
                   help="comma-separated: teal, teal-greedy (TEAL with the block-wise greedy allocation, block-output "
                        "error), teal-greedy-linear (the greedy on the block's linear outputs), "
                        "teal-bias / teal-centre / teal-centre-bias (TEAL with compensation: the dropped inputs' "
                        "expected product as a bias, median-centred inputs), rsparse (R-Sparse: TEAL plus a low-rank estimate of the "
                        "dropped inputs; its sparsity is the bytes-skipped budget, factors counted), cats, chess, "
                        "chess-selective, topk, wina")
    p.add_argument("--sparsity", default="0.3,0.4,0.5,0.6,0.7", help="comma-separated targets")
    add_text_options(p)
    add_protocol_option(p)
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
    add_ray_option(p, "every method x sparsity point (and the dense run) is a Ray task")
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
                 "protocol.evaluation.mode", "protocol.evaluation.sampling", "protocol.evaluation.sparse_protocol")


def identity_fields(saved: dict, now: dict) -> list[str]:
    keys = set(saved.get("identity") or {}) | set(now.get("identity") or {})
    return [f"identity.{k}" for k in sorted(keys)]


def check_resumable(saved: dict, header: dict, path) -> None:
    """Refuse to add points to a sweep file made with another model, dtype, data, protocol or
    method configuration (a finished point's config must be what this version makes for it),
    naming every field that differs."""
    from actsparse.sparsify.registry import make_config

    saved = copy.deepcopy(saved)  # files from before the decode protocol evaluated every token sparse
    saved.get("protocol", {}).get("evaluation", {}).setdefault("sparse_protocol", "all")
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


def run(args, *, cell_fn=None) -> int:
    """``cell_fn``: with --ray, the function a worker runs per cell (tests pass one that kills
    its worker); None is the real one."""
    from actsparse.eval.cells import Workload, cell_name, sweep_entry
    from actsparse.eval.perplexity import PerplexityResult
    from actsparse.experiments.executors import CellsFailed, executor
    from actsparse.io import write_json
    from actsparse.provenance import environment, git_hash
    from actsparse.report.quality_report import plot_quality
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
    reading = text_options(args)
    workload = Workload(model=args.model, dtype=args.dtype, data=args.data, text_options=reading,
                        sampling=args.sampling, calib_tokens=args.calib_tokens, calib_window=args.calib_window,
                        tokens=args.tokens, window=args.window, split="test", methods=tuple(methods),
                        sparse_protocol=args.protocol, threads=args.threads, what="`actsparse sweep`",
                        progress=not args.no_progress and args.ray is None)
    order = sorted(targets, key=lambda s: (ORDER_HINT.index(s) if s in ORDER_HINT else 99, s))
    grid = [(m, s) for s in order for m in methods]
    with executor(workload, args.ray, cell_fn=cell_fn) as ex:
        info = {}
        ex.map([{"kind": "describe"}], lambda cell, res: info.update(res["result"]))
        header = sweep_header(args, reading, info)
        if saved is not None:
            check_resumable(saved, header, out)
            doc = saved
        else:
            doc = {**header, "git": git_hash(), "environment": environment(), "dense": None, "results": []}
        doc.setdefault("environment", {})["executor"] = ex.record  # how this run ran; not part of the identity
        doc["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        done = {(r["method"], r["target"]) for r in doc["results"]}
        kept = list(doc["results"])  # earlier runs' points stay first, in their order
        cells = ([{"kind": "dense"}] if doc["dense"] is None else [])
        cells += [{"kind": "sparse", "method": m, "target": s} for m, s in grid if (m, s) not in done]
        unfinished = {cell_name(c) for c in cells}
        waiting, entries = {}, {}  # points that wait for the dense run; finished entries

        def on_result(cell, res):
            if res["calibration_seconds"] is not None:
                doc["protocol"]["calibration"]["seconds"] = res["calibration_seconds"]
            if cell["kind"] == "dense":
                doc["dense"] = res["result"]
                doc["protocol"]["evaluation"]["scored_tokens"] = res["result"]["tokens"]
                print(f"dense: {PerplexityResult(**res['result'])}", flush=True)
            else:
                waiting[(cell["method"], cell["target"])] = res["result"]
            unfinished.discard(cell_name(cell))
            if doc["dense"] is None:
                return  # a point is written with its ratio to dense, so after the dense run
            dense_ppl = doc["dense"]["ppl"]
            for (m, s), point in sorted(waiting.items(), key=lambda kv: grid.index(kv[0])):
                e = entries[(m, s)] = sweep_entry(point, doc["dense"])
                lo, hi = e["ratio_ci95"]
                print(f"{m} @ {s:.2f}: PPL {e['ppl']:.3f} (x{e['ppl'] / dense_ppl:.3f}, 95% [{lo:.3f}, {hi:.3f}]), "
                      f"bytes skipped {e['bytes_skipped']:.3f}, reached {e['reached_sparsity']}", flush=True)
            waiting.clear()
            doc["results"] = kept + [entries[k] for k in grid if k in entries]
            if entries:
                doc["ranking"] = _ranking(doc["results"])
            # a file of an unfinished run says so: the points it still lacks (gone once complete)
            doc.pop("unfinished", None)
            if unfinished:
                doc["unfinished"] = [cell_name(c) for c in cells if cell_name(c) in unfinished]
            write_json(out, doc)
            if entries:
                try:
                    plot_quality(doc, plot)
                except Exception as err:  # a plot must never lose a measurement
                    print(f"plot failed: {err}")

        try:
            ex.map(cells, on_result)
        except CellsFailed as err:
            kept_note = (f"{out} holds only the finished points (its 'unfinished' list names the rest)"
                         if "unfinished" in doc else f"nothing was written to {out}")
            raise StateError(f"{err}. {kept_note}; run the same command with --resume to compute what is "
                             "missing") from None
    plot_quality(doc, plot)
    print(f"wrote {out} and {plot}")
    return 0


def sweep_header(args, reading: dict, info: dict) -> dict:
    """What identifies a sweep file (its model, dtype, data and protocol); ``info`` is the
    ``describe`` cell's answer (the weights' identity and the windows actually cut)."""
    cal, ev = info["calibration"], info["evaluation"]
    return {"format": "actsparse.quality/1", "model": args.model, "identity": info["identity"], "dtype": args.dtype,
            "protocol": {"data": args.data, "text_options": reading,
                         "calibration": {"split": "calibration", "tokens": cal["tokens"], "window": args.calib_window,
                                         "sampling": cal["sampling"], "windows_available": cal["windows_available"]},
                         "evaluation": {"split": "test", "tokens_requested": args.tokens, "window": args.window,
                                        "stride": args.window, "windows": ev["windows"],
                                        "mode": "non-overlapping, BOS at each window start",
                                        "sampling": ev["sampling"], "windows_available": ev["windows_available"],
                                        "sparse_protocol": args.protocol}}}


def _ranking(results: list[dict]) -> dict:
    """Per target: the best method and those within the noise of it (paired bootstrap)."""
    from actsparse.eval.perplexity import rank_within_noise

    targets = sorted({r["target"] for r in results})
    return {f"{t:g}": rank_within_noise([r for r in results if r["target"] == t and r.get("window_nll")])
            for t in targets}
