"""`actsparse contrast`: which MLP neurons (or MoE experts) separate prompt set A from set B."""
from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.commands.common import (DATA_HELP, DEFAULT_OUT, add_model_options, check_output, load_causal_lm,
                                       positive_int, setup, text_options)


def add_set_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--a", required=True, metavar="SRC", help="prompt set A: " + DATA_HELP.replace(" Default: %(default)s", ""))
    p.add_argument("--b", required=True, metavar="SRC", help="prompt set B (the control), in the same forms as --a")
    p.add_argument("--text-field", default="text", help=".jsonl files: the field that holds the text")
    p.add_argument("--encoding", default="utf-8", help="text encoding of .txt/.md/.jsonl files (e.g. latin-1)")
    p.add_argument("--doc-separator", default=None, metavar="REGEX",
                   help=r".txt files: regular expression between prompts (default: a blank line, '\n\s*\n')")


def register(sub) -> None:
    p = sub.add_parser(
        "contrast", help="fTRI: the neurons / experts that separate prompt set A from set B",
        description="Run every prompt of A and B once (a prompt = one document of the split, cut to --max-tokens "
                    "tokens) and compare, unit by unit, the per-prompt activation of A with B's: for a dense model "
                    "every MLP neuron of every layer (at --site), for an MoE model (Mixtral, Qwen2/3-MoE, OLMoE) every "
                    "routed expert. --statistic standardized: Cohen's d of the per-prompt mean |activation| (experts: "
                    "gate mass); rate: difference of per-prompt firing rates, |v| > --threshold (experts: selection "
                    "frequency, MoTE's fTRI). Significance: a two-sided permutation test that shuffles the A/B labels "
                    "of whole prompts (exact when there are at most --permutations assignments), with "
                    "Benjamini-Hochberg q-values over all units. Writes OUT/contrast.json (settings, model identity, "
                    "the top units) and OUT/contrast.safetensors (per-unit statistic, p, q and means), which "
                    "`actsparse intervene --contrast OUT` reads.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    add_set_options(p)
    p.add_argument("--split", default="calibration", choices=["calibration", "validation", "test", "all"],
                   help="document split of A and B (calibration = first 40%% of the documents; keep test for "
                        "`intervene`); --split all for files that are only prompts")
    p.add_argument("--prompts", type=positive_int, default=None,
                   help="at most this many prompts per set, evenly spaced over the split (unset: all of them)")
    p.add_argument("--max-tokens", type=positive_int, default=256, help="tokens per prompt (its first ones)")
    p.add_argument("--statistic", choices=["standardized", "rate"], default="standardized")
    p.add_argument("--threshold", type=float, default=0.1, help="rate: a neuron fires when |v| > this")
    p.add_argument("--site", choices=["mlp.down:input", "mlp.act"], default="mlp.down:input",
                   help="neuron site: the down projection's input (act(gate) * up: what a switch-off removes) or "
                        "the activation output")
    p.add_argument("--permutations", type=positive_int, default=1000, help="label shuffles of the permutation test")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffles")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per forward")
    p.add_argument("--top", type=positive_int, default=20, help="units listed in contrast.json and printed")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT / "contrast", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def prompt_set(source: str, split: str, limit: int | None, args) -> list[str]:
    from actsparse.data.text import spread_indices, text

    docs = text(source, split, **text_options(args))
    return [docs[i] for i in spread_indices(len(docs), limit)] if limit and limit < len(docs) else docs


def run(args) -> int:
    from actsparse.errors import ConfigError
    from actsparse.measure.contrast import contrast

    setup(args)
    check_output(args.out, "--out", directory=True)
    if args.threshold < 0:
        raise ConfigError(f"--threshold must be >= 0, got {args.threshold}")
    model, tok = load_causal_lm(args, "`actsparse contrast`")
    sets = {}
    for name, source in (("a", args.a), ("b", args.b)):
        docs = prompt_set(source, args.split, args.prompts, args)
        sets[name] = docs
        print(f"{name.upper()}: {len(docs)} prompts from {source} ({args.split} split)")
    describe = {name: {"source": src, "split": args.split, **text_options(args)}
                for name, src in (("a", args.a), ("b", args.b))}
    res = contrast(model, tok, sets["a"], sets["b"], statistic=args.statistic, site=args.site,
                   threshold=args.threshold, max_tokens=args.max_tokens, permutations=args.permutations,
                   seed=args.seed, batch_size=args.batch_size, progress=not args.no_progress, describe=describe)
    n = min(args.top, sum(1 for v in res.arrays["statistic"].reshape(-1).tolist() if v > 0))
    top = res.top(n) if n else []
    row = {layer: i for i, layer in enumerate(res.layers)}
    res.meta["model_name"] = args.model
    res.meta["top"] = [{"layer": la, "index": i, "statistic": float(res.arrays["statistic"][row[la], i]),
                        "p": float(res.arrays["p"][row[la], i]), "q": float(res.arrays["q"][row[la], i])}
                       for la, i in top]
    res.save(args.out)
    test = "exact" if res.meta["exact"] else f"{res.meta['permutations']} shuffles"
    print(f"{res.units}: {res.arrays['statistic'].numel()} units in {len(res.layers)} layers; permutation test {test}; "
          f"q <= 0.05: {res.meta['significant']['0.05']} units")
    for t in res.meta["top"]:
        print(f"  layer {t['layer']:>3} {res.units[:-1]} {t['index']:>5}: {args.statistic} {t['statistic']:+.3f}, "
              f"p {t['p']:.4f}, q {t['q']:.4f}")
    print(f"wrote {args.out / 'contrast.json'} and {args.out / 'contrast.safetensors'}")
    return 0
