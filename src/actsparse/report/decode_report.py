"""The report sections of the demo's decode-speed comparison and its quality-vs-speed frontier
(rendered from their JSON; the measurement is :func:`actsparse.bench.decode.measure_plans`)."""
from __future__ import annotations

from pathlib import Path

from actsparse.report.document import Report
from actsparse.report.quality_report import method_color

ABOVE_CEILING = ("above its Amdahl ceiling: skipped bytes cannot explain it, so it is noise or a slower dense "
                 "path (on some CPUs the dense FastDecoder GEMV is slower than the sparse kernel even at s = 0)")


def _spread(s: dict, fmt: str, unit: str = "") -> str:
    """"median<unit> (p10-p90)" of a spread, each value formatted with ``fmt``."""
    return f"{fmt.format(s['median'])}{unit} ({fmt.format(s['p10'])}-{fmt.format(s['p90'])})"


def add_decode_section(report: Report, doc: dict, title: str = "Decode speed (batch 1, FastDecoder)") -> None:
    report.heading(title)
    report.text(f"Greedy decoding of {doc['new_tokens']} tokens after the prompt \"{doc['prompt']}\", "
                f"{doc['dtype']} weights, {doc['threads']} thread(s). Every engine first ran {doc['warmup']} untimed "
                f"generation(s) (compilation, caches), then {doc['repeats']} rounds each running every engine once "
                "in a random order: median tokens/s with p10-p90, and the speedup as the median (p10-p90) of the "
                "per-round ratios to dense. Ceiling: the Amdahl bound dense bytes / sparse bytes read per token "
                "(block linears at the sparsity reached while decoding, the lm_head dense). The full benchmark is "
                "`actsparse bench decode`.")
    table, flagged = [], []
    for r in doc["rows"]:
        skipped = ", ".join(f"{k} {v:.0%}" for k, v in r.get("weight_skip", {}).items() if v > 0) or "-"
        dense = r["engine"] == "dense"
        flag = "above ceiling" if r["above_ceiling"] else ""
        if flag:
            flagged.append(r["engine"])
        table.append([r["engine"], _spread(r["tokens_per_s"], "{:.1f}"),
                      "1.00x" if dense else _spread(r["speedup"], "{:.2f}", "x"),
                      "-" if dense else f"{r['amdahl_ceiling']:.2f}x",
                      "-" if dense else f"{r['speedup']['median'] / r['amdahl_ceiling']:.2f}",
                      f"{r['bytes_per_token'] / 1e6:.0f}", flag, skipped])
    report.table(["plan", "tokens/s (p10-p90)", "vs dense (p10-p90)", "Amdahl ceiling", "of ceiling", "MB read per token",
                  "flag", "weight rows skipped per token, by linear"], table)
    if flagged:
        report.text(f"**{', '.join(flagged)}**: the median speedup is {ABOVE_CEILING}. Read such a ratio as an "
                    "upper bound of the noise, not as the sparsity's gain.")
    for r in doc["rows"]:
        report.text(f"**{r['engine']}**: {doc['prompt']}{r['sample']}")


def plot_frontier(quality: dict, decode: dict, path: str | Path) -> Path:
    """Perplexity / dense against measured decode tokens/s, one point per plan (dense at 1.0),
    with each plan's Amdahl ceiling as a hollow marker at the same quality."""
    from actsparse.report.plots import _plt, save_figure

    plt = _plt()
    ratio = {r["method"]: r["ratio"] for r in quality["results"]}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    dense = next(r for r in decode["rows"] if r["engine"] == "dense")["tokens_per_s"]
    ceiling_drawn = False
    for r in decode["rows"]:
        name = r["engine"]
        method = name.split()[0]
        y = 1.0 if name == "dense" else ratio.get(method)
        if y is None:
            continue
        t = r["tokens_per_s"]
        color = "k" if name == "dense" else method_color(method)
        ax.errorbar([t["median"]], [y], xerr=[[t["median"] - t["p10"]], [t["p90"] - t["median"]]], fmt="o",
                    color=color, ms=8, capsize=3, zorder=3)
        label = f"{name} (above ceiling)" if r.get("above_ceiling") else name
        ax.annotate(label, (t["median"], y), textcoords="offset points", xytext=(7, 6), fontsize=9, color=color)
        if name != "dense":
            x_ceiling = dense["median"] * r["amdahl_ceiling"]
            ax.plot([t["median"], x_ceiling], [y, y], ":", color=color, lw=1)
            ax.plot([x_ceiling], [y], "o", mfc="none", color=color, ms=8)
            ceiling_drawn = True
    if ceiling_drawn:  # a neutral legend entry for the hollow markers
        ax.plot([], [], "o", mfc="none", color="0.4", ms=8, label="Amdahl ceiling (weight bytes skipped)")
        ax.legend(fontsize=8, loc="upper left")
    ax.margins(x=0.08, y=0.12)
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xlabel(f"decode tokens/s ({decode['dtype']}, {decode['threads']} thread(s), batch 1; median, p10-p90)  "
                  "faster →")
    ax.set_ylabel("perplexity / dense  (lower is better)")
    ev = quality.get("protocol", {}).get("evaluation", {})
    ax.set_title(f"{quality.get('model')}: quality vs measured speed at "
                 f"{quality['results'][0]['target']:.0%} target sparsity\n"
                 f"(perplexity {quality.get('dtype')} on {quality.get('protocol', {}).get('data')}/{ev.get('split')}, "
                 f"{(quality.get('dense') or {}).get('tokens')} tokens)", fontsize=10)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def add_frontier_section(report: Report, quality: dict, decode: dict, out_dir: Path,
                         plot_dir: str = "plots") -> Report:
    out_dir = Path(out_dir)
    p = plot_frontier(quality, decode, out_dir / plot_dir / "frontier.png")
    report.heading("Quality vs measured speed")
    report.text("One point per plan: the perplexity ratio of the quality section against the decode tokens/s "
                "measured above (dense at 1.0); the hollow marker on the same row is the speed the plan's skipped "
                "weight bytes allow (Amdahl ceiling). Down and to the right is better.")
    report.image(str(p.relative_to(out_dir)), "perplexity ratio vs measured decode speed, per plan")
    return report
