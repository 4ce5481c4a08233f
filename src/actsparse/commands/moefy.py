"""`actsparse moefy`: split every MLP into co-activation experts with routers, and save the plan."""
from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.commands.common import (DEFAULT_OUT, add_model_options, add_text_options, check_output,
                                       load_causal_lm, nonnegative_int, positive_int, setup, text_options,
                                       window_int)


def register(sub) -> None:
    p = sub.add_parser(
        "moefy", help="dense-to-MoE: group co-activated MLP neurons into experts, train routers, save the plan",
        description="Read-ME-style dense-to-MoE. One pass over calibration text counts, per layer, which neurons "
                    "of the down projection's input are active together (active = among a token's top --rate of "
                    "|h|); balanced k-means splits each layer's neurons into --experts equal experts; a linear "
                    "router per layer (ridge regression of each expert's log activation mass on the MLP input) "
                    "picks --top-k experts per token. Writes moe.json + moe.safetensors (the permutation and the "
                    "routers) and prints the routers' recall of the oracle top-k experts on validation text. "
                    "Apply with actsparse.moe.apply_moe_(model, MoEPlan.load(DIR)).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    add_text_options(p, sampling=False)
    p.add_argument("--experts", type=positive_int, default=16, help="experts per layer (must divide the MLP width)")
    p.add_argument("--top-k", type=positive_int, default=8, help="experts computed per token")
    p.add_argument("--tokens", type=positive_int, default=8192, help="calibration-split tokens for co-activation")
    p.add_argument("--router-rows", type=positive_int, default=4096,
                   help="calibration tokens (spread over the run) whose activations fit the routers")
    p.add_argument("--validation-tokens", type=nonnegative_int, default=2048,
                   help="validation-split tokens for the routers' recall (0: skip)")
    p.add_argument("--rate", type=float, default=0.25,
                   help="co-activation: a neuron is active on a token when its |h| is in the token's top RATE")
    p.add_argument("--window", type=window_int, default=512, help="tokens per window")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward")
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.add_argument("--out", type=Path, default=None,
                   help=f"plan directory (default: {DEFAULT_OUT}/moe-MODEL-eEXPERTS-kTOP_K)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from actsparse.moe.api import moefy

    from actsparse.errors import ConfigError

    setup(args)
    if not 0.0 < args.rate <= 1.0:
        raise ConfigError(f"--rate must be in (0, 1], got {args.rate}")
    if args.top_k > args.experts:
        raise ConfigError(f"--top-k {args.top_k} is more than --experts {args.experts}")
    out = args.out or DEFAULT_OUT / f"moe-{Path(args.model).name}-e{args.experts}-k{args.top_k}"
    check_output(out, "--out", directory=True)
    model, tok = load_causal_lm(args, "`actsparse moefy`")
    plan = moefy(model, tok, args.data, experts=args.experts, top_k=args.top_k, tokens=args.tokens,
                 router_rows=args.router_rows, validation_tokens=args.validation_tokens, window=args.window,
                 rate=args.rate, seed=args.seed, batch_size=args.batch_size, progress=not args.no_progress,
                 text_options=text_options(args))
    plan.meta["model"] = args.model
    plan.save(out)
    v = plan.meta.get("validation")
    recall = (f"; router recall of the oracle top-{args.top_k} experts on {v['tokens']} validation tokens: "
              f"{v['recall']:.3f} (their share of the oracle's activation mass: {v['mass_recall']:.3f})") if v else ""
    print(f"{len(plan.layers)} MLPs split into {args.experts} experts, top-{args.top_k} per token "
          f"({args.top_k / args.experts:.0%} of the neurons){recall}; wrote {out}")
    return 0
