"""Held-out perplexity of SmolLM2-135M quantised: dense fp32 vs int8 vs q4 RTN vs q4 AWQ.

Calibration: the wiki "calibration" split (AWQ rows: ``--sample-rows`` per linear group input);
evaluation: the wiki "test" split, non-overlapping windows, ``--tokens`` scored tokens (the
same windows for every variant). Writes a JSON with the machine, CPU and git state
(actsparse.provenance) to ``--out``, e.g.

    python benchmarks/quant_quality_smollm2.py --tokens 16384 \
        --out benchmarks/results/quant-quality-smollm2-135m.json
"""
from __future__ import annotations

import argparse
import copy
import sys
import time


def measure(bundle, *, tokens: int, calib_tokens: int, window: int, sample_rows: int, variants=None) -> dict:
    from actsparse.data.text import text, token_windows
    from actsparse.eval.perplexity import perplexity
    from actsparse.quant import Int8Config, Q4Config, calibration_rows, quantize_

    model, tok = bundle.model, bundle.tokenizer
    held_out = token_windows(tok, text("wiki", "test"), window=window, max_tokens=tokens)
    calib = token_windows(tok, text("wiki", "calibration"), window=window, max_tokens=calib_tokens)
    t0 = time.time()
    rows = calibration_rows(model, calib, sample_rows)
    calib_s = time.time() - t0
    configs = {"dense": None, "int8": Int8Config(), "q4-rtn": Q4Config(), "q4-awq": Q4Config(awq=True),
               "q4-rtn-down-transposed": Q4Config(transposed=("mlp.down",))}
    out = {}
    for name in variants or configs:
        cfg = configs[name]
        m = copy.deepcopy(model)
        t0 = time.time()
        desc = quantize_(m, cfg, calibration=rows) if cfg is not None else None
        q_s = time.time() - t0
        r = perplexity(m, held_out)
        entry = {"ppl": r.ppl, "interval95": list(r.interval()), "quantize_s": q_s}
        if desc and desc["awq"]:
            alphas = [v["alpha"] for v in desc["awq"].values() if "alpha" in v]
            entry["awq_alpha_mean"] = sum(alphas) / len(alphas)
            entry["awq_groups"] = len(alphas)
            entry["awq_skipped"] = {k: v["skipped"] for k, v in desc["awq"].items() if "skipped" in v}
            entry["awq_rel_err"] = sum(v["rel_err"] for v in desc["awq"].values() if "alpha" in v) / len(alphas)
            entry["rtn_rel_err"] = sum(v["rel_err_rtn"] for v in desc["awq"].values() if "alpha" in v) / len(alphas)
        out[name] = entry
        print(f"{name:>24}: ppl {r.ppl:.3f}", flush=True)
        del m
    return {"variants": out, "tokens": held_out.tokens, "calibration_tokens": calib.tokens, "window": window,
            "sample_rows": sample_rows, "calibration_s": calib_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="scored held-out tokens (default: %(default)s)")
    ap.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (default: %(default)s)")
    ap.add_argument("--sample-rows", type=int, default=512, help="AWQ rows per group input (default: %(default)s)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", default="actsparse-out/quant-quality-smollm2-135m.json", help="JSON output (default: %(default)s)")
    args = ap.parse_args()
    import actsparse as asp
    from actsparse.io import write_json
    from actsparse.provenance import git_dirty, git_hash, machine_info

    res = measure(asp.load("smollm2-135m"), tokens=args.tokens, calib_tokens=args.calib_tokens, window=args.window,
                  sample_rows=args.sample_rows)
    write_json(args.out, {"benchmark": "quant-quality", "model": "smollm2-135m", "dtype": "float32",
                          "data": {"eval": "wiki/test", "calibration": "wiki/calibration"}, **res,
                          "machine": machine_info(), "git": git_hash(short=False), "git_dirty": git_dirty(),
                          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
