"""Held-out perplexity of TEAL on SmolLM2-135M (fp32, wiki) unrotated vs rotated
(actsparse.sparsify.rotation): the global residual rotation only, and global + per-KV-head
rotation of the o_proj input. Every variant uses the same calibration windows (for the
rotation and TEAL's thresholds) and the same held-out windows (protocol all); the dense PPL
of each rotated model is reported (it must equal the unrotated one's). Writes the JSON after
every variant, e.g.

    python benchmarks/rotation_smollm2.py --tokens 8192 --calib-tokens 8192 --threads 1 \\
        --out benchmarks/results/rotation-smollm2-135m.json
"""
from __future__ import annotations

import argparse
import copy
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="scored held-out tokens (default: %(default)s)")
    ap.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (default: %(default)s)")
    ap.add_argument("--sparsity", type=float, default=0.5, help="TEAL target (default: %(default)s)")
    ap.add_argument("--window", type=int, default=1024, help="window length (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads, 0 = torch's default (default: %(default)s)")
    ap.add_argument("--variants", default="none,full,global", help="rotations, in order: none, full (global + "
                    "heads), global (default: %(default)s)")
    ap.add_argument("--out", default="actsparse-out/rotation-smollm2-135m.json",
                    help="JSON output (default: %(default)s)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import actsparse as asp
    from actsparse.data.text import text, token_windows
    from actsparse.io import write_json
    from actsparse.provenance import git_dirty, git_hash, machine_info
    from actsparse.sparsify.rotation import rotate_

    base, tok = asp.load("smollm2-135m")
    held_out = token_windows(tok, text("wiki", "test"), window=args.window, max_tokens=args.tokens)
    cal = token_windows(tok, text("wiki", "calibration"), window=args.window, max_tokens=args.calib_tokens)
    out = {"benchmark": "rotation", "model": "smollm2-135m", "dtype": "float32", "method": f"teal {args.sparsity}",
           "protocol": {"data": "wiki", "sparse_protocol": "all", "window": args.window,
                        "tokens": held_out.tokens, "windows": len(held_out), "calibration_tokens": cal.tokens},
           "variants": {}, "machine": machine_info(), "git": git_hash(short=False), "git_dirty": git_dirty(),
           "command": " ".join(sys.argv)}
    for variant in args.variants.split(","):
        if variant not in ("none", "full", "global"):
            ap.error(f"--variants: unknown {variant!r}")
        m = copy.deepcopy(base)
        t0 = time.time()
        if variant != "none":
            rotate_(m, cal, heads=variant == "full", describe={"data": "wiki", "split": "calibration"})
        rot_s = time.time() - t0
        dense = asp.perplexity(m, held_out)
        asp.sparsify_(m, asp.TEAL(sparsity=args.sparsity), calibration=cal)
        sparse = asp.perplexity(m, held_out)
        out["variants"][variant] = {"dense_ppl": dense.ppl, "teal_ppl": sparse.ppl, "ratio": sparse.ppl / dense.ppl,
                                    "teal_interval95": list(sparse.interval()), "bytes_skipped": sparse.bytes_skipped,
                                    "rotate_s": rot_s}
        print(f"{variant:>7}: dense {dense.ppl:.4f}  teal {sparse.ppl:.4f}  x{sparse.ppl / dense.ppl:.3f}", flush=True)
        out["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json(args.out, out)
        del m
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
