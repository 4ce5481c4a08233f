"""MoTE on SmolLM2-135M: switch off the MLP neurons that separate news from Wikipedia text.

A = the Lee news corpus (``news``), B = the Wikipedia articles (``wiki``). The contrast is fitted
on ``--prompts`` calibration-split documents of each (their first ``--max-tokens`` tokens, one
prompt per document), every neuron at ``mlp.down:input`` of the 30 layers, with a prompt-level
permutation test. On held-out test-split windows of each corpus (``--tokens`` scored tokens
each) it then switches off the top-N neurons and, for each N, N random neurons (``--seeds``,
drawn uniformly over all 46,080, and drawn layer-matched to the top N), and measures A's mean
log-prob per token (targeted) and B's perplexity (off-target) against the dense model. A
force-on variant (``--on-tops``: the top-N neurons held at their mean value on A where they
fire) follows. Writes JSON with the machine and git state to ``--out``, e.g.

    python benchmarks/mote_smollm2.py --out benchmarks/results/mote.json
"""
from __future__ import annotations

import argparse
import sys
import time


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def run(args) -> dict:
    import actsparse as asp
    from actsparse.data.text import spread_indices, text, token_windows
    from actsparse.eval.switching import measure, switch_experiment

    model, tok = asp.load("smollm2-135m")
    cal_a, cal_b = text("news", "calibration"), text("wiki", "calibration")
    a = [cal_a[i] for i in spread_indices(len(cal_a), min(args.prompts, len(cal_a)))]
    b = [cal_b[i] for i in spread_indices(len(cal_b), min(args.prompts, len(cal_b)))]
    t0 = time.time()
    res = asp.contrast(model, tok, a, b, statistic=args.statistic, max_tokens=args.max_tokens,
                       permutations=args.permutations, batch_size=8, progress=True,
                       describe={"a": {"source": "news", "split": "calibration"},
                                 "b": {"source": "wiki", "split": "calibration"}})
    contrast_s = time.time() - t0
    if args.contrast_out:
        res.save(args.contrast_out)
    wa = token_windows(tok, text("news", "test"), window=args.window, max_tokens=args.tokens)
    wb = token_windows(tok, text("wiki", "test"), window=args.window, max_tokens=args.tokens)
    dense = measure(model, wa, wb, batch_size=args.batch_size)
    print(f"dense: A log-prob {dense['a_logprob']:.4f}, B PPL {dense['b_ppl']:.3f}", flush=True)
    runs = {}
    plan = (("off", args.tops, {"uniform": args.seeds, "layer_matched": args.matched_seeds}),
            ("on", args.on_tops, {"uniform": args.on_seeds}))
    for mode, tops, controls in plan:
        if not tops:
            continue
        runs[mode] = switch_experiment(model, res, wa, wb, tops=tops, mode=mode, batch_size=args.batch_size,
                                       dense=dense, controls={k: v for k, v in controls.items() if v})
        for row in runs[mode]["rows"]:
            for name, c in row["controls"].items():
                print(f"{mode} N={row['n']} vs {name}: top drop {row['top']['a_drop']:+.4f} "
                      f"(B PPL x{row['top']['b_ppl_ratio']:.4f}); random drop {c['a_drop']['mean']:+.4f} "
                      f"+- {c['a_drop']['std']:.4f} (B PPL x{c['b_ppl_ratio']['mean']:.4f}); "
                      f"ratio {c['targeted_ratio']:.1f}", flush=True)
    stat = res.arrays["statistic"]
    per_layer_top = {}
    for layer, _ in res.top(max(args.tops or [10])):
        per_layer_top[layer] = per_layer_top.get(layer, 0) + 1
    return {
        "contrast": {"statistic": args.statistic, "prompts": res.meta["prompts"], "tokens": res.meta["tokens"],
                     "max_tokens": args.max_tokens, "permutations": res.meta["permutations"],
                     "exact": res.meta["exact"], "significant_q": res.meta["significant"], "seconds": contrast_s,
                     "top20": [{"layer": la, "neuron": i, "statistic": float(stat[la, i]),
                                "q": float(res.arrays["q"][la, i]), "a_value": float(res.arrays["a_value"][la, i]),
                                "b_value": float(res.arrays["b_value"][la, i])} for la, i in res.top(20)],
                     "top_n_per_layer": {str(k): v for k, v in sorted(per_layer_top.items())}},
        "eval": {"a": "news/test", "b": "wiki/test", "window": args.window, "a_tokens": dense["a_tokens"],
                 "b_tokens": dense["b_tokens"]},
        "dense": dense, "runs": runs,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=24, help="calibration documents per set (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per prompt (default: %(default)s)")
    ap.add_argument("--statistic", default="standardized", choices=["standardized", "rate"])
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=1536, help="held-out tokens of each text (default: %(default)s)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tops", type=ints, default=[10, 50, 200], help="N values, comma-separated")
    ap.add_argument("--on-tops", type=ints, default=[10, 50], help="force-on N values (empty: skip)")
    ap.add_argument("--seeds", type=ints, default=[0, 1, 2], help="seeds of the uniform random switch-offs")
    ap.add_argument("--matched-seeds", type=ints, default=[0, 1], help="seeds of the layer-matched ones")
    ap.add_argument("--on-seeds", type=ints, default=[0, 1], help="seeds of the random force-ons")
    ap.add_argument("--contrast-out", default=None, help="also save the contrast in this directory")
    ap.add_argument("--out", default="actsparse-out/mote.json", help="JSON output (default: %(default)s)")
    args = ap.parse_args()
    from actsparse.commands.common import check_output
    from actsparse.io import write_json
    from actsparse.provenance import git_dirty, git_hash, machine_info

    check_output(args.out, "--out")
    t0 = time.time()
    res = run(args)
    write_json(args.out, {"benchmark": "mote", "model": "smollm2-135m", "dtype": "float32", "site": "mlp.down:input",
                          **res, "seconds": time.time() - t0, "machine": machine_info(), "git": git_hash(short=False),
                          "git_dirty": git_dirty(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
