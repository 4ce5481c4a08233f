"""`actsparse demo`: the main job on the embedded default model and text."""
from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.commands.common import apply_threads


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job on the embedded defaults: profile, sparsify, quality and decode speed vs dense",
        description="Runs the main job end to end on the embedded defaults (no internet needed): loads "
                    "SmolLM2-135M-Instruct (converted once from its GGUF file into the cache), profiles its "
                    "activations on the calibration split of the embedded Wikipedia articles, calibrates TEAL, CATS, "
                    "CHESS, Top-K and WINA there and evaluates them on the test split, times bf16 batch-1 decoding "
                    "dense vs the TEAL and CATS plans, and writes OUT/report.md and OUT/report.html with plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory")
    p.add_argument("--model", default="smollm2-135m", help="model to run the demo on")
    p.add_argument("--tokens", type=int, default=4096, help="tokens to profile")
    p.add_argument("--quality-tokens", type=int, default=2048,
                   help="tokens for the quality part: calibration split for thresholds, test split for perplexity "
                        "(0 skips it)")
    p.add_argument("--quality-methods", default="teal,cats,chess,topk,wina", help="methods evaluated at --quality-sparsity")
    p.add_argument("--quality-sparsity", type=float, default=0.5, help="target sparsity of the quality part")
    p.add_argument("--decode-tokens", type=int, default=32,
                   help="tokens per run of the decode-speed comparison (bf16, dense vs the TEAL and CATS plans "
                        "of the quality part; 0 skips it)")
    p.add_argument("--decode-threads", type=int, default=1,
                   help="threads of the decode-speed comparison (1: the most robust on a busy machine; two "
                        "threads pay a wake-up per parallel GEMV)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import actsparse as asp
    from actsparse.io import read_json
    from actsparse.report.document import Report
    from actsparse.report.profile_report import add_profile_section

    apply_threads(args)
    out: Path = args.out
    model, tok = asp.load(args.model)
    prof = asp.profile(model, tok, "wiki", split="calibration", tokens=args.tokens, window=512, batch_size=4,
                       progress=not args.no_progress, model_name=args.model)
    prof.save(out / "profile")
    report = Report(f"actsparse demo: {args.model}")
    add_profile_section(report, read_json(out / "profile" / "profile.json"), out)
    if args.quality_tokens:
        stats = _quality(args, model, tok, report, out)
        if args.decode_tokens:
            _decode_speed(args, stats, report, out)
    md, html = report.write(out)
    print(f"wrote {md} and {html}")
    return 0


def _quality(args, model, tok, report, out: Path) -> None:
    """Calibrate each method on the calibration split, evaluate on the test split, add a section."""
    from actsparse.commands.sweep import model_slug
    from actsparse.data.text import text, token_windows
    from actsparse.eval.perplexity import perplexity
    from actsparse.io import read_json, write_json
    from actsparse.report.quality_report import add_quality_section
    from actsparse.sparsify.api import calibrate, desparsify_, sparsify_, thresholds_table
    from actsparse.sparsify.registry import make_config

    methods = [m.strip() for m in args.quality_methods.split(",") if m.strip()]
    s = args.quality_sparsity
    window = 512
    cal = token_windows(tok, text("wiki", "calibration"), window=window, max_tokens=args.quality_tokens)
    test = token_windows(tok, text("wiki", "test"), window=window, max_tokens=args.quality_tokens)
    stats = calibrate(model, [make_config(m, s) for m in methods], cal, progress=not args.no_progress)
    dense = perplexity(model, test)
    doc = {"model": args.model, "dtype": "float32",
           "protocol": {"data": "wiki", "calibration": {"split": "calibration", "tokens": cal.tokens, "window": window},
                        "evaluation": {"split": "test", "window": window, "windows": len(test), "stride": window}},
           "dense": dense.to_dict(), "results": []}
    thresholds = {}
    for m in methods:
        sparsify_(model, make_config(m, s), stats=stats)
        try:
            r = perplexity(model, test)
            thresholds[m] = thresholds_table(model)
        finally:
            desparsify_(model)
        doc["results"].append({"method": m, "target": s, "ppl": r.ppl, "ratio": r.ppl / dense.ppl,
                               "reached_sparsity": r.reached_sparsity, "bytes_skipped": r.bytes_skipped})
        print(f"{m} @ {s}: PPL {r.ppl:.2f} (dense {dense.ppl:.2f})", flush=True)
    write_json(out / "quality.json", doc)
    add_quality_section(report, doc, out, title=f"Quality at {s:.0%} target sparsity (demo budget)",
                        thresholds=thresholds)
    sweep = Path("benchmarks/results") / f"quality-{model_slug(args.model)}.json"
    if sweep.is_file():
        add_quality_section(report, read_json(sweep), out, plot_dir="plots/sweep",
                            title=f"Quality vs sparsity (saved sweep {sweep})")
    return stats


def _decode_speed(args, stats, report, out: Path) -> None:
    """bf16 FastDecoder tokens/s: dense vs TEAL and CATS at the quality sparsity (thresholds
    from the fp32 calibration statistics of the quality part)."""
    import actsparse as asp
    from actsparse.bench.decode import measure_plans
    from actsparse.io import write_json
    from actsparse.report.decode_report import add_decode_section
    from actsparse.sparsify.api import sparsify_
    from actsparse.sparsify.registry import make_config

    s = args.quality_sparsity
    methods = [m for m in ("teal", "cats") if m in args.quality_methods.split(",")]
    plans = {f"{m} {s:.0%}": (lambda model, cfg=make_config(m, s): sparsify_(model, cfg, stats=stats))
             for m in methods}
    import torch

    model16, tok = asp.load(args.model, dtype="bfloat16")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.decode_threads))
    try:
        doc = measure_plans(model16, tok, plans, new_tokens=args.decode_tokens)
    finally:
        torch.set_num_threads(threads)
    write_json(out / "decode.json", doc)
    add_decode_section(report, doc)
    for r in doc["rows"]:
        print(f"decode {r['engine']}: {r['tokens_per_s']:.1f} tokens/s ({r['speedup']:.2f}x)", flush=True)
