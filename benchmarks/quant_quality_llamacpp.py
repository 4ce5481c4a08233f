"""Held-out perplexity of SmolLM2-135M as llama.cpp runs it: its F32 / Q8_0 / Q4_0 requantisations
of the embedded GGUF (the files of ``bench decode --weights``'s llama.cpp engines), scored through
llama.cpp's own logits (``logits_all``) on the same wiki test windows and with the same count as
``benchmarks/quant_quality_smollm2.py`` (BOS-first non-overlapping windows; token t scored from
the logits at t-1 where both are real tokens). F32 is the check: it should give that script's
dense figure. llama.cpp runs with an fp32 KV cache here. Writes a JSON with the provenance, e.g.

    python benchmarks/quant_quality_llamacpp.py --out benchmarks/results/quant-quality-smollm2-135m-llamacpp.json
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np


def window_nll(llm, ids: list[int], mask: list[int]) -> tuple[float, int]:
    """Summed NLL (nats) and count of one window's scored tokens, from llama.cpp's logits."""
    n = int(sum(mask))  # the padding is only at the end
    llm.reset()
    llm.eval(ids[:n])
    logits = np.asarray(llm.scores[: n - 1], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    logz = (top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))
    target = logits[np.arange(n - 1), ids[1:n]]
    return float((logz - target).sum()), n - 1


def measure(formats, *, tokens: int, window: int, threads: int) -> dict:
    import llama_cpp

    import actsparse as asp
    from actsparse.bench.decode import llama_gguf
    from actsparse.data.text import text, token_windows

    _, tok = asp.load("smollm2-135m")
    held_out = token_windows(tok, text("wiki", "test"), window=window, max_tokens=tokens)
    rows = [(r.tolist(), m.tolist()) for r, m in zip(held_out.input_ids, held_out.attention_mask)]
    out = {}
    for fmt in formats:
        path = llama_gguf("smollm2-135m", fmt)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=window, n_batch=window, n_ubatch=window, n_threads=threads,
                              n_threads_batch=threads, logits_all=True, verbose=False,
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        t0 = time.time()
        nll, count = 0.0, 0
        for ids, mask in rows:
            s, c = window_nll(llm, ids, mask)
            nll, count = nll + s, count + c
        out[fmt] = {"gguf": path.name, "ppl": math.exp(nll / count), "scored": count, "eval_s": time.time() - t0}
        print(f"{fmt:>8}: ppl {out[fmt]['ppl']:.3f} ({count} tokens)", flush=True)
        del llm
    return {"variants": out, "tokens": held_out.tokens, "window": window}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens (default: %(default)s, what the committed quant-quality-smollm2-135m.json used: 8,209 with the BOS)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="float32,q8_0,q4_0")
    ap.add_argument("--out", default="actsparse-out/quant-quality-smollm2-135m-llamacpp.json",
                    help="JSON output (default: %(default)s)")
    args = ap.parse_args()
    from actsparse.io import write_json
    from actsparse.provenance import git_dirty, git_hash, machine_info

    res = measure(args.formats.split(","), tokens=args.tokens, window=args.window, threads=args.threads)
    write_json(args.out, {"benchmark": "quant-quality-llamacpp", "model": "smollm2-135m", "engine": "llama.cpp",
                          "data": {"eval": "wiki/test"}, **res, "machine": machine_info(),
                          "git": git_hash(short=False), "git_dirty": git_dirty(),
                          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
