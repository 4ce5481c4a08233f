"""Held-out perplexity of SmolLM2-135M quantised: dense fp32 vs int8 vs q4 RTN vs q4 AWQ, each
without a plan and with TEAL 50% / CATS 50% plans (``--plans``).

Calibration: the wiki "calibration" split (AWQ rows: ``--sample-rows`` per linear group input;
the plans: ``--plan-tokens`` on the dense fp32 model); evaluation: the wiki "test" split,
non-overlapping windows, ``--tokens`` scored tokens (the same windows for every variant). A
plan variant quantises for the plan (``quantize_(plan=)``: the linears it reads input-sparsely
packed transposed, as FastDecoder reads them) and then loads the plan (on AWQ, whose scales
divide the inputs the thresholds test, ``load_plan`` divides the thresholds by them). ``-head``
variants quantise the lm_head too (rows). Writes a JSON with the machine, CPU and git state
(actsparse.provenance) to ``--out``, e.g.

    python benchmarks/quant_quality_smollm2.py --tokens 8192 \
        --out benchmarks/results/quant-quality-smollm2-135m.json
    python benchmarks/quant_quality_smollm2.py --tokens 8192 --plans teal,cats \
        --variants dense,int8,q4-rtn,int8-head,q4-rtn-head --out benchmarks/results/quant-quality-plans-smollm2-135m.json
"""
from __future__ import annotations

import argparse
import copy
import sys
import time


def make_plans(model, tok, methods, plan_tokens: int, window: int, root) -> dict:
    """{method: saved plan directory} of each 50% plan, calibrated on the dense model."""
    import actsparse as asp
    from actsparse.data.text import text, token_windows

    cal = token_windows(tok, text("wiki", "calibration"), window=window, max_tokens=plan_tokens)
    configs = {"teal": asp.TEAL(sparsity=0.5), "cats": asp.CATS(sparsity=0.5)}
    plans = {}
    for name in methods:
        m = copy.deepcopy(model)
        asp.sparsify_(m, configs[name], calibration=cal)
        plans[name] = asp.save_plan(m, f"{root}/{name}")
        del m
    return plans


def measure(bundle, *, tokens: int, calib_tokens: int, window: int, sample_rows: int, variants=None,
            plans=None) -> dict:
    import actsparse as asp
    from actsparse.data.text import text, token_windows
    from actsparse.eval.perplexity import perplexity
    from actsparse.quant import Int8Config, Q4Config, calibration_rows, quantize_

    model, tok = bundle.model, bundle.tokenizer
    held_out = token_windows(tok, text("wiki", "test"), window=window, max_tokens=tokens)
    calib = token_windows(tok, text("wiki", "calibration"), window=window, max_tokens=calib_tokens)
    configs = {"dense": None, "int8": Int8Config(), "q4-rtn": Q4Config(), "q4-awq": Q4Config(awq=True),
               "q4-rtn-down-transposed": Q4Config(transposed=("mlp.down",)),
               "int8-head": Int8Config(lm_head=True), "q4-rtn-head": Q4Config(lm_head=True)}
    variants = list(variants or configs)
    unknown = [v for v in variants if v not in configs]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(configs)}")
    t0 = time.time()
    rows = calibration_rows(model, calib, sample_rows) if "q4-awq" in variants else None  # AWQ's only
    calib_s = time.time() - t0
    runs = [(name, None) for name in variants]
    for method in plans or {}:
        runs += [(name, method) for name in ("dense", "int8", "q4-rtn", "q4-awq") if name in variants]
    out = {}
    for name, method in runs:
        cfg = configs[name]
        m = copy.deepcopy(model)
        t0 = time.time()
        plan = plans[method] if method else None
        desc = quantize_(m, cfg, calibration=rows, plan=plan) if cfg is not None else None
        q_s = time.time() - t0
        if plan is not None:
            asp.load_plan(m, plan)
        r = perplexity(m, held_out)
        key = f"{name}+{method}" if method else name
        entry = {"ppl": r.ppl, "interval95": list(r.interval()), "quantize_s": q_s, "plan": method}
        if method:
            entry["bytes_skipped"] = r.bytes_skipped
        if desc and desc["awq"]:
            alphas = [v["alpha"] for v in desc["awq"].values() if "alpha" in v]
            entry["awq_groups"] = len(alphas)
            entry["awq_skipped"] = {k: v["skipped"] for k, v in desc["awq"].items() if "skipped" in v}
            if alphas:  # every group skipped (e.g. all packed transposed for TEAL): AWQ is RTN
                entry["awq_alpha_mean"] = sum(alphas) / len(alphas)
                entry["awq_rel_err"] = sum(v["rel_err"] for v in desc["awq"].values() if "alpha" in v) / len(alphas)
                entry["rtn_rel_err"] = sum(v["rel_err_rtn"] for v in desc["awq"].values() if "alpha" in v) / len(alphas)
        out[key] = entry
        print(f"{key:>24}: ppl {r.ppl:.3f}", flush=True)
        del m
    return {"variants": out, "tokens": held_out.tokens, "calibration_tokens": calib.tokens, "window": window,
            "sample_rows": sample_rows, "calibration_s": calib_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="scored held-out tokens (default: %(default)s)")
    ap.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (default: %(default)s)")
    ap.add_argument("--sample-rows", type=int, default=512, help="AWQ rows per group input (default: %(default)s)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--variants", default="", help="formats to run, comma separated: dense, int8, q4-rtn, q4-awq, "
                    "q4-rtn-down-transposed, int8-head, q4-rtn-head (default: all); the plan rows use those of "
                    "dense / int8 / q4-rtn / q4-awq among them")
    ap.add_argument("--plans", default="", help="50%% plans to add, comma separated: teal, cats (default: none)")
    ap.add_argument("--plan-tokens", type=int, default=8192, help="plan calibration tokens (default: %(default)s)")
    ap.add_argument("--out", default="actsparse-out/quant-quality-smollm2-135m.json", help="JSON output (default: %(default)s)")
    args = ap.parse_args()
    import actsparse as asp
    from actsparse.io import write_json
    from actsparse.provenance import git_dirty, git_hash, machine_info

    import tempfile

    bundle = asp.load("smollm2-135m")
    methods = [m for m in args.plans.split(",") if m]
    bad = [m for m in methods if m not in ("teal", "cats")]
    if bad:
        ap.error(f"--plans: unknown method(s) {bad}; choose from teal, cats")
    with tempfile.TemporaryDirectory() as root:
        plans = make_plans(bundle.model, bundle.tokenizer, methods, args.plan_tokens, args.window, root)
        res = measure(bundle, tokens=args.tokens, calib_tokens=args.calib_tokens, window=args.window,
                      sample_rows=args.sample_rows, plans=plans,
                      variants=[v for v in args.variants.split(",") if v] or None)
    res["plan_tokens"] = args.plan_tokens if methods else None
    write_json(args.out, {"benchmark": "quant-quality", "model": "smollm2-135m", "dtype": "float32",
                          "data": {"eval": "wiki/test", "calibration": "wiki/calibration"}, **res,
                          "machine": machine_info(), "git": git_hash(short=False), "git_dirty": git_dirty(),
                          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
