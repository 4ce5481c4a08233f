"""Expert-block MLP step (Read-ME-style contiguous experts) against the dense gated MLP and
against CATS's scattered rows at the same fraction of neurons: one token, cold weights.

Cold cache: each engine runs once over every layer of a stack of random weights larger than
the L3 (SmolLM2's MLP 576/1536 x 30 layers; TinyLlama's 2048/5632 x 8), then the next engine,
in a random order per repeat; median of ``--repeats``. Engines (numba kernels called directly,
no torch wrapper overhead): ``dense`` (the three dense row-dot GEMVs, the down projection in
its normal layout), ``experts-all`` (the expert kernel with k = E: every block), ``experts-k``
(top-k of E experts from a random router), ``cats`` (the fused CATS step with the threshold at
the quantile that keeps the same fraction of neurons, so its up and down rows are scattered;
its gate stays dense). Speedup is over the best dense engine (``dense`` or ``experts-all``);
``of_ideal`` divides it by the weight bytes ratio (dense bytes / bytes read, router included).
Writes --out (default actsparse-out/expert-kernel.json).

    .venv/bin/python benchmarks/expert_kernel.py --out benchmarks/results/expert-kernel.json
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import numba
import numpy as np

from actsparse.io import write_json
from actsparse.kernels import numba_cpu as nc
from actsparse.provenance import machine_info

SHAPES = {"smollm2-135m": (576, 1536, 30), "llama-1.1b": (2048, 5632, 8)}
SILU = nc.ACT_CODES["silu"]


def _weights(rng, d, f, layers, experts, dtype):
    def mat(r, c, scale):
        w = (rng.standard_normal((r, c), dtype=np.float32) * scale)
        return (w.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bf16" else w
    return [dict(gate=mat(f, d, d ** -0.5), up=mat(f, d, d ** -0.5), down=mat(d, f, f ** -0.5),
                 down_t=mat(f, d, f ** -0.5), router=mat(experts, d, d ** -0.5),
                 router_b=np.zeros(experts, np.float32)) for _ in range(layers)]


def _engines(layers, d, f, experts, top_k, threads, keep_frac):
    x = np.random.default_rng(1).standard_normal(d).astype(np.float32)
    out, g, u, h = np.empty(d, np.float32), np.empty(f, np.float32), np.empty(f, np.float32), np.empty(f, np.float32)
    chosen_all, chosen_k = np.empty(experts, np.int64), np.empty(top_k, np.int64)
    # CATS threshold per layer: the |silu(gate x)| quantile that keeps keep_frac of the neurons
    thr = []
    for w in layers:
        gate = w["gate"].astype(np.uint32) << 16 if w["gate"].dtype == np.uint16 else w["gate"]
        a = gate.view(np.float32) @ x
        a = np.abs(a / (1 + np.exp(-a)))
        thr.append(np.array([np.quantile(a, 1 - keep_frac)], np.float32))

    def dense():
        for w in layers:
            nc.dense_gemv_rows(x, w["gate"], g, threads)
            nc.dense_gemv_rows(x, w["up"], u, threads)
            h[:] = g / (1 + np.exp(-g)) * u
            nc.dense_gemv_rows(h, w["down"], out, threads)

    def experts_all():
        for w in layers:
            nc.expert_mlp(x, w["gate"], w["up"], w["down_t"], w["router"], w["router_b"], experts, SILU, chosen_all,
                          out, threads)

    def experts_k():
        for w in layers:
            nc.expert_mlp(x, w["gate"], w["up"], w["down_t"], w["router"], w["router_b"], top_k, SILU, chosen_k,
                          out, threads)

    def cats():
        for i, w in enumerate(layers):
            nc.gated_mlp(x, w["gate"], w["up"], w["down_t"], thr[i], 0, SILU, out, threads)

    return {"dense": dense, "experts-all": experts_all, f"experts-{top_k}of{experts}": experts_k, "cats": cats}


def measure(model, dtype, threads, experts, top_k, repeats):
    d, f, n_layers = SHAPES[model]
    numba.set_num_threads(threads)
    layers = _weights(np.random.default_rng(0), d, f, n_layers, experts, dtype)
    keep = top_k / experts
    engines = _engines(layers, d, f, experts, top_k, threads, keep)
    wb = 2 if dtype == "bf16" else 4
    dense_bytes = 3 * d * f * wb * n_layers
    read = {"dense": dense_bytes, "experts-all": dense_bytes + experts * d * wb * n_layers,
            f"experts-{top_k}of{experts}": (3 * d * f * keep + experts * d) * wb * n_layers,
            "cats": (d * f + 2 * d * f * keep) * wb * n_layers}
    for fn in engines.values():
        fn()
    times = {k: [] for k in engines}
    for _ in range(repeats):
        order = list(engines)
        random.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            engines[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best_dense = min(med["dense"], med["experts-all"])
    rows = {}
    for k, t in med.items():
        speedup = best_dense / t
        ideal = dense_bytes / read[k]
        rows[k] = {"ms": 1e3 * t, "gb_s": read[k] / t / 1e9, "bytes": read[k], "speedup": speedup,
                   "ideal": ideal, "of_ideal": speedup / ideal, "runs_ms": [1e3 * v for v in times[k]]}
    return {"model": model, "dtype": dtype, "threads": threads, "experts": experts, "top_k": top_k,
            "layers": n_layers, "engines": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,llama-1.1b", help="shapes: %(default)s")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", default="8,4", help="experts computed per token, comma-separated (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default="actsparse-out/expert-kernel.json",
                    help="JSON path (default: %(default)s; the committed result is regenerated only with an "
                         "explicit --out benchmarks/results/expert-kernel.json)")
    args = ap.parse_args()
    groups = []
    for model in args.models.split(","):
        if model not in SHAPES:
            ap.error(f"unknown shape {model!r}; choose from {', '.join(SHAPES)}")
        for dtype in args.dtypes.split(","):
            if dtype not in ("bf16", "fp32"):
                ap.error(f"dtype must be bf16 or fp32, got {dtype!r}")
            for threads in (int(t) for t in args.threads.split(",")):
                for k in (int(v) for v in args.top_k.split(",")):
                    g = measure(model, dtype, threads, args.experts, k, args.repeats)
                    groups.append(g)
                    print(model, dtype, f"{threads}T", f"k={k}/{args.experts}", "  ".join(
                        f"{n} {r['ms']:.2f}ms {r['gb_s']:.1f}GB/s x{r['speedup']:.2f} ({r['of_ideal']:.2f})"
                        for n, r in g["engines"].items()), flush=True)
                    write_json(args.out, {"benchmark": "expert-kernel", "machine": machine_info(),
                                          "repeats": args.repeats, "groups": groups})


if __name__ == "__main__":
    main()
