"""`actsparse intervene`: switch the top contrast units off (or on) and measure what moves."""
from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.commands.common import (DEFAULT_OUT, add_model_options, check_output, load_causal_lm, positive_int,
                                       setup, window_int)


def seeds(value: str) -> list[int]:
    if value.strip().lower() in ("", "none"):
        return []
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers or 'none', got {value!r}") from None


def tops(value: str) -> list[int]:
    out = seeds(value)
    if not out or any(n < 1 for n in out):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {value!r}")
    return out


def register(sub) -> None:
    p = sub.add_parser(
        "intervene", help="switch the top contrast neurons / experts off or on and measure the effect",
        description="Switch off (or force on) the --top N units of a contrast (`actsparse contrast --out DIR`) "
                    "and measure, on held-out windows, the targeted change (mean log-prob per token of text A: "
                    "switching off A's units should lower it) and the off-target one (perplexity of text B), both "
                    "against the dense model on the same windows, and against N random units per --random seed "
                    "(the control: the top units should move A at least 3x as much). By default A and B are the "
                    "contrast's own sources, their --eval-split. Neurons forced on hold --scale x their mean value "
                    "on A where they fire; experts forced on are always selected; experts switched off are never "
                    "selected (router logit -inf before the top-k). Writes OUT/intervene.json and, with "
                    "--save-intervention, the top-N intervention as JSON (load it in Python with "
                    "Intervention.load(path, model)).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    p.add_argument("--contrast", type=Path, required=True, help="a directory written by `actsparse contrast`")
    p.add_argument("--top", type=tops, default=[10], help="N: units switched, comma-separated for several (10,50,200)")
    p.add_argument("--mode", choices=["off", "on"], default="off")
    p.add_argument("--scale", type=float, default=1.0, help="--mode on, neurons: the value is scale x the mean on A")
    p.add_argument("--random", type=seeds, default=[0, 1, 2],
                   help="seeds of the random controls (N random units each); none to skip")
    p.add_argument("--layer-matched", action="store_true",
                   help="draw the random units layer by layer, as many per layer as the top N has")
    p.add_argument("--eval-a", default=None, metavar="SRC", help="targeted text (default: the contrast's A source)")
    p.add_argument("--eval-b", default=None, metavar="SRC", help="off-target text (default: the contrast's B source)")
    p.add_argument("--eval-split", default="test", choices=["calibration", "validation", "test", "all"],
                   help="split of the evaluation texts (keep it apart from the contrast's split)")
    p.add_argument("--tokens", type=positive_int, default=4096, help="scored tokens of each text")
    p.add_argument("--window", type=window_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--save-intervention", type=Path, default=None, metavar="FILE",
                   help="write the intervention of the first --top N here (JSON)")
    p.add_argument("--ignore-weights", action="store_true",
                   help="use a contrast made on other weights of the same architecture (its unit indices then "
                        "name other neurons)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT / "intervene", help="output directory")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def eval_source(args, res, which: str) -> tuple[str, dict]:
    from actsparse.errors import ConfigError

    given = getattr(args, f"eval_{which}")
    recorded = (res.meta.get("sets") or {}).get(which) or {}
    source = given or recorded.get("source")
    if not source:
        raise ConfigError(f"the contrast does not record its {which.upper()} text (made in Python without describe=); "
                          f"pass --eval-{which}")
    opts = {k: recorded[k] for k in ("text_field", "encoding", "doc_separator") if k in recorded and not given}
    return source, opts


def run(args) -> int:
    from actsparse.data.text import text, token_windows
    from actsparse.eval.switching import measure, switch_experiment
    from actsparse.intervention import from_contrast
    from actsparse.io import write_json
    from actsparse.measure.contrast import ContrastResult

    setup(args)
    check_output(args.out, "--out", directory=True)
    if args.save_intervention:
        check_output(args.save_intervention, "--save-intervention")
    model, tok = load_causal_lm(args, "`actsparse intervene`")
    res = ContrastResult.load(args.contrast, model=model, check_weights=not args.ignore_weights)
    for n in args.top:
        res.top(n)  # refuse an N larger than the units more active on A before any evaluation
    ivs = {n: from_contrast(res, n, mode=args.mode, scale=args.scale) for n in args.top}
    if args.save_intervention:
        ivs[args.top[0]].save(args.save_intervention, model)
    windows, sources = {}, {}
    for which in ("a", "b"):
        source, opts = eval_source(args, res, which)
        sources[which] = f"{source}/{args.eval_split}"
        windows[which] = token_windows(tok, text(source, args.eval_split, **opts), window=args.window,
                                       max_tokens=args.tokens)
    progress = not args.no_progress
    dense = measure(model, windows["a"], windows["b"], batch_size=args.batch_size, progress=progress)
    control = "layer_matched" if args.layer_matched else "uniform"
    out = switch_experiment(model, res, windows["a"], windows["b"], tops=args.top, mode=args.mode,
                            controls={control: args.random} if args.random else {}, scale=args.scale,
                            batch_size=args.batch_size, dense=dense, progress=progress)
    print(f"dense: A ({sources['a']}) log-prob/token {dense['a_logprob']:.4f}; B ({sources['b']}) PPL {dense['b_ppl']:.3f}")
    for row in out["rows"]:
        t = row["top"]
        line = (f"top {row['n']} {res.units} {args.mode}: A log-prob {t['a_logprob']:.4f} (fall {t['a_drop']:+.4f}), "
                f"B PPL {t['b_ppl']:.3f} (x{t['b_ppl_ratio']:.4f})")
        for name, c in row["controls"].items():
            line += (f"; random ({name}, {len(c['runs'])} seeds): fall {c['a_drop']['mean']:+.4f} "
                     f"+- {c['a_drop']['std']:.4f}, B PPL x{c['b_ppl_ratio']['mean']:.4f}; "
                     f"targeted ratio {c['targeted_ratio']:.1f}")
        print(line)
    write_json(args.out / "intervene.json",
               {"model": args.model, "dtype": args.dtype, "contrast": str(args.contrast), "units": res.units,
                "site": res.site, "eval": {**sources, "window": args.window, "tokens": args.tokens}, **out,
                "interventions": {str(n): [s.to_dict() for s in iv.switches] for n, iv in ivs.items()}})
    print(f"wrote {args.out / 'intervene.json'}" +
          (f" and {args.save_intervention}" if args.save_intervention else ""))
    return 0
