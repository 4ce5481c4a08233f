"""Where SmolLM2's decode time goes (FastDecoder, bf16): ms per token dense, TEAL 50%, and with
every linear input masked (what stays: lm_head, norms, RoPE, attention, compaction); plus the
lm_head GEMV alone. Interleaved runs, median. Writes --out (default actsparse-out/decode-profile.json).

    .venv/bin/python benchmarks/profile_decode_smollm2.py --threads 1,2 --out benchmarks/results/decode-profile.json
"""
import argparse
import random
import statistics
import time

import numpy as np
import torch

import actsparse as asp
from actsparse.data.text import text, token_windows
from actsparse.decode import FastDecoder
from actsparse.decode.plan import SITE_ROLE
from actsparse.decode.step import _dense_rows
from actsparse.io import write_json
from actsparse.kernels.formats import numpy_view
from actsparse.models.sitemaps import site_map
from actsparse.sparsify.modules import MaskedLinear


def profile(threads: int, stats, repeats: int, new_tokens: int) -> dict:
    torch.set_num_threads(threads)
    model, tok = asp.load("smollm2-135m", dtype="bfloat16")
    ids = tok("The history of the city of Paris", return_tensors="pt").input_ids[0]
    decs = {"dense": FastDecoder(model, max_len=ids.numel() + new_tokens + 1, dense=True)}
    asp.sparsify_(model, asp.TEAL(sparsity=0.5), stats=stats)
    decs["teal50"] = FastDecoder(model, max_len=ids.numel() + new_tokens + 1)
    asp.desparsify_(model)
    smap = site_map(model)
    for layer in range(smap.num_layers):
        for role in SITE_ROLE.values():
            path = smap.module_path(layer, role)
            model.set_submodule(path, MaskedLinear(model.get_submodule(path), float("inf")))
    decs["all_inputs_masked"] = FastDecoder(model, max_len=ids.numel() + new_tokens + 1)
    for d in decs.values():
        d.generate(ids, 3)
    ms = {k: [] for k in decs}
    for _ in range(repeats):
        order = list(decs)
        random.shuffle(order)
        for k in order:
            ms[k].append(1000 / decs[k].generate(ids, new_tokens).tokens_per_s)
    head = numpy_view(model.get_output_embeddings().weight)
    x, out, t = np.random.randn(head.shape[1]).astype(np.float32), np.empty(head.shape[0], np.float32), []
    for _ in range(21):
        t0 = time.perf_counter()
        _dense_rows(x, head, out, threads)
        t.append(1000 * (time.perf_counter() - t0))
    return {"threads": threads, "ms_per_token": {k: statistics.median(v) for k, v in ms.items()},
            "runs_ms": ms, "lm_head_ms": statistics.median(t[1:])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--out", default="actsparse-out/decode-profile.json",
                    help="JSON path (default: %(default)s; the committed result is regenerated "
                         "only with an explicit --out benchmarks/results/decode-profile.json)")
    args = ap.parse_args()
    model, tok = asp.load("smollm2-135m")
    cal = token_windows(tok, text("wiki", "calibration"), window=256, max_tokens=1024)
    stats = asp.calibrate(model, [asp.TEAL(sparsity=0.5)], cal)
    rows = [profile(int(t), stats, args.repeats, args.new_tokens) for t in args.threads.split(",")]
    for r in rows:
        print(r["threads"], "threads, ms/token:", {k: round(v, 2) for k, v in r["ms_per_token"].items()},
              "lm_head:", round(r["lm_head_ms"], 2))
    write_json(args.out, {"benchmark": "decode-profile", "model": "smollm2-135m", "dtype": "bfloat16",
                          "calibration_tokens": cal.tokens, "new_tokens": args.new_tokens, "rows": rows})


if __name__ == "__main__":
    main()
