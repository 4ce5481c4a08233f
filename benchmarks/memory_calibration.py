"""Peak memory of calibration against calibration tokens (SmolLM2-135M, fp32).

Each point runs in a fresh process: load the model, calibrate the default five-method sweep
(TEAL, CATS, CHESS, Top-K, WINA: one pass, plus CHESS's second pass) on N tokens of the wiki
calibration split in 1024-token windows, batch 4, and report the peak resident set size
(``ru_maxrss``) after loading and after calibrating. Writes JSON (default
``actsparse-out/memory-calibration.json``; the committed file is regenerated only with an
explicit ``--out benchmarks/results/memory-calibration.json``).

    .venv/bin/python benchmarks/memory_calibration.py --tokens 2048,4096,8192
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
import torch
import actsparse as asp
from actsparse.data.text import text, token_windows
from actsparse.sparsify.registry import make_config
tokens, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
model, tok = asp.load("smollm2-135m")
cal = token_windows(tok, text("wiki", "calibration"), window=1024, max_tokens=tokens)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
stats = asp.calibrate(model, [make_config(m, 0.5) for m in ("teal", "cats", "chess", "topk", "wina")], cal)
print(json.dumps({"tokens": cal.tokens, "windows": len(cal), "peak_after_load_kb": loaded,
                  "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "calibrate_s": time.perf_counter() - t0, "statistics": len(stats)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="2048,4096,8192",
                    help="comma-separated calibration token counts (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    ap.add_argument("--out", default="actsparse-out/memory-calibration.json",
                    help="JSON output (default: %(default)s)")
    args = ap.parse_args()
    from actsparse.io import write_json
    from actsparse.provenance import git_hash, machine_info

    rows = []
    # a first run compiles (or loads) the numba kernels, so no point measures the compiler
    subprocess.run([sys.executable, "-c", CHILD, "1024", str(args.threads)], capture_output=True, check=True)
    for n in [int(t) for t in args.tokens.split(",")]:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(args.threads)], capture_output=True,
                             text=True, check=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["peak_gb"] = row["peak_kb"] / 2**20
        row["calibration_gb"] = (row["peak_kb"] - row["peak_after_load_kb"]) / 2**20
        rows.append(row)
        print(f"{row['tokens']:>6} tokens: peak {row['peak_gb']:.2f} GB ({row['calibration_gb']:.2f} GB above the "
              f"loaded model), {row['calibrate_s']:.0f} s", flush=True)
    write_json(args.out, {"benchmark": "memory-calibration", "model": "smollm2-135m", "dtype": "float32",
                          "methods": ["teal", "cats", "chess", "topk", "wina"], "window": 1024, "batch_size": 4,
                          "threads": args.threads, "machine": machine_info(), "git": git_hash(short=False),
                          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
