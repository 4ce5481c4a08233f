"""Shared pieces of the kernel benchmarks (:mod:`actsparse.bench.kernel`,
:mod:`actsparse.bench.kernel_quant`): thresholds for an exact sparsity, the warm pre-screen of
dense candidates, the cold interleaved timing of one group and its summary rows."""
from __future__ import annotations

import time

import numpy as np
import torch

from actsparse.bench.timing import interleaved, spread


def time_stats(ts: list[float]) -> dict:
    sp = spread(np.asarray(ts) * 1e3)
    return {"median_ms": sp["median"], "p10_ms": sp["p10"], "p90_ms": sp["p90"], "iqr_ms": sp["iqr"]}


def threshold_for(v: torch.Tensor, s: float) -> float:
    """A scalar threshold leaving exactly round((1-s) n) of |v| above it."""
    a = torch.sort(v.float().abs(), descending=True).values
    keep = int(round((1.0 - s) * a.numel()))
    if keep >= a.numel():
        return -1.0
    if keep == 0:
        return float(a[0]) * 2 + 1
    return (float(a[keep - 1]) + float(a[keep])) / 2


def prescreen(cands: dict, reps: int = 3, keep_within: float = 1.5) -> tuple[dict, dict]:
    """Warm timing of each dense candidate; keep those within ``keep_within`` of the best."""
    times = {}
    for name, fn in cands.items():
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        times[name] = min(ts) * 1e3
    best = min(times.values())
    kept = {k: v for k, v in cands.items() if times[k] <= keep_within * best}
    return kept, times


def run_group(impls: dict, repeats: int, flush: Flusher, bar, rng: random.Random) -> dict:
    """Time every impl ``repeats`` times, cold, interleaved in a random order."""
    def timed(fn):  # measured by wall clock: the runner returns None
        return lambda: (fn(), None)[1]

    return interleaved({k: timed(fn) for k, fn in impls.items()}, repeats, rng=rng, before=flush,
                       after=(lambda _k: bar.update(1)) if bar is not None else None)


def summarise(raw, dense_names, sparse_meta, ideal) -> dict:
    stats = {k: time_stats(v) for k, v in raw.items()}
    best_dense = min(dense_names, key=lambda k: stats[k]["median_ms"])
    t_dense = stats[best_dense]["median_ms"]
    rows = []
    for key, meta in sparse_meta.items():
        st = stats[key]
        s = meta["sparsity"]
        sp = t_dense / st["median_ms"]
        rows.append(
            {
                "impl": key,
                **meta,
                **st,
                "speedup": sp,
                "speedup_p10_p90": [t_dense / st["p90_ms"], t_dense / st["p10_ms"]],
                "ideal": ideal(s),
                "fraction_of_ideal": sp / ideal(s),
                "effective_GBps": meta["bytes_read"] / (st["median_ms"] * 1e-3) / 1e9,
            }
        )
    return {
        "best_dense": best_dense,
        "best_dense_ms": t_dense,
        "dense": {k: stats[k] for k in dense_names},
        "stats": stats,
        "rows": rows,
        "raw_ms": {k: [t * 1e3 for t in v] for k, v in raw.items()},
    }
