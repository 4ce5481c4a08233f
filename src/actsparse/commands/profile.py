"""`actsparse profile`: capture activation statistics of a model on text, write JSON and a report."""
from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.commands.common import (add_data_options, add_model_options, check_output, check_sites, setup,
                                       text_options)


def register(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="measure activation sparsity of a model on text",
        description="Run a model over text and capture, at every site, streaming statistics: exact-zero and "
                    "threshold sparsity, dead and dormant neurons, temporal (delta) sparsity, activation flow, "
                    "ReLU balance and |v| histograms. Writes OUT/profile.json, OUT/stats.safetensors (per-neuron "
                    "arrays) and OUT/report.md + OUT/report.html with plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_options(p)
    add_data_options(p)
    p.add_argument("--sites", default="default",
                   help="comma-separated sites: roles (mlp.act, mlp.down:input, attn.q:input, attn.o:input, "
                        "mlp.gate:input, mlp.gate:output), groups (default = mlp.act + every linear input; mlp; "
                        "linear_inputs; act) or module paths with :input/:output")
    p.add_argument("--flow-eps", type=float, default=0.1,
                   help="a neuron counts as active for activation flow when |v| > this (0 for ReLU models)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import actsparse as asp

    setup(args)
    check_output(args.out, "--out", directory=True)
    model, tok = asp.load(args.model, dtype=args.dtype)
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    check_sites(model, sites)
    prof = asp.profile(model, tok, args.data, split=args.split, tokens=args.tokens, window=args.window,
                       batch_size=args.batch_size, sites=sites, flow_threshold=args.flow_eps,
                       progress=not args.no_progress, model_name=args.model, sampling=args.sampling,
                       **text_options(args))
    prof.save(args.out)
    md, html = render_report(args.out)
    print(f"profiled {prof.meta['data']['tokens']} tokens in {prof.meta['seconds']:.1f} s; "
          f"wrote {args.out / 'profile.json'}, {md}, {html}")
    return 0


def render_report(out: Path) -> tuple[Path, Path]:
    """Render OUT/report.md and .html from the profile just saved there. If rendering fails,
    the previous report (which no longer matches profile.json) is removed and the error says
    that the profile itself is safe."""
    from actsparse.errors import DataError
    from actsparse.report.document import remove_report
    from actsparse.report.profile_report import write_profile_report

    try:
        return write_profile_report(out)
    except Exception as err:
        removed = remove_report(out)
        stale = f"; the earlier report ({', '.join(p.name for p in removed)}) was removed" if removed else ""
        raise DataError(
            f"the profile was saved to {out / 'profile.json'} and {out / 'stats.safetensors'}, but rendering its "
            f"report failed ({type(err).__name__}: {err}){stale}. Once the cause is fixed, render it with "
            f"actsparse.report.profile_report.write_profile_report({str(out)!r})") from err
