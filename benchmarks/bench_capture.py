"""Capture overhead: profiling SmolLM2-135M vs the plain forward pass, same run, interleaved.

    .venv/bin/python benchmarks/bench_capture.py [--tokens 16384] [--out benchmarks/results/capture.json]

Each batch of windows runs twice, plain and under capture(sites="default"), in random
order; the overhead is sum(capture) / sum(plain) and the median per-batch ratio. The
accumulator memory is recorded after every batch to show it does not grow with tokens.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

import actsparse as asp
from actsparse.data.text import text, token_windows
from actsparse.io import write_json
from actsparse.provenance import environment, git_hash


def stats_bytes(cap) -> int:
    return sum(t.numel() * t.element_size() for st in cap.stats().values() for t in st.to_tensors().values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--sites", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="actsparse-out/capture.json",
                    help="JSON path (default: %(default)s; the committed result is regenerated "
                         "only with an explicit --out benchmarks/results/capture.json)")
    args = ap.parse_args(argv)

    model, tok = asp.load(args.model)
    windows = token_windows(tok, text("wiki", "calibration"), window=args.window, max_tokens=args.tokens)
    batches = list(windows.batches(args.batch_size))
    cap = asp.capture(model, sites=args.sites)
    with cap, torch.no_grad():  # warm-up: compile the fused kernel, touch the weights
        model(**batches[0], use_cache=False)
    cap = asp.capture(model, sites=args.sites)
    rng = random.Random(args.seed)
    rows = []
    for i, batch in enumerate(batches):
        order = ["plain", "capture"]
        rng.shuffle(order)
        row = {"batch": i, "tokens": int(batch["attention_mask"].sum())}
        for mode in order:
            with torch.no_grad():
                if mode == "plain":
                    t0 = time.perf_counter()
                    model(**batch, use_cache=False)
                else:
                    with cap:
                        t0 = time.perf_counter()
                        model(**batch, use_cache=False)
                row[mode] = time.perf_counter() - t0
        row["ratio"] = row["capture"] / row["plain"]
        row["stats_bytes"] = stats_bytes(cap)
        row["tokens_so_far"] = sum(r["tokens"] for r in rows) + row["tokens"]
        rows.append(row)
        print(f"batch {i + 1}/{len(batches)}: plain {row['plain']:.2f}s capture {row['capture']:.2f}s "
              f"ratio {row['ratio']:.3f} stats {row['stats_bytes'] / 1e6:.2f} MB", flush=True)
    ratios = sorted(r["ratio"] for r in rows)
    git = git_hash()
    result = {
        "benchmark": "capture_overhead",
        "config": vars(args), "git": git, "environment": environment(),
        "sites": len(cap.sites), "tokens": sum(r["tokens"] for r in rows),
        "overhead_total": sum(r["capture"] for r in rows) / sum(r["plain"] for r in rows),
        "overhead_median": ratios[len(ratios) // 2],
        "overhead_p10_p90": [ratios[int(0.1 * (len(ratios) - 1))], ratios[int(0.9 * (len(ratios) - 1))]],
        "stats_bytes_first_last": [rows[0]["stats_bytes"], rows[-1]["stats_bytes"]],
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"overhead {result['overhead_total']:.3f}x total, {result['overhead_median']:.3f}x median; "
          f"stats memory {rows[0]['stats_bytes'] / 1e6:.2f} MB after {rows[0]['tokens_so_far']} tokens, "
          f"{rows[-1]['stats_bytes'] / 1e6:.2f} MB after {rows[-1]['tokens_so_far']} tokens -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
