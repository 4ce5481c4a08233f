"""`actsparse quantize`: block-quantise a model's linears (int8 / q4, RTN or AWQ) and save it."""
from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.commands.common import add_data_options, add_model_options, check_output, load_causal_lm, setup


def register(sub) -> None:
    p = sub.add_parser(
        "quantize", help="quantise a model's block linears to int8 or q4 (RTN or AWQ) and save it",
        description="Pack every block linear (and with --lm-head the output head) in blocks of 32: int8 "
                    "(symmetric, one scale per block) or q4 (4-bit with a scale and min per block, like Q4_1). "
                    "--plan packs the linears that plan reads input-sparsely in the transposed layout, so the "
                    "saved model is stored once in the layouts FastDecoder reads with that plan. --awq searches "
                    "per-channel scales on calibration text (the --data options) and folds them into the "
                    "preceding norm / linear before rounding. Writes model.safetensors + quant.json (no pickle); "
                    "`actsparse generate --quantized DIR` and load_quantized() read it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="example: actsparse quantize --format q4 --plan plan/ --out q4/ && "
               "actsparse generate --quantized q4/ --plan plan/")
    add_model_options(p)
    p.add_argument("--format", required=True, choices=["int8", "q4"], help="weight format")
    p.add_argument("--awq", action="store_true", help="AWQ scale search on calibration text (default: plain "
                                                      "rounding, RTN)")
    p.add_argument("--plan", type=Path, default=None,
                   help="a plan directory (actsparse calibrate) whose input-sparse linears to pack transposed")
    p.add_argument("--lm-head", action="store_true", help="quantise the output head too (untied from the embedding)")
    add_data_options(p, split="calibration", tokens=4096)
    p.add_argument("--out", type=Path, default=None,
                   help="directory to write (default: actsparse-out/quantized-<model>-<format>)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from actsparse.quant import CONFIGS, quantize_, save_quantized

    setup(args)
    out = args.out or Path("actsparse-out") / f"quantized-{Path(args.model).name}-{args.format}"
    check_output(out, "--out", directory=True)
    model, tok = load_causal_lm(args, "`actsparse quantize`")
    config = CONFIGS[args.format](awq=args.awq, lm_head=args.lm_head)
    calibration = None
    if args.awq:
        from actsparse.commands.common import text_options
        from actsparse.data.text import text, token_windows
        from actsparse.models.loading import check_window

        check_window(model, args.window)
        calibration = token_windows(tok, text(args.data, args.split, **text_options(args)), window=args.window,
                                    max_tokens=args.tokens, sampling=args.sampling)
    desc = quantize_(model, config, calibration=calibration, plan=args.plan, progress=not args.no_progress)
    save_quantized(model, out)
    transposed = sorted({d["layout"] for d in desc["linears"].values()})
    print(f"quantised {len(desc['linears'])} linears of {args.model} to {args.format} "
          f"({'AWQ' if args.awq else 'RTN'}; layouts: {', '.join(transposed)}); wrote {out}")
    return 0
