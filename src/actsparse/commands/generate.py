"""`actsparse generate`: decode text with a (sparsified) model and print tokens/s."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from actsparse.commands.common import (add_model_options, add_plan_options, load_causal_lm, load_plan_from_args,
                                       positive_int, setup)
from actsparse.errors import ConfigError, UnsupportedError


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text, dense or with a sparsity plan, and print tokens/s",
        description="Greedy (or sampled) batch-1 generation. With --plan the model is sparsified by a "
                    "saved plan (actsparse calibrate) and decoded on the sparse CPU kernels. The fast "
                    "engine (LLaMA, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3) runs each token in one compiled "
                    "call; --engine hf uses model.generate (after accelerate_ when a plan is given), for any "
                    "architecture.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="example: actsparse generate --plan plan/ --dtype bfloat16 --prompt 'The history of Paris'")
    add_model_options(p)
    add_plan_options(p)
    p.add_argument("--prompt", default="The history of the city of Paris", help="prompt text")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["fast", "hf"], default="fast",
                   help="fast: actsparse FastDecoder (RoPE decoders with RMSNorm); hf: model.generate")
    p.add_argument("--dense", action="store_true",
                   help="ignore the plan's sparsity, prefill included (the dense baseline; the plan is still "
                        "checked against the model)")
    p.add_argument("--weights", choices=["int8", "q4"], default=None,
                   help="fast engine: decode with block-quantised weights the decoder packs itself (RTN, each "
                        "linear in the layout the plan reads; the dense model stays in memory too). Default: the "
                        "model's own weights (--dtype)")
    p.add_argument("--quantized", type=Path, default=None, metavar="DIR",
                   help="load the quantised weights saved by `actsparse quantize` into --model (the model they "
                        "were made from); with --plan, quantise with that plan (--plan there) so that every "
                        "linear is stored once in the layout it is read in")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of as it is made")
    p.set_defaults(func=run)


def check_fast_engine(model, name: str) -> None:
    """Refuse a model the fast engine cannot run with advice that works from this command:
    ``--engine hf`` (with a plan; on the generic fallback only TEAL can make one)."""
    from actsparse.decode.plan import SUPPORTED_TYPES, check_model
    from actsparse.models.sitemaps import site_map

    try:
        check_model(model)
    except UnsupportedError as err:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type in SUPPORTED_TYPES:  # not the architecture: dtype or device, the message says how
            raise
        if site_map(model, warn=False).family == "generic":
            how = ("use `--engine hf` (model.generate): this architecture has no site map, so only a TEAL plan "
                   "(uniform, on every linear but the LM head) can be calibrated for it, and with --plan it "
                   "decodes on the sparse kernels via accelerate_")
        else:
            how = "use `--engine hf` (model.generate; with --plan it decodes on the sparse kernels via accelerate_)"
        raise UnsupportedError(f"the fast engine (FastDecoder) runs RoPE decoders with RMSNorm "
                               f"({', '.join(SUPPORTED_TYPES)}), and {name} is {model_type!r}: {how}") from err


def run(args) -> int:
    import torch

    import actsparse as asp
    from actsparse.models.loading import max_positions

    setup(args)
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")
    model, tok = load_causal_lm(args, "`actsparse generate`")
    if args.engine == "fast":
        check_fast_engine(model, args.model)
    if (args.weights or args.quantized) and args.engine == "hf":
        raise UnsupportedError("--weights / --quantized run on the fast engine (FastDecoder); accelerate_ has no "
                               "quantised kernels yet: drop --engine hf")
    if args.quantized is not None:
        from actsparse.quant import load_quantized
        from actsparse.quant.modules import quant_description

        load_quantized(model, args.quantized)
        fmt = quant_description(model)["config"]["format"]
        if args.weights is not None and args.weights != fmt:
            raise ConfigError(f"--weights {args.weights} but {args.quantized} holds {fmt} weights; drop --weights "
                              "(a quantised model decodes in its own format) or quantise again")
        args.weights = None  # the model's QuantLinears are the decoder's weights
    if args.plan is not None:
        load_plan_from_args(model, args)  # checked against the model even with --dense
        if args.dense and args.engine == "hf":
            asp.desparsify_(model)  # model.generate would run the plan's masked modules
    ids = tok(args.prompt, return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise ConfigError("the prompt is empty after tokenisation")
    limit = max_positions(model)
    if limit is not None and ids.numel() + args.max_new_tokens > limit:
        raise ConfigError(f"the prompt ({ids.numel()} tokens) plus --max-new-tokens {args.max_new_tokens} exceeds "
                          f"{args.model}'s {limit} positions; lower --max-new-tokens or shorten the prompt")
    print(args.prompt, end="", flush=True)
    shown = []

    def stream(token):
        if args.no_stream:
            return
        prev = tok.decode(shown)
        shown.append(token)
        print(tok.decode(shown)[len(prev):], end="", flush=True)

    eos = tok.eos_token_id
    if args.engine == "fast":
        from actsparse.decode import FastDecoder

        dec = FastDecoder(model, max_len=ids.numel() + args.max_new_tokens + 1, dense=args.dense,
                          weights=args.weights)
        res = dec.generate(ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           eos_token_id=eos, seed=args.seed, on_token=stream)
        tokens, tps, prefill = res.tokens, res.tokens_per_s, res.prefill_s
        extra = ""
        if args.plan is not None and not args.dense:
            sp = dec.decode_sparsity()
            extra = "; inputs skipped during decode: " + ", ".join(
                f"{k} {v:.0%}" for k, v in sp.items() if v > 0)
        mem = dec.memory_report()
        extra += (f"; weights {mem['weights']}, resident {mem['resident_weight_bytes'] / 2**20:.0f} MiB "
                  f"({mem['resident_ratio']:.2f}x the model stored once in {mem['weights']}; copies "
                  f"{mem['transposed_copy_bytes'] / 2**20:.0f} MiB)")
    else:
        if args.plan is not None and not args.dense:
            print(f"\n[{asp.accelerate_(model)}]", file=sys.stderr)
        from actsparse.bench.timing import GenerateClock

        torch.manual_seed(args.seed)
        clock = GenerateClock(on_token=stream)
        sample = args.temperature > 0
        with torch.no_grad():
            out = model.generate(ids[None], max_new_tokens=args.max_new_tokens, do_sample=sample,
                                 temperature=args.temperature if sample else None,
                                 top_p=args.top_p if sample else None, streamer=clock,
                                 pad_token_id=eos)
        tokens = out[0, ids.numel():].tolist()
        prefill, tps = clock.prefill_s, clock.tokens_per_s
        extra = ""
    if args.no_stream:
        print(tok.decode(tokens), end="")
    print()
    print(f"[{len(tokens)} tokens, {tps:.1f} tokens/s decode, prefill {prefill * 1000:.0f} ms, "
          f"engine {args.engine}, {args.dtype}, {torch.get_num_threads()} threads{extra}]", file=sys.stderr)
    return 0
