"""``actsparse bench``: performance benchmarks, one sub-command each.

To add a benchmark, write ``_register_<name>(bench_sub)`` that adds its parser
(with ``set_defaults(func=...)``) and append it to ``_BENCHES``.
"""
from __future__ import annotations

import argparse

from actsparse.commands.common import DEFAULT_OUT, check_output, positive_int, quiet_progress
from actsparse.errors import ConfigError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark kernels and decoding speed",
        description="Performance benchmarks. Each writes a JSON result (machine info, "
        "config, raw timings, medians, spreads) and usually a plot.",
    )
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    for reg in _BENCHES:
        reg(sub)

    def _no_sub(args) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_no_sub)


# ---------------------------------------------------------------------------
def _csv(kind):
    def parse(text):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return parse


def _shape(text):
    try:
        o, i = text.lower().split("x")
        return int(o), int(i)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"shape must look like 11008x4096, got {text!r}") from err


def _register_kernel(sub) -> None:
    p = sub.add_parser(
        "kernel",
        help="activation-sparse GEMV kernels vs the best dense torch GEMV",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Benchmark the activation-sparse CPU kernels at batch 1 (decode):

  * sparse_input_gemv (TEAL path) on layers (out x in) 5632x2048, 2048x5632,
    11008x4096, 4096x11008 at sparsity 0, 0.5, 0.7, 0.9, 0.95;
  * gated_mlp_step (CATS path, SiLU) on a 4096 / 11008 gated MLP at 0, 0.5, 0.7, 0.9,
    against the best dense gated MLP (3 dense GEMVs + act + mul);

for each dtype (fp32, bf16) and thread count (1, 2). Timing is cold-cache (a
buffer larger than the L3 is read before every call), implementations and
sparsities are interleaved in a random order in every repeat, and the speedup is
taken against the fastest dense torch option for that dtype and thread count
(F.linear, torch.mv, x @ W^T with the transposed weight, torch.matmul).
Reported per point: median and p10/p90 time, speedup, speedup as a fraction of
the ideal 1/(1-s) (MLP: 3/(1+2(1-s))), effective GB/s of the bytes actually read.
Writes the JSON to --out and a plot next to it (same name, .png).
The full run takes about 10 minutes on 2 cores; --quick is a smoke test.""",
        epilog="example: actsparse bench kernel --quick --out /tmp/kernel.json",
    )
    p.add_argument("--quick", action="store_true",
                   help="smoke test: one layer shape (11008x4096), s in {0, 0.5, 0.9}, "
                   "5 repeats, MLP at s in {0, 0.5, 0.9}")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed calls per implementation and sparsity (default 21; 5 with --quick)")
    p.add_argument("--threads", type=_csv(int), default=None, metavar="N[,N]",
                   help="thread counts to run, comma separated (default 1,2)")
    p.add_argument("--dtypes", type=_csv(str), default=None, metavar="D[,D]",
                   help="weight/activation dtypes: fp32, bf16 (default fp32,bf16)")
    p.add_argument("--formats", type=_csv(str), default=None, metavar="F[,F]",
                   help="weight formats: fp32, bf16, int8, q4 (int8 / q4: the input-sparse GEMV on the "
                        "transposed packed codes against the same format's dense GEMVs; no gated MLP). "
                        "Example: --formats bf16,int8,q4")
    p.add_argument("--shapes", type=_csv(_shape), default=None, metavar="OUTxIN[,...]",
                   help="layer shapes (out x in) instead of the default four")
    p.add_argument("--sparsities", type=_csv(float), default=None, metavar="S[,S]",
                   help="layer sparsities (default 0,0.5,0.7,0.9,0.95)")
    p.add_argument("--mlp", type=_shape, default=None, metavar="HIDDENxINTER",
                   help="gated MLP size hidden x intermediate (default 4096x11008)")
    p.add_argument("--no-mlp", action="store_true", help="skip the gated MLP benchmark")
    p.add_argument("--flush-mb", type=int, default=256,
                   help="MiB read between timed calls to evict the caches (default 256, "
                   "8x the 32 MiB L3 here; 0 = warm cache)")
    p.add_argument("--seed", type=int, default=0, help="weights, inputs and order (default 0)")
    p.add_argument("--out", default=str(DEFAULT_OUT / "kernel.json"),
                   help=f"JSON output path (default {DEFAULT_OUT / 'kernel.json'}; the committed result is "
                        "regenerated only with an explicit --out benchmarks/results/kernel.json)")
    p.add_argument("--no-plot", action="store_true", help="do not write the .png plot")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(func=_run_kernel)


def _run_kernel(args) -> int:
    from actsparse.bench import kernel as bk

    from actsparse.bench.kernel_quant import QUANT_FORMATS

    if args.dtypes and args.formats:
        raise ConfigError("give --formats or --dtypes, not both (--formats also takes fp32, bf16)")
    dtypes = args.formats or args.dtypes or ["fp32", "bf16"]
    known = list(bk.DTYPES) + list(QUANT_FORMATS)
    bad = [d for d in dtypes if d not in known]
    if bad:
        raise ConfigError(f"unknown format(s) {bad}; choose from {', '.join(known)}")
    threads = args.threads or [1, 2]
    if any(t < 1 for t in threads):
        raise ConfigError("--threads must be positive integers")
    sparsities = args.sparsities
    if sparsities and any(not 0 <= s < 1 for s in sparsities):
        raise ConfigError("--sparsities must be in [0, 1)")
    shapes = args.shapes
    mlp_sp = None
    repeats = args.repeats
    if args.quick:
        shapes = shapes or [(11008, 4096)]
        sparsities = sparsities or [0.0, 0.5, 0.9]
        mlp_sp = [0.0, 0.5, 0.9]
        repeats = repeats or 5
    repeats = repeats or 21
    if repeats < 1:
        raise ConfigError("--repeats must be >= 1")
    mlp = None if args.no_mlp else (args.mlp or bk.MLP_SHAPE)
    _check_outputs(args)
    result = bk.run(shapes=shapes, dtypes=dtypes, threads=threads, sparsities=sparsities,
                    mlp_shape=mlp, mlp_sparsities=mlp_sp, repeats=repeats,
                    flush_mb=args.flush_mb, seed=args.seed, progress=not args.no_progress)
    _save(result, args, bk.plot)
    _print_table(result)
    return 0


def _check_outputs(args) -> None:
    """Before any timing: the JSON and its plot can be written; --no-progress silences loading bars."""
    from pathlib import Path

    check_output(args.out, "--out")
    if not args.no_plot:
        check_output(Path(args.out).with_suffix(".png"), "--out (its .png plot)")
    if args.no_progress:
        quiet_progress()


def _save(result: dict, args, plot) -> None:
    """Write the result JSON to ``args.out`` and, unless --no-plot, its plot next to it (.png)."""
    from pathlib import Path

    from actsparse.io import write_json

    out = write_json(args.out, result)
    print(f"wrote {out}")
    if not args.no_plot:
        print(f"wrote {plot(result, Path(out).with_suffix('.png'))}")


def _print_table(result) -> None:
    print(f"{'shape':>16} {'dtype':>5} {'thr':>3} {'s':>5} {'impl':>16} {'speedup':>8} "
          f"{'of ideal':>8} {'GB/s':>6}  best dense")
    for r in result["summary"]:
        print(f"{r['shape']:>16} {r['dtype']:>5} {r['threads']:>3} {r['sparsity']:>5.2f} "
              f"{r['impl']:>16} {r['speedup']:>8.2f} {r['fraction_of_ideal']:>8.2f} "
              f"{r['effective_GBps']:>6.1f}  {r['best_dense']} {r['best_dense_ms']:.2f} ms")


def _register_decode(sub) -> None:
    p = sub.add_parser(
        "decode",
        help="end-to-end batch-1 decode tokens/s, dense vs sparse",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Greedy batch-1 decoding, dense vs sparse, same dtype and threads, engines interleaved
in a random order in every repeat:

  hf-dense     Hugging Face model.generate, dense model
  hf-sparse    model.generate after accelerate_ (sparse kernels per linear)
  fast-dense   actsparse FastDecoder, dense (one compiled call per token)
  fast-sparse  FastDecoder on the sparsified model
  llama-cpp    llama.cpp on the same weights, F32 / BF16 (embedded models and the random LLaMA
               shapes, when llama-cpp-python is installed)
  llama-cpp-q8_0 / llama-cpp-q4_0  with --weights int8 / q4: llama.cpp on the same source file
               requantised by llama.cpp to Q8_0 / Q4_0, bytes per token from the file's tensors
  fast-dense-F / fast-sparse-F  with --weights int8 / q4: FastDecoder dense and sparse on its own
               RTN-quantised copy in format F (sparse: input-sparse linears packed transposed),
               bytes per token the format's real bytes (codes + scales + mins)

The plan (--method/--sparsity) is calibrated on the wiki calibration split. The
models llama-1.1b (TinyLlama's shape) and gemma3-1b (Gemma-3-1B's shape) have random weights
(thresholds calibrated the same way); the HF engines are skipped for models above
--hf-max-params (HF bf16 decoding of 1B parameters on this CPU is far slower than
the best dense engine). Reports tokens/s (median, p10/p90), speedup over the best
dense engine, bytes per token, effective GB/s and the fraction of the Amdahl
ceiling 1/((1-f)+f(1-s)). A plain read of 512 MiB is timed among the engines: the
machine's read bandwidth at that thread count, each engine's GB/s as a fraction of
it, and the most any engine reading the dense bytes could gain over hf-dense.
Writes JSON to --out and a .png next to it.""",
        epilog="example: actsparse bench decode --models smollm2-135m --dtypes bfloat16 --threads 1 --repeats 3",
    )
    p.add_argument("--models", type=_csv(str), default=["smollm2-135m", "llama-1.1b"], metavar="M[,M]",
                   help="models: embedded names (smollm2-135m, gemma3-270m), local dirs, HF ids, or the random-weight "
                        "shapes llama-1.1b, gemma3-1b (default: smollm2-135m,llama-1.1b)")
    p.add_argument("--method", default="teal",
                   help="sparsification method of the plan (default teal); none = no plan, the natural "
                        "zeros of a ReLU model")
    p.add_argument("--sparsity", type=float, default=0.5, help="target sparsity (default 0.5)")
    p.add_argument("--dtypes", type=_csv(str), default=["bfloat16", "float32"], metavar="D[,D]",
                   help="weight dtypes: bfloat16, float32 (default both)")
    p.add_argument("--threads", type=_csv(int), default=[1, 2], metavar="N[,N]", help="thread counts (default 1,2)")
    p.add_argument("--new-tokens", type=positive_int, default=64, help="tokens generated per run (default 64)")
    p.add_argument("--prompt-tokens", type=positive_int, default=32, help="prompt length (default 32, wiki test text)")
    p.add_argument("--repeats", type=positive_int, default=5, help="runs per engine and group (default 5)")
    p.add_argument("--calib-tokens", type=positive_int, default=1024,
                   help="calibration tokens for the plan (default 1024)")
    p.add_argument("--hf-max-params", type=float, default=3e8,
                   help="run the HF engines only for models up to this many parameters (default 3e8)")
    p.add_argument("--weights", type=_csv(str), default=[], metavar="W[,W]",
                   help="weight formats: bf16 / fp32 (the --dtypes engines, always run), int8, q4 (add the fast "
                        "engines on each quantised format, same runs). Example: --dtypes bfloat16 --weights "
                        "bf16,int8,q4")
    p.add_argument("--quant-head", choices=["int8", "same", "dense"], default="int8",
                   help="the lm_head of the int8 / q4 engines: int8 (default; llama.cpp's Q8_0 files and "
                        "SmolLM2's Q4_0 keep an 8-bit head; a q4 head costs SmolLM2 +6%% perplexity), same (the "
                        "blocks' format), dense (the --dtypes head)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llama-cpp", choices=["auto", "on", "off"], default="auto",
                   help="time llama.cpp too on the embedded models (their own GGUF requantised to F32 / BF16, and "
                        "Q8_0 / Q4_0 with --weights int8 / q4) and the random LLaMA shapes (a GGUF written from "
                        "their tensors): "
                        "auto = when llama-cpp-python is installed (an optional build, see the README)")
    p.add_argument("--out", default=str(DEFAULT_OUT / "decode.json"),
                   help=f"JSON output path (default {DEFAULT_OUT / 'decode.json'}; the committed result is "
                        "regenerated only with an explicit --out benchmarks/results/decode.json)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_decode)


def _run_decode(args) -> int:
    from actsparse.bench import decode as bd

    bad = [d for d in args.dtypes if d not in ("bfloat16", "float32")]
    if bad:
        raise ConfigError(f"unknown dtype(s) {bad}; choose from bfloat16, float32")
    if any(t < 1 for t in args.threads):
        raise ConfigError("--threads must be positive integers")
    if not 0 <= args.sparsity < 1:
        raise ConfigError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.new_tokens < 3 or args.prompt_tokens < 1 or args.repeats < 1:
        raise ConfigError("--new-tokens must be >= 3, --prompt-tokens and --repeats >= 1")
    bd.parse_weights(args.weights, args.dtypes)  # refused before any work
    _check_outputs(args)
    result = bd.run(args.models, method=args.method, sparsity=args.sparsity, dtypes=args.dtypes,
                    threads=args.threads, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                    repeats=args.repeats, calib_tokens=args.calib_tokens, hf_max_params=args.hf_max_params,
                    seed=args.seed, progress=not args.no_progress,
                    llama_cpp={"auto": None, "on": True, "off": False}[args.llama_cpp], weights=args.weights,
                    quant_head=args.quant_head)
    _save(result, args, bd.plot)
    print_decode_table(result)
    return 0


def print_decode_table(result) -> None:
    print(f"{'model':>14} {'dtype':>8} {'thr':>3} " + " ".join(f"{e:>11}" for e in ("hf-dense", "hf-sparse",
          "fast-dense", "fast-sparse")) + f" {'speedup':>7} {'ceiling':>7} {'of ceil':>7} {'read GB/s':>9}"
          f" {'dense of read':>13}")
    for g in result["groups"]:
        cells = " ".join(f"{g['engines'][e]['median']:>11.1f}" if e in g["engines"] else f"{'-':>11}"
                         for e in ("hf-dense", "hf-sparse", "fast-dense", "fast-sparse"))
        read = g.get("read_GBps", {}).get("best")  # absent in results from before the probe
        of_read = g.get("of_read_bandwidth", {}).get("fast-dense")
        print(f"{g['model']:>14} {g['dtype']:>8} {g['threads']:>3} {cells} {g['speedup']:>7.2f} "
              f"{g['amdahl_ceiling']:>7.2f} {g['fraction_of_ceiling']:>7.2f} "
              f"{read if read is None else format(read, '.1f'):>9} {of_read if of_read is None else format(of_read, '.2f'):>13}"
              + _llama_cells(g["engines"], g.get("llama_cpp")))
        for fmt, q in g.get("quantized", {}).items():
            dense, sparse = (q["engines"][f"fast-{k}-{fmt}"]["median"] for k in ("dense", "sparse"))
            print(f"{'':>14} {fmt:>8} {g['threads']:>3} {'':>11} {'':>11} {dense:>11.1f} {sparse:>11.1f} "
                  f"{q['speedup']:>7.2f} {q['amdahl_ceiling']:>7.2f} {q['fraction_of_ceiling']:>7.2f}"
                  f"{'':>24}" + _llama_cells(q["engines"], q.get("llama_cpp")))


def _llama_cells(engines: dict, summary: dict | None) -> str:
    """"  llama.cpp <format> <tok/s> (<GB/s>), dense / sparse vs llama.cpp <x> / <x>" where it ran."""
    if summary is None:  # none, or a result from before the summaries: the plain median if any
        llama = engines.get("llama-cpp")
        return f"  llama.cpp {llama['median']:.1f}" if llama else ""
    s = summary
    gbps = f" ({s['effective_GBps']:.1f} GB/s)" if "effective_GBps" in s else ""
    fmt = f"{s['format']} " if s.get("format") else ""
    return (f"  llama.cpp {fmt}{engines[s.get('engine', 'llama-cpp')]['median']:.1f}{gbps}, "
            f"dense / sparse vs llama.cpp {s['fast_dense_vs_llama_cpp']:.2f}x / {s['fast_sparse_vs_llama_cpp']:.2f}x")


# benchmarks in --help order; add new ones here
_BENCHES = [_register_kernel, _register_decode]
