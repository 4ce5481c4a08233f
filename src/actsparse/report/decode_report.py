"""The report section of the demo's decode-speed comparison (rendered from its JSON; the
measurement is :func:`actsparse.bench.decode.measure_plans`)."""
from __future__ import annotations

from actsparse.report.document import Report


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
