"""Kernel benchmark on block-quantised weights (int8, q4): the input-sparse GEMV on the
transposed layout against the dense GEMV of the same format on the rows layout.

Same protocol as :mod:`actsparse.bench.kernel` (cold cache before every timed call, every
implementation and sparsity shuffled in each repeat). There is no torch GEMV on packed codes,
so the dense baselines are actsparse's own: the rows-layout GEMV (what a dense model runs) and
the transposed layout read with every input active (what a plan's input-sparse linear runs at
s = 0); the best of the two is the "best dense" of the format. For scale, the best torch bf16
GEMV of the same shape (:func:`actsparse.bench.kernel.bench_layer`'s candidates) is timed in the
same runs and each row also gets its speedup over it. Bytes read count codes + scales + mins
(the active rows only for the input-sparse GEMV).
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from actsparse.bench.kernel_groups import prescreen, run_group, summarise, threshold_for

QUANT_FORMATS = ("int8", "q4")


def bench_qlayer(out_f, in_f, fmt, threads, sparsities, repeats, flush, bar=None, seed=0, rng=None) -> dict:
    from actsparse.kernels.quant_dispatch import q_dense_gemv, q_input_sparse_gemv
    from actsparse.kernels.quant_formats import ROWS, TRANSPOSED, quantize_weight

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(in_f, generator=g)
    rows, trans = quantize_weight(W, fmt, ROWS), quantize_weight(W, fmt, TRANSPOSED)
    Wb = W.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    del W
    torch_bf16, _ = prescreen({"torch-bf16 F.linear": lambda: F.linear(xb, Wb), "torch-bf16 torch.mv": lambda: torch.mv(Wb, xb)})
    impls = {f"{fmt}-rows": lambda: q_dense_gemv(x, rows),
             f"{fmt}-transposed-all": lambda: q_input_sparse_gemv(x, trans, -1.0)}
    impls.update(torch_bf16)
    row_bytes = trans.nbytes // in_f
    meta = {}
    for s in sparsities:
        t = threshold_for(x, s)
        n_act = int((x.abs() > t).sum())
        key = f"sparse_s{s:g}"
        impls[key] = lambda t=t: q_input_sparse_gemv(x, trans, t)
        meta[key] = {"sparsity": s, "active": n_act, "bytes_read": n_act * row_bytes, "variant": "rowsplit"}
    for fn in impls.values():  # compile / warm
        fn()
    raw = run_group(impls, repeats, flush, bar, rng or random.Random(seed))
    res = summarise(raw, [f"{fmt}-rows", f"{fmt}-transposed-all"], meta, lambda s: 1.0 / (1.0 - s))
    bf16_best = min(torch_bf16, key=lambda k: res["stats"][k]["median_ms"])
    res.update(kind="layer", out_features=out_f, in_features=in_f, dtype=fmt, threads=threads,
               weight_bytes={"rows": rows.nbytes, "transposed": trans.nbytes, "bf16": Wb.numel() * 2},
               torch_bf16_best=bf16_best, torch_bf16_best_ms=res["stats"][bf16_best]["median_ms"])
    for r in res["rows"]:
        r["shape"] = f"{out_f}x{in_f}"
        r["speedup_vs_torch_bf16"] = res["torch_bf16_best_ms"] / r["median_ms"]
    return res
