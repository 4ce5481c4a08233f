"""`actsparse demo`: the main job on the embedded default model and text."""
from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.commands.common import apply_threads


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="profile the embedded default model (SmolLM2-135M) on the embedded Wikipedia text",
        description="Runs the main job end to end on the embedded defaults (no internet needed): loads "
                    "SmolLM2-135M-Instruct (converted once from its GGUF file into the cache), profiles its "
                    "activations on the calibration split of the embedded Wikipedia articles, and writes "
                    "OUT/report.md and OUT/report.html with plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory")
    p.add_argument("--model", default="smollm2-135m", help="model to run the demo on")
    p.add_argument("--tokens", type=int, default=4096, help="tokens to profile")
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
    md, html = report.write(out)
    print(f"wrote {md} and {html}")
    return 0
