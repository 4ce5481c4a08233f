"""Read-ME-style dense-to-MoE on SmolLM2-135M: held-out perplexity of the expert MLPs against CATS.

One calibration pass (co-activation counts + router rows) serves every configuration; per
E in --experts the neurons are clustered once and the routers fitted once (they score every
expert, so one router serves every top-k); per top-k fraction the model gets its expert MLPs
and is evaluated on the wiki test split. CATS (MLP only, its registered method) is evaluated
at the same fraction of neurons (sparsity 1 - f) and, where one exists, at the same fraction
of MLP weights read (CATS reads all of gate and (1 - s) of up and down: s = 1.5 (1 - f)).
With --oracle the same experts are also evaluated with oracle routing (each token's top-k
experts by true |h| mass): what a perfect router would give. Writes JSON after every point
(default actsparse-out/moefy.json; benchmarks/results/ only with an explicit --out) and
prints the Markdown table (``--table FILE`` prints it from an existing JSON).

    .venv/bin/python benchmarks/moefy_smollm2.py --out benchmarks/results/moefy.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

FRACTIONS = (0.25, 0.5, 0.75)


def cats_sparsities(fractions) -> dict[float, list[str]]:
    """CATS sparsity -> why it is evaluated ("neurons f", "weights f")."""
    out: dict[float, list[str]] = {}
    for f in fractions:
        out.setdefault(round(1 - f, 6), []).append(f"neurons {f:g}")
        s = round(1.5 * (1 - f), 6)
        if 0 <= s < 1:
            out.setdefault(s, []).append(f"weights {f:g}")
    return dict(sorted(out.items()))


def table(doc: dict) -> str:
    dense = doc["dense"]["ppl"]
    rows = ["| configuration | neurons computed | MLP weights read | PPL | x dense [95% CI] | router recall | "
            "oracle-expert mass covered |", "|---|---:|---:|---:|---|---:|---:|"]
    for p in doc["points"]:
        rec = p.get("recall")
        rows.append(f"| {p['name']} | {p['neuron_fraction']:.2f} | {p['mlp_weight_fraction']:.3f} | {p['ppl']:.2f} | "
                    f"{p['ratio']:.3f} [{p['ratio_ci'][0]:.3f}-{p['ratio_ci'][1]:.3f}] | "
                    f"{'' if rec is None else f'{rec:.3f}'} | "
                    f"{'' if rec is None else format(p['mass_recall'], '.3f')} |")
    return f"Dense PPL {dense:.2f} ({doc['protocol']['test']}).\n\n" + "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--experts", default="8,16,32", help="numbers of experts per layer")
    ap.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS),
                    help="top-k as a fraction of the experts (of the neurons computed)")
    ap.add_argument("--calib-tokens", type=int, default=8192, help="calibration-split tokens (co-activation)")
    ap.add_argument("--router-rows", type=int, default=4096, help="calibration tokens that fit the routers")
    ap.add_argument("--validation-tokens", type=int, default=2048, help="validation tokens for router recall")
    ap.add_argument("--tokens", type=int, default=9216, help="test-split tokens for perplexity")
    ap.add_argument("--window", type=int, default=1024, help="perplexity window (non-overlapping, spread)")
    ap.add_argument("--rate", type=float, default=0.25, help="co-activation: active = the token's top RATE of |h|")
    ap.add_argument("--oracle", default="", help="numbers of experts (e.g. 16) whose points are also evaluated with "
                                                 "oracle routing on the same experts")
    ap.add_argument("--no-cats", action="store_true", help="skip the CATS points")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("actsparse-out/moefy.json"),
                    help="JSON path (default: actsparse-out/moefy.json; benchmarks/results/ only explicitly)")
    ap.add_argument("--table", type=Path, default=None, help="print the table of this JSON and exit")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from actsparse.io import read_json, write_json

    if args.table:
        print(table(read_json(args.table)))
        return 0

    import torch

    import actsparse as asp
    from actsparse.commands.common import check_output
    from actsparse.data.text import text, token_windows
    from actsparse.eval.perplexity import bootstrap_ratio, perplexity
    from actsparse.moe import api
    from actsparse.moe.plan import apply_moe_, remove_moe_
    from actsparse.provenance import environment
    from actsparse.sparsify.api import calibrate, desparsify_, sparsify_

    check_output(args.out, "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    experts = [int(e) for e in args.experts.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    oracle_fraction = 0.5  # oracle routing at this fraction only (each point is one more evaluation)
    t0 = time.perf_counter()
    model, tok = asp.load("smollm2-135m")
    cal = token_windows(tok, text("wiki", "calibration"), window=512, max_tokens=args.calib_tokens)
    val = token_windows(tok, text("wiki", "validation"), window=512, max_tokens=args.validation_tokens)
    test = token_windows(tok, text("wiki", "test"), window=args.window, max_tokens=args.tokens)

    def ppl(desc):
        return perplexity(model, test, progress=progress, desc=desc)

    dense = ppl("dense")
    doc = {"model": "smollm2-135m", "dtype": "float32", "environment": environment(),
           "protocol": {"calibration": cal.protocol, "validation": val.protocol, "test": dense.protocol,
                        "router_rows": args.router_rows, "coactivation_rate": args.rate},
           "dense": dense.to_dict(), "points": []}

    def add(name, kind, res, **extra):
        lo, hi = bootstrap_ratio(res, dense)
        point = {"name": name, "kind": kind, "ppl": res.ppl, "ratio": res.ppl / dense.ppl, "ratio_ci": [lo, hi],
                 **extra, "window_nll": res.window_nll}
        doc["points"].append(point)
        doc["seconds"] = time.perf_counter() - t0
        write_json(args.out, doc)
        print(f"{name}: PPL {res.ppl:.3f} (x{point['ratio']:.3f} [{lo:.3f}-{hi:.3f}])", flush=True)

    samples = api.collect(model, cal, rows=args.router_rows, rate=args.rate, progress=progress)
    held = api.collect(model, val, rows=args.validation_tokens, rate=None, progress=progress)
    for e in experts:
        perms = api.cluster(samples, e, progress=progress)
        routers = api.train_routers(samples, perms, e, progress=progress)
        for f in fractions:
            k = max(1, round(f * e))
            plan = api.build(model, samples, e, k, perms=perms, routers=routers)
            r = api.router_recall(plan, held)
            apply_moe_(model, plan)
            mlp = next(m for m in model.modules() if type(m).__name__ == "ExpertMLP")
            info = {"experts": e, "top_k": k, "neuron_fraction": k / e, "mlp_weight_fraction": mlp.weight_fraction,
                    "recall": r["recall"], "mass_recall": r["mass_recall"], "mass_share": r["mass_share"],
                    "per_layer_recall": [v["recall"] for v in r["per_layer"].values()]}
            add(f"MoE E={e} k={k}", "moe", ppl(f"moe E={e} k={k}"), **info)
            if str(e) in args.oracle.split(",") and f == oracle_fraction:
                for m in model.modules():
                    if type(m).__name__ == "ExpertMLP":
                        m.routing = "oracle"
                add(f"MoE E={e} k={k}, oracle routing", "oracle", ppl(f"oracle E={e} k={k}"),
                    **{**info, "recall": None, "mass_recall": None})
            remove_moe_(model)
    if not args.no_cats:
        targets = cats_sparsities(fractions)
        stats = calibrate(model, [asp.CATS(sparsity=s) for s in targets], cal, progress=progress)
        for s, why in targets.items():
            sparsify_(model, asp.CATS(sparsity=s), stats=stats)
            res = ppl(f"cats {s:g}")
            reached = res.reached_sparsity.get("mlp.act:output", s)
            desparsify_(model)
            add(f"CATS s={s:g} ({', '.join(why)})", "cats", res, sparsity=s, reached=reached,
                neuron_fraction=1 - reached, mlp_weight_fraction=(1 + 2 * (1 - reached)) / 3, matches=why)
    print(table(doc))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
