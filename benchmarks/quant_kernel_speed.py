"""Single-thread dense GEMV throughput on int8 / q4 (quant_numba) vs bf16 / fp32 (numba_cpu),
and the input-sparse GEMV at 50% active inputs, cold cache (a flush before every call),
interleaved repeats (actsparse.bench.timing). GB/s counts the bytes a call reads (codes,
scales, mins; for the input-sparse call, the active rows only).

    python benchmarks/quant_kernel_speed.py --out benchmarks/results/quant-kernel-speed.json
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import numpy as np
import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--flush-mb", type=int, default=64)
    ap.add_argument("--shapes", default="1536x576,49152x576")
    ap.add_argument("--out", default="actsparse-out/quant-kernel-speed.json", help="JSON output (default: %(default)s)")
    args = ap.parse_args()
    import numba

    from actsparse.bench.timing import Flusher, interleaved, spread
    from actsparse.io import write_json
    from actsparse.kernels import numba_cpu as K
    from actsparse.kernels import quant_numba as Q
    from actsparse.kernels.formats import numpy_view
    from actsparse.kernels.quant_formats import quantize_weight
    from actsparse.provenance import git_hash, machine_info

    numba.set_num_threads(1)
    flush = Flusher(args.flush_mb)
    rows = []
    for shape in args.shapes.split(","):
        M, N = (int(v) for v in shape.split("x"))
        w = torch.randn(M, N) / N ** 0.5
        x = torch.randn(N)
        xn = x.numpy()
        out = np.empty(M, np.float32)
        runs, nbytes = {}, {}
        for dt, t in (("fp32", w), ("bf16", w.to(torch.bfloat16))):
            wn = numpy_view(t.contiguous())
            runs[f"dense-{dt}"] = lambda wn=wn: K.dense_gemv_rows(xn, wn, out, 1)
            nbytes[f"dense-{dt}"] = wn.nbytes
        for fmt in ("int8", "q4"):
            c, s, m = quantize_weight(w, fmt).numpy()
            runs[f"dense-{fmt}"] = lambda c=c, s=s, m=m: Q.q_dense_gemv(xn, c, s, m, out, 1)
            nbytes[f"dense-{fmt}"] = c.nbytes + s.nbytes + m.nbytes
            # input-sparse on the transposed layout of a (N x M) weight: x has M entries, half active
            qt = quantize_weight(w.t().contiguous(), fmt, "transposed") if N % 32 == 0 else None
            if qt is not None:
                ct, st_, mt = qt.numpy()
                xs = np.random.default_rng(0).standard_normal(M).astype(np.float32)
                thr = np.array([np.median(np.abs(xs))], np.float32)
                outn = np.empty(N, np.float32)
                runs[f"insparse50-{fmt}"] = lambda ct=ct, st_=st_, mt=mt, xs=xs, thr=thr, outn=outn: \
                    Q.q_input_sparse_gemv(xs, ct, st_, mt, thr, 0, outn, 1) and None
                nbytes[f"insparse50-{fmt}"] = (ct.nbytes + st_.nbytes + mt.nbytes) / 2
        for fn in runs.values():  # compile / warm
            fn()
        raw = interleaved({k: (lambda f=f: (f(), None)[1]) for k, f in runs.items()}, args.repeats,
                          rng=random.Random(0), before=flush)
        for k, ts in raw.items():
            sp = spread(ts)
            rows.append({"shape": shape, "impl": k, "seconds": sp, "bytes": nbytes[k],
                         "gb_per_s": nbytes[k] / sp["median"] / 1e9})
            print(f"{shape:>10} {k:>16}: {sp['median'] * 1e6:8.1f} us  {nbytes[k] / sp['median'] / 1e9:6.2f} GB/s",
                  flush=True)
    write_json(args.out, {"benchmark": "quant-kernel-speed", "threads": 1, "flush_mb": args.flush_mb,
                          "repeats": args.repeats, "rows": rows, "machine": machine_info(),
                          "git": git_hash(short=False), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
