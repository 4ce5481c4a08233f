"""`actsparse quantize`: block-quantise a model's linears (int8 / q4, RTN or AWQ), or load a
GGUF file's own Q8_0 / Q4_0 / Q4_1 tensors (--from-gguf), and save it."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from actsparse.commands.common import add_data_options, add_model_options, check_output, load_causal_lm, setup

DEFAULT_MODEL = "smollm2-135m"


def register(sub) -> None:
    p = sub.add_parser(
        "quantize", help="quantise a model's block linears to int8 or q4 (RTN or AWQ), or load a GGUF file's, and save",
        description="Pack every block linear (and with --lm-head the output head) in blocks of 32: int8 "
                    "(symmetric, one scale per block) or q4 (4-bit with a scale and min per block, like Q4_1). "
                    "--plan packs the linears that plan reads input-sparsely in the transposed layout, so the "
                    "saved model is stored once in the layouts FastDecoder reads with that plan. --awq searches "
                    "per-channel scales on calibration text (the --data options) and folds them into the "
                    "preceding norm / linear before rounding. --from-gguf FILE instead takes the block linears' "
                    "codes from a GGUF file (Q8_0 -> int8, Q4_0 / Q4_1 -> q4, bit for bit: no re-rounding; "
                    "--format, if given, must be the file's); the dense model is the file's own (FILE, or the "
                    "embedded model whose file it is) unless --model names it, and a file of another model, of "
                    "other GGUF types (Q4_K, Q6_K, F16, ...) or mixing Q8_0 with Q4 is refused before anything is "
                    "written. With --plan, the linears read input-sparsely are requantised transposed from the "
                    "file's values (lossy: a warning says how many). Writes model.safetensors + quant.json (no "
                    "pickle); `actsparse generate --quantized DIR` and load_quantized() read it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="examples: actsparse quantize --format q4 --plan plan/ --out q4/ && "
               "actsparse generate --quantized q4/ --plan plan/ ;  "
               "actsparse quantize --from-gguf smollm2-135m --out q4g/ && actsparse generate --quantized q4g/ ;  "
               "actsparse quantize --from-gguf model.Q8_0.gguf --out q8/ && "
               "actsparse generate --model model.Q8_0.gguf --quantized q8/")
    add_model_options(p)
    model_opt = p._option_string_actions["--model"]
    model_opt.help = model_opt.help.replace("Default: %(default)s", f"Default: {DEFAULT_MODEL}; with --from-gguf, "
                                            "the file's own model%(default).0s")
    p.set_defaults(model=None)  # None: the default above, resolved in run
    p.add_argument("--format", default=None, choices=["int8", "q4"],
                   help="weight format (required unless --from-gguf, where it is the file's)")
    p.add_argument("--from-gguf", default=None, metavar="FILE",
                   help="a .gguf file (or an embedded model name: its GGUF file) whose Q8_0 / Q4_0 / Q4_1 block "
                        "linears to load as int8 / q4 without re-rounding")
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


def _gguf_source(value: str) -> tuple[Path, str]:
    """(the GGUF file, the model name to load its dense model by) for --from-gguf."""
    from actsparse.errors import ConfigError, ModelNotFoundError
    from actsparse.models.loading import EMBEDDED, embedded_gguf

    if value in EMBEDDED:
        path = embedded_gguf(value)
        if path is None:
            raise ConfigError(f"--from-gguf {value}: this embedded model has no GGUF file")
        return path, value
    path = Path(os.path.expanduser(value))
    if not path.is_file():
        raise ModelNotFoundError(f"--from-gguf: GGUF file not found: {path}")
    for name in EMBEDDED:  # the embedded model's own file: load it by name (its cache entry)
        if name in ("minilm", "gemma3-270m"):  # no file / assembled on demand
            continue
        try:
            own = embedded_gguf(name)
        except ModelNotFoundError:
            continue
        if own is not None and own.is_file() and os.path.samefile(own, path):
            return path, name
    return path, str(path)


def run(args) -> int:
    from actsparse.errors import ConfigError

    setup(args)
    if args.from_gguf is not None:
        return run_from_gguf(args)
    if args.format is None:
        raise ConfigError("--format int8|q4 is required (or --from-gguf FILE to take the format and codes from a "
                          "GGUF file)")
    from actsparse.quant import CONFIGS, quantize_, save_quantized

    args.model = args.model or DEFAULT_MODEL
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


def run_from_gguf(args) -> int:
    from actsparse.errors import ConfigError
    from actsparse.quant import load_gguf_quantized_, save_quantized

    if args.awq:
        raise ConfigError("--awq does not apply to --from-gguf: the codes are the file's own (AWQ would rescale the "
                          "dense weights and round them again); drop --awq, or quantise the dense model with --awq")
    path, source = _gguf_source(args.from_gguf)
    args.model = args.model or source
    out = args.out or Path("actsparse-out") / f"quantized-{path.stem}"
    check_output(out, "--out", directory=True)
    model, _tok = load_causal_lm(args, "`actsparse quantize --from-gguf`")
    desc = load_gguf_quantized_(model, path, lm_head=args.lm_head, plan=args.plan, progress=not args.no_progress)
    fmt = desc["config"]["format"]
    if args.format is not None and args.format != fmt:
        raise ConfigError(f"--format {args.format} but {path}'s block linears give {fmt}; drop --format (the codes "
                          "are the file's) or quantise the dense model with --format")
    save_quantized(model, out)
    types = ", ".join(f"{n} x {t}" for t, n in sorted(desc["gguf"]["types"].items()))
    n_re = len(desc["gguf"]["requantised_transposed"])
    how = f"{n_re} requantised transposed for the plan (lossy)" if n_re else "bit for bit"
    model_opt = "" if args.model == DEFAULT_MODEL else f" --model {args.model}"
    print(f"loaded {len(desc['linears'])} linears of {path.name} ({types}) as {fmt} ({how}); wrote {out}; "
          f"decode with: actsparse generate{model_opt} --quantized {out}")
    return 0
