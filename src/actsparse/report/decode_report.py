"""The demo's decode-speed comparison: FastDecoder dense vs sparse plans, same dtype and
threads, interleaved runs; and its report section (also renders a saved bench decode JSON)."""
from __future__ import annotations

import random
import statistics

from actsparse.report.document import Report


def measure_decode(model, tok, plans: dict, *, new_tokens: int = 32, repeats: int = 3,
                   prompt: str = "The history of the city of Paris", seed: int = 0) -> dict:
    """tokens/s of FastDecoder on ``model`` dense and under each plan (name -> callable that
    sparsifies the model in place); runs interleaved in a random order per repeat."""
    import torch

    from actsparse.decode import FastDecoder
    from actsparse.sparsify.api import desparsify_

    ids = tok(prompt, return_tensors="pt").input_ids[0]
    max_len = ids.numel() + new_tokens + 1
    decoders = {"dense": FastDecoder(model, max_len=max_len, dense=True)}
    samples = {}
    for name, apply in plans.items():
        apply(model)
        decoders[name] = FastDecoder(model, max_len=max_len)  # keeps its thresholds after desparsify_
        desparsify_(model)
    for dec in decoders.values():
        dec.generate(ids, 3)  # compile / load the kernel cache
    runs = {n: [] for n in decoders}
    rng = random.Random(seed)
    for _ in range(repeats):
        order = list(decoders)
        rng.shuffle(order)
        for n in order:
            r = decoders[n].generate(ids, new_tokens)
            runs[n].append(r.tokens_per_s)
            samples[n] = tok.decode(r.tokens)
    dense = statistics.median(runs["dense"])
    rows = []
    for n, xs in runs.items():
        med = statistics.median(xs)
        rows.append({"engine": n, "tokens_per_s": med, "runs": xs, "speedup": med / dense,
                     "decode_sparsity": decoders[n].decode_sparsity() if n != "dense" else {},
                     "weight_skip": decoders[n].weight_skip() if n != "dense" else {},
                     "sample": samples[n]})
    return {"dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "new_tokens": new_tokens, "repeats": repeats, "prompt": prompt, "rows": rows}


def add_decode_section(report: Report, doc: dict, title: str = "Decode speed (batch 1, FastDecoder)") -> None:
    report.heading(title)
    report.text(f"Greedy decoding of {doc['new_tokens']} tokens after the prompt \"{doc['prompt']}\", "
                f"{doc['dtype']} weights, {doc['threads']} threads, {doc['repeats']} interleaved runs per engine "
                "(median). Same engine for all rows, so the ratio is the sparsity's; the full benchmark is "
                "`actsparse bench decode`.")
    table = []
    for r in doc["rows"]:
        skipped = ", ".join(f"{k} {v:.0%}" for k, v in r.get("weight_skip", {}).items() if v > 0) or "-"
        table.append([r["engine"], f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}x", skipped])
    report.table(["plan", "tokens/s", "vs dense", "weight rows skipped per token, by linear"], table)
    for r in doc["rows"]:
        report.text(f"**{r['engine']}**: {doc['prompt']}{r['sample']}")
