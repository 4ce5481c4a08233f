"""Kernel benchmark: activation-sparse GEMV and the fused gated MLP vs the best dense.

Protocol (see shared/specs/benchmarks.md):
- cold cache: before every timed call a buffer larger than the L3 is read
  (``flush_mb``, default 256 MiB; the L3 here is 32 MiB), so weights come from DRAM;
- every (implementation, sparsity) of one shape/dtype/threads group is timed in a
  random order in each repeat, so slow drifts of a shared machine hit all alike;
- the dense baseline is the fastest of several torch options for the same dtype
  and threads (F.linear, torch.mv, x @ W^T with the transposed weight, torch.matmul),
  picked by a short warm pre-screen; candidates far slower than the best are
  dropped before the timed loop (recorded in the JSON);
- reported: median, p10/p90, IQR, effective GB/s (bytes actually read / time),
  speedup vs the best dense, and that speedup as a fraction of the ideal
  1/(1-s) (one layer) or 3/(1+2(1-s)) (gated MLP: gate stays dense).
"""
from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from actsparse.bench.kernel_groups import prescreen, run_group, summarise, threshold_for
from actsparse.bench.timing import Flusher
from actsparse.provenance import machine_info

LAYER_SHAPES = [(5632, 2048), (2048, 5632), (11008, 4096), (4096, 11008)]  # (out, in)
LAYER_SPARSITIES = [0.0, 0.5, 0.7, 0.9, 0.95]
MLP_SHAPE = (4096, 11008)  # (hidden, intermediate)
MLP_SPARSITIES = [0.0, 0.5, 0.7, 0.9]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------
def bench_layer(out_f, in_f, dtype, threads, sparsities, repeats, flush, bar=None, seed=0,
                colsplit=True, rng=None) -> dict:
    from actsparse.kernels import numba_cpu as nc
    from actsparse.kernels.dispatch import sparse_input_gemv
    from actsparse.kernels.formats import numpy_view
    from actsparse.numba_backend import kernel_threads

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g).to(dtype)
    Wt = W.t().contiguous()
    x = torch.randn(in_f, generator=g).to(dtype)
    el = W.element_size()
    cands = {
        "F.linear": lambda: F.linear(x, W),
        "torch.mv": lambda: torch.mv(W, x),
        "x@Wt": lambda: x @ Wt,
        "torch.matmul": lambda: torch.matmul(W, x),
    }
    dense, pre = prescreen(cands)
    impls = dict(dense)
    out = torch.empty(out_f, dtype=dtype)
    meta = {}
    for s in sparsities:
        t = threshold_for(x, s)
        n_act = int((x.float().abs() > t).sum())
        key = f"sparse_s{s:g}"
        impls[key] = lambda t=t: sparse_input_gemv(x, Wt, t, out=out)
        meta[key] = {"sparsity": s, "active": n_act, "bytes_read": n_act * out_f * el,
                     "variant": "rowsplit"}
        if colsplit and threads > 1 and s in (0.5, 0.9):
            thr = np.array([t], np.float32)
            xn, wn, on = numpy_view(x), numpy_view(Wt), numpy_view(out)
            key = f"colsplit_s{s:g}"
            impls[key] = lambda thr=thr, xn=xn, wn=wn, on=on: nc.input_sparse_gemv_colsplit(
                xn, wn, thr, 0, on, kernel_threads())
            meta[key] = {**meta[f"sparse_s{s:g}"], "variant": "colsplit"}
    for fn in impls.values():  # compile / warm
        fn()
    raw = run_group(impls, repeats, flush, bar, rng or random.Random(seed))
    res = summarise(raw, list(dense), meta, lambda s: 1.0 / (1.0 - s))
    res.update(kind="layer", out_features=out_f, in_features=in_f, dtype=str(dtype).split(".")[-1],
               threads=threads, dense_prescreen_warm_ms=pre, weight_bytes=W.numel() * el)
    for r in res["rows"]:
        r["shape"] = f"{out_f}x{in_f}"
    return res


def bench_mlp(hidden, inter, dtype, threads, sparsities, repeats, flush, bar=None, seed=0,
              act="silu", rng=None) -> dict:
    from actsparse.kernels import gated_mlp_step, to_kernel_layout
    from actsparse.kernels.reference import activation

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    Wg = (torch.randn(inter, hidden, generator=g) / math.sqrt(hidden)).to(dtype)
    Wu = (torch.randn(inter, hidden, generator=g) / math.sqrt(hidden)).to(dtype)
    Wd = (torch.randn(hidden, inter, generator=g) / math.sqrt(inter)).to(dtype)  # (out, in)
    Wdt = to_kernel_layout(Wd)
    x = torch.randn(hidden, generator=g).to(dtype)
    el = Wg.element_size()
    actf = {"silu": F.silu}.get(act, lambda v: activation(v, act))

    def dense_with(lin):
        def fn():
            a = actf(lin(x, Wg, 0))
            h = a * lin(x, Wu, 1)
            return lin(h, Wd, 2)

        return fn

    Ts = {0: Wg.t().contiguous(), 1: Wu.t().contiguous(), 2: Wdt}
    cands = {
        "F.linear": dense_with(lambda v, W, i: F.linear(v, W)),
        "torch.mv": dense_with(lambda v, W, i: torch.mv(W, v)),
        "x@Wt": dense_with(lambda v, W, i: v @ Ts[i]),
    }
    dense, pre = prescreen(cands)
    impls = dict(dense)
    out = torch.empty(hidden, dtype=dtype)
    a_ref = activation(F.linear(x.float(), Wg.float()), act)
    meta = {}
    for s in sparsities:
        t = threshold_for(a_ref, s)
        _, n_act = gated_mlp_step(x, Wg, Wu, Wdt, t, act, out=out, return_active=True)
        key = f"gated_s{s:g}"
        impls[key] = lambda t=t: gated_mlp_step(x, Wg, Wu, Wdt, t, act, out=out)
        meta[key] = {"sparsity": s, "active": n_act,
                     "bytes_read": (inter * hidden + 2 * n_act * hidden) * el}
    for fn in impls.values():
        fn()
    raw = run_group(impls, repeats, flush, bar, rng or random.Random(seed))
    res = summarise(raw, list(dense), meta, lambda s: 3.0 / (1.0 + 2.0 * (1.0 - s)))
    res.update(kind="gated_mlp", hidden=hidden, intermediate=inter, act=act,
               dtype=str(dtype).split(".")[-1], threads=threads, dense_prescreen_warm_ms=pre,
               weight_bytes=3 * inter * hidden * el)
    for r in res["rows"]:
        r["shape"] = f"mlp {hidden}/{inter}"
    return res


# ---------------------------------------------------------------------------
def run(
    shapes=None,
    dtypes=("fp32", "bf16"),
    threads=(1, 2),
    sparsities=None,
    mlp_shape=MLP_SHAPE,
    mlp_sparsities=None,
    repeats=21,
    flush_mb=256,
    seed=0,
    progress=True,
) -> dict:
    """Run the whole benchmark; returns the JSON-able result dict."""
    from actsparse.kernels import backend

    from actsparse.bench.kernel_quant import QUANT_FORMATS, bench_qlayer

    shapes = list(LAYER_SHAPES if shapes is None else shapes)
    sparsities = list(LAYER_SPARSITIES if sparsities is None else sparsities)
    mlp_sparsities = list(MLP_SPARSITIES if mlp_sparsities is None else mlp_sparsities)
    rng = random.Random(seed)
    old_threads = torch.get_num_threads()
    flush = Flusher(flush_mb)
    n_dense_max = 4
    total = 0
    for dt in dtypes:
        for nt in threads:
            n_col = 2 if nt > 1 and dt not in QUANT_FORMATS else 0
            total += len(shapes) * (n_dense_max + len(sparsities) + n_col) * repeats
            if mlp_shape and dt not in QUANT_FORMATS:
                total += (3 + len(mlp_sparsities)) * repeats
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="bench kernel", unit="call")
    config = {
        "shapes_out_x_in": [list(s) for s in shapes],
        "dtypes": list(dtypes),
        "threads": list(threads),
        "sparsities": sparsities,
        "mlp_hidden_intermediate": list(mlp_shape) if mlp_shape else None,
        "mlp_sparsities": mlp_sparsities,
        "mlp_act": "silu",
        "repeats": repeats,
        "cache": f"cold: read a {flush_mb} MiB buffer before every timed call" if flush_mb
        else "warm (no flush)",
        "order": "implementations and sparsities shuffled in every repeat",
        "threshold": "scalar, set on the benchmark vector so that round((1-s)*n) inputs are active",
        "backend": backend(),
        "seed": seed,
    }
    t_start = time.time()
    groups = []
    try:
        for dt in dtypes:
            for nt in threads:
                for (o, i) in shapes:
                    if bar is not None:
                        bar.set_postfix_str(f"{o}x{i} {dt} t{nt}")
                    if dt in QUANT_FORMATS:
                        groups.append(bench_qlayer(o, i, dt, nt, sparsities, repeats, flush, bar, seed, rng=rng))
                    else:
                        groups.append(bench_layer(o, i, DTYPES[dt], nt, sparsities, repeats, flush,
                                                  bar, seed, rng=rng))
                if mlp_shape and dt not in QUANT_FORMATS:
                    if bar is not None:
                        bar.set_postfix_str(f"mlp {dt} t{nt}")
                    groups.append(bench_mlp(mlp_shape[0], mlp_shape[1], DTYPES[dt], nt,
                                            mlp_sparsities, repeats, flush, bar, seed, rng=rng))
    finally:
        torch.set_num_threads(old_threads)
        if bar is not None:
            bar.close()
    info = machine_info()
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    table = [
        {k: r[k] for k in ("shape", "impl", "sparsity", "active", "speedup", "fraction_of_ideal",
                           "effective_GBps", "median_ms", "p10_ms", "p90_ms")}
        | {"dtype": g["dtype"], "threads": g["threads"], "best_dense": g["best_dense"],
           "best_dense_ms": g["best_dense_ms"]}
        for g in groups for r in g["rows"]
    ]
    return {
        "benchmark": "kernel",
        "machine": info,
        "config": config,
        "wall_s": time.time() - t_start,
        "summary": table,
        "groups": groups,
    }


def plot(result: dict, path) -> Path:
    """Speedup vs sparsity per shape (one panel each), a line per dtype/threads, with
    the ideal curve; error bars from p10/p90."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = []
    for g in result["groups"]:
        for r in g["rows"]:
            if r["shape"] not in shapes:
                shapes.append(r["shape"])
    n = len(shapes)
    cols = min(3, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 4 * rows_n), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        ideal_drawn = False
        for g in result["groups"]:
            rs = [r for r in g["rows"] if r["shape"] == shape and r.get("variant", "rowsplit")
                  == "rowsplit"]
            if not rs:
                continue
            rs.sort(key=lambda r: r["sparsity"])
            s = [r["sparsity"] for r in rs]
            sp = [r["speedup"] for r in rs]
            lo = [r["speedup"] - r["speedup_p10_p90"][0] for r in rs]
            hi = [r["speedup_p10_p90"][1] - r["speedup"] for r in rs]
            ax.errorbar(s, sp, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], marker="o",
                        capsize=2, label=f"{g['dtype']} {g['threads']}t")
            if not ideal_drawn:
                ss = np.linspace(0, max(s), 50)
                ideal = (3 / (1 + 2 * (1 - ss))) if g["kind"] == "gated_mlp" else 1 / (1 - ss)
                ax.plot(ss, ideal, "k--", lw=1, label="ideal (vs own dense bytes)")
                ideal_drawn = True
        ax.set_title(f"{shape} (out x in)" if "mlp" not in shape else shape + " (gated MLP)")
        ax.set_xlabel("sparsity s")
        ax.set_ylabel("speedup vs best dense (torch; own format for int8/q4)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"actsparse kernels, cold cache, {result['machine'].get('cpu_model', '')}",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
