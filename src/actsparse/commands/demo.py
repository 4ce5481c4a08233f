"""`actsparse demo`: the main job on the embedded default model and text."""
from __future__ import annotations

import argparse
import gc
import resource
import time
from pathlib import Path

from actsparse.commands.common import check_output, positive_int, setup

# the methods whose plans the demo evaluates and times, at one target sparsity
DEMO_METHODS = "teal,cats,chess,topk,wina"
WINDOW = 512
# one window per forward: with 4 the short-lived per-batch tensors (activations, their codes, the
# B x T x vocab logits) made the allocator's heap grow to 7.4 GB over the demo; with 1 it peaks
# at about 1.7 GB, and it is no slower on 2 cores
BATCH = 1


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job on the embedded defaults: profile, sparsify, quality and decode speed vs dense",
        description="Runs the main job end to end on the embedded defaults (no internet needed): loads "
                    "SmolLM2-135M-Instruct (converted once from its GGUF file into the cache), profiles its "
                    "activations on the calibration split of the embedded Wikipedia articles, calibrates TEAL, CATS, "
                    "CHESS, Top-K and WINA there and evaluates them on the test split, times bf16 batch-1 decoding "
                    "dense vs each plan, and writes OUT/report.md and OUT/report.html with plots (among them "
                    "perplexity against measured decode speed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory")
    p.add_argument("--model", default="smollm2-135m", help="model to run the demo on")
    p.add_argument("--tokens", type=int, default=4096, help="tokens to profile")
    p.add_argument("--quality-tokens", type=int, default=2048,
                   help="tokens for the quality part: calibration split for thresholds, test split for perplexity "
                        "(0 skips it)")
    p.add_argument("--quality-methods", default=DEMO_METHODS, help="methods evaluated at --quality-sparsity")
    p.add_argument("--quality-sparsity", type=float, default=0.5, help="target sparsity of the quality part")
    p.add_argument("--decode-tokens", type=int, default=32,
                   help="tokens per run of the decode-speed comparison (bf16, dense vs the plans of the quality "
                        "part; 0 skips it)")
    p.add_argument("--decode-repeats", type=positive_int, default=7,
                   help="timed rounds of the decode comparison (each runs every engine once, in a random order, "
                        "after one untimed warm-up run per engine)")
    p.add_argument("--decode-threads", type=int, default=1,
                   help="threads of the decode-speed comparison (1: the most robust on a busy machine; two "
                        "threads pay a wake-up per parallel GEMV)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


class Phases:
    """Per phase of the demo: its wall time, the peak resident memory of the process so far
    (Linux reports ``ru_maxrss`` in KiB) and the resident memory at its end."""

    def __init__(self):
        self.phases: list[dict] = []
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.phases.append({"phase": phase, "seconds": now - self._last, "peak_rss_mb": peak,
                            "rss_mb": _current_rss_mb()})
        self._last = now


def _current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return None


def run(args) -> int:
    import actsparse as asp
    from actsparse.io import read_json, write_json
    from actsparse.report.decode_report import add_frontier_section
    from actsparse.report.document import Report, remove_report
    from actsparse.report.profile_report import add_profile_section
    from actsparse.sparsify.registry import make_config

    setup(args)
    out: Path = check_output(args.out, "--out", directory=True)
    methods = [m.strip() for m in args.quality_methods.split(",") if m.strip()]
    configs = {m: make_config(m, args.quality_sparsity) for m in methods}  # validates every name first
    remove_report(out)  # a run that fails part-way must not leave an old report beside new results
    phases = Phases()
    model, tok = asp.load(args.model)
    phases.mark("load fp32 model")
    prof = asp.profile(model, tok, "wiki", split="calibration", tokens=args.tokens, window=WINDOW, batch_size=BATCH,
                       progress=not args.no_progress, model_name=args.model)
    prof.save(out / "profile")
    del prof
    report = Report(f"actsparse demo: {args.model}")
    add_profile_section(report, read_json(out / "profile" / "profile.json"), out)
    phases.mark("profile and its plots")
    if args.quality_tokens:
        quality, stats = _quality(args, configs, model, tok, report, out, phases)
        if args.decode_tokens:
            del model  # the decode part loads the bf16 model; the fp32 one is not needed any more
            gc.collect()
            decode = _decode_speed(args, stats, report, out, phases)
            add_frontier_section(report, quality, decode, out)
    write_json(out / "phases.json", {"phases": phases.phases})
    _phases_section(report, phases)
    md, html = report.write(out)
    total = sum(p["seconds"] for p in phases.phases)
    print(f"wrote {md} and {html}; {total:.0f} s, peak memory {phases.phases[-1]['peak_rss_mb'] / 1024:.2f} GB")
    return 0


def _quality(args, configs: dict, model, tok, report, out: Path, phases: Phases) -> tuple[dict, dict]:
    """Per method: calibrate on the calibration split, evaluate on the test split (one method's
    statistics at a time). Adds the section; returns the JSON and each method's statistics."""
    from actsparse.data.text import text, token_windows
    from actsparse.eval.perplexity import perplexity
    from actsparse.io import write_json
    from actsparse.report.quality_report import add_quality_section
    from actsparse.sparsify.api import calibrate, desparsify_, sparsify_, thresholds_table

    s = args.quality_sparsity
    progress = not args.no_progress
    cal = token_windows(tok, text("wiki", "calibration"), window=WINDOW, max_tokens=args.quality_tokens)
    test = token_windows(tok, text("wiki", "test"), window=WINDOW, max_tokens=args.quality_tokens)
    dense = perplexity(model, test, progress=progress, desc="perplexity, dense")
    phases.mark("dense perplexity")
    doc = {"model": args.model, "dtype": "float32",
           "protocol": {"data": "wiki", "calibration": {"split": "calibration", "tokens": cal.tokens, "window": WINDOW},
                        "evaluation": {"split": "test", "window": WINDOW, "windows": len(test), "stride": WINDOW}},
           "dense": dense.to_dict(), "results": []}
    doc["thresholds"], stats = {}, {}
    for m, config in configs.items():
        stats[m] = calibrate(model, [config], cal, batch_size=BATCH, progress=progress)
        sparsify_(model, config, stats=stats[m])
        try:
            r = perplexity(model, test, progress=progress, desc=f"perplexity, {m}")
            doc["thresholds"][m] = thresholds_table(model)
        finally:
            desparsify_(model)
        doc["results"].append({"method": m, "target": s, "ppl": r.ppl, "ratio": r.ppl / dense.ppl,
                               "reached_sparsity": r.reached_sparsity, "bytes_skipped": r.bytes_skipped})
        phases.mark(f"{m}: calibrate + perplexity")
        print(f"{m} @ {s}: PPL {r.ppl:.2f} (dense {dense.ppl:.2f})", flush=True)
    write_json(out / "quality.json", doc)
    add_quality_section(report, doc, out, title=f"Quality at {s:.0%} target sparsity (demo budget)",
                        thresholds=doc["thresholds"], plot=False)
    report.text("This is one sparsity on a small budget. The quality over 30-70% sparsity on 4,096 test tokens, "
                "with PPL-1% sparsity, is in the README's section \"Training-free sparsification\" (its committed "
                "figures: `benchmarks/results/quality-smollm2-135m.json` and `.png`).")
    return doc, stats


def _decode_speed(args, stats: dict, report, out: Path, phases: Phases) -> dict:
    """bf16 FastDecoder tokens/s: dense vs every plan of the quality part (thresholds from
    its fp32 calibration statistics)."""
    import torch

    import actsparse as asp
    from actsparse.bench.decode import measure_plans
    from actsparse.io import write_json
    from actsparse.report.decode_report import add_decode_section
    from actsparse.sparsify.api import sparsify_
    from actsparse.sparsify.registry import make_config

    s = args.quality_sparsity
    plans = {f"{m} {s:.0%}": (lambda model, cfg=make_config(m, s), st=st: sparsify_(model, cfg, stats=st))
             for m, st in stats.items()}
    model16, tok = asp.load(args.model, dtype="bfloat16")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.decode_threads))
    try:
        doc = measure_plans(model16, tok, plans, new_tokens=args.decode_tokens, repeats=args.decode_repeats,
                            progress=not args.no_progress)
    finally:
        torch.set_num_threads(threads)
    phases.mark("decode timing (bf16 model, one decoder per plan)")
    write_json(out / "decode.json", doc)
    add_decode_section(report, doc)
    for r in doc["rows"]:
        t, sp = r["tokens_per_s"], r["speedup"]
        flag = f" ABOVE its Amdahl ceiling {r['amdahl_ceiling']:.2f}x" if r["above_ceiling"] else ""
        print(f"decode {r['engine']}: {t['median']:.1f} tokens/s ({sp['median']:.2f}x, "
              f"{sp['p10']:.2f}-{sp['p90']:.2f}){flag}", flush=True)
    return doc


def _phases_section(report, phases: Phases) -> None:
    report.heading("Time and memory")
    report.text("Wall time of each phase, and the peak resident memory of the demo process up to its end (the "
                "peak never falls; 'resident' is what the process held at that point, including memory freed but "
                "kept by the allocator).")
    report.table(["phase", "seconds", "peak RSS so far (GB)", "resident (GB)"],
                 [[p["phase"], f"{p['seconds']:.1f}", f"{p['peak_rss_mb'] / 1024:.2f}",
                   "-" if p["rss_mb"] is None else f"{p['rss_mb'] / 1024:.2f}"] for p in phases.phases])
