"""Quality (perplexity vs sparsity) plots and report sections, rendered from saved JSON."""
from __future__ import annotations

import math
from pathlib import Path

from actsparse.report.document import Report

COLORS = {"teal": "C0", "teal-greedy": "C5", "teal-greedy-linear": "C8", "cats": "C1", "chess": "C2",
          "chess-selective": "C6", "topk": "C3", "wina": "C4", "cett": "C7"}


MARKERS = {"teal": "o", "teal-greedy": "D", "teal-greedy-linear": "d", "cats": "s", "chess": "^",
           "chess-selective": "v", "topk": "P", "wina": "x", "cett": "*"}


def method_color(method: str) -> str:
    """One colour per method in every plot (grey for a method without its own)."""
    return COLORS.get(method, "C7")


def _by_method(doc: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in doc.get("results", []):
        out.setdefault(r["method"], []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: r["target"])
    return out


def plot_quality(doc: dict, path: str | Path) -> Path:
    """Two panels: PPL ratio vs fraction of block linear weight bytes skipped (measured), and
    vs nominal sparsity. Log y axis."""
    from actsparse.report.plots import _plt, save_figure

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, rows in _by_method(doc).items():
        c = method_color(m)
        ratios = [r["ratio"] for r in rows]
        err = None
        if all(r.get("ratio_ci95") for r in rows):  # the 95% bootstrap interval as error bars
            err = [[q - r["ratio_ci95"][0] for q, r in zip(ratios, rows)],
                   [r["ratio_ci95"][1] - q for q, r in zip(ratios, rows)]]
        for ax, xs in zip(axes, ([r["bytes_skipped"] for r in rows], [r["target"] for r in rows])):
            ax.errorbar(xs, ratios, yerr=err, fmt="o-", color=c, label=m, capsize=2, ms=4)
    for ax, xl in zip(axes, ("fraction of block linear weight bytes skipped per token (reached)",
                             "nominal (target) sparsity")):
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.01, color="k", lw=0.5, ls=":")
        ax.set_xlabel(xl)
        ax.set_ylabel("perplexity / dense")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    prot = doc.get("protocol", {}).get("evaluation", {})
    dense = doc.get("dense") or {}
    fig.suptitle(f"{doc.get('model')} {doc.get('dtype', '')}: dense PPL {dense.get('ppl', math.nan):.2f} on "
                 f"{doc.get('protocol', {}).get('data')}/{prot.get('split')}, {prot.get('windows')} x "
                 f"{prot.get('window')}-token windows")
    fig.tight_layout()
    return save_figure(fig, path)


# linears that read the same input share a panel of the thresholds plot, told apart by line style
THRESHOLD_PANELS = {"attn.q:input": ("attention input (q / k / v)", "-"), "attn.k:input": ("attention input (q / k / v)", "--"),
                    "attn.v:input": ("attention input (q / k / v)", ":"), "mlp.gate:input": ("MLP input (gate / up)", "-"),
                    "mlp.up:input": ("MLP input (gate / up)", "--")}


def plot_thresholds(rows_by_method: dict[str, list[dict]], path: str | Path) -> Path:
    from actsparse.report.plots import save_figure

    return save_figure(thresholds_figure(rows_by_method), path)


def thresholds_figure(rows_by_method: dict[str, list[dict]]):
    """Per-layer thresholds (median for per-channel ones): one panel per input, one colour per
    method (the same colours as the other plots)."""
    from actsparse.report.plots import _plt

    panels: dict[str, dict[tuple[str, str], list]] = {}  # panel -> (method, kind) -> [(layer, threshold)]
    for method, rows in rows_by_method.items():
        for r in rows:
            if r.get("threshold") is not None and r.get("layer") is not None:
                panel, _ = THRESHOLD_PANELS.get(r["kind"], (r["kind"], "-"))
                panels.setdefault(panel, {}).setdefault((method, r["kind"]), []).append((r["layer"], r["threshold"]))
    plt = _plt()
    n = max(1, len(panels))
    cols = min(n, 3)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(4.4 * cols, 3.3 * -(-n // cols)), squeeze=False)
    for ax, (panel, series) in zip(axes.flat, panels.items()):
        shared = len({kind for _, kind in series}) > 1
        for (method, kind), pts in series.items():
            pts.sort()
            label = f"{method} {kind.split(':')[0].split('.')[-1]}" if shared else method
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS.get(method, "."), ms=3.5, lw=1.1,
                    color=method_color(method), ls=THRESHOLD_PANELS.get(kind, ("", "-"))[1], label=label)
        ax.set_yscale("log")
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2 if len(series) > 4 else 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("threshold")
    fig.suptitle("Per-layer thresholds on |v| (median over channels for the per-channel ones: CHESS, WINA)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def _f(x, fmt="{:.3f}"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _interval(ci) -> str:
    return "-" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _standing(doc: dict, r: dict) -> str:
    """How the point compares with the best method at its target, as the sweep ranked it."""
    rank = (doc.get("ranking") or {}).get(f"{r['target']:g}")
    if not rank:
        return "-"
    if rank["best"] == r["method"]:
        return "best"
    ci = rank["ratio_to_best_ci"].get(r["method"])
    if r["method"] in rank["tied_with_best"]:
        return f"tied ({_interval(ci)} x best)"
    return f"worse ({_interval(ci)} x best)"


def quality_rows(doc: dict) -> list[list]:
    rows = []
    for m, items in _by_method(doc).items():
        for r in items:
            reached = ", ".join(f"{k.split(':')[0]} {v:.2f}" for k, v in r["reached_sparsity"].items())
            rows.append([m, _f(r["target"], "{:.2f}"), _f(r["ppl"], "{:.2f}"), _f(r["ratio"]),
                         _interval(r.get("ratio_ci95")), _standing(doc, r), _f(r["bytes_skipped"]), reached])
    return rows


def add_quality_section(report: Report, doc: dict, out_dir: Path, *, plot_dir: str = "plots",
                        title: str = "Quality: training-free sparsification", thresholds: dict | None = None,
                        plot: bool = True) -> Report:
    """The quality table, PPL-1% results if any, the quality-vs-sparsity plot (``plot``: a sweep
    over several sparsities) and the per-layer thresholds."""
    out_dir = Path(out_dir)
    report.heading(title)
    prot = doc.get("protocol", {})
    ev, ca = prot.get("evaluation", {}), prot.get("calibration", {})
    dense = doc.get("dense") or {}
    report.text(f"Perplexity on {prot.get('data')}/{ev.get('split')}: {ev.get('windows')} non-overlapping "
                f"{ev.get('window')}-token windows ({dense.get('tokens')} scored tokens); thresholds from "
                f"{ca.get('tokens')} tokens of the {ca.get('split')} split (disjoint documents). Dense PPL "
                f"{_f(dense.get('ppl'), '{:.3f}')}. 'bytes skipped' = fraction of the block linears' weight bytes "
                f"a sparse kernel need not read per decoded token, from the sparsity reached on the evaluation data.")
    report.text("'95%' is a paired bootstrap interval over the evaluation windows of the ratio to dense; "
                "'vs best' compares each point with the best method at its target the same way, and a method "
                "whose interval reaches 1 is tied with the best, not ranked below it.")
    report.table(["method", "target", "PPL", "x dense", "95%", "vs best", "bytes skipped",
                  "reached sparsity per site kind"], quality_rows(doc))
    if doc.get("pplp"):
        rows = []
        for fam, r in doc["pplp"].items():
            reached = ", ".join(f"{k.split(':')[0]} {v:.2f}" for k, v in (r.get("reached_sparsity") or {}).items())
            rows.append([fam, _f(r.get("knob")), _f(r.get("ratio")), _f(r.get("bytes_skipped")), reached])
        report.text("PPL-1% sparsity: largest knob (uniform sparsity; for cett the shared CETT value) whose "
                    "validation perplexity stays within +1% of dense.")
        report.table(["family", "knob", "x dense (val)", "bytes skipped", "reached sparsity"], rows)
    if plot and len(doc.get("results", [])) > 1:
        p = plot_quality(doc, out_dir / plot_dir / "quality.png")
        report.image(str(p.relative_to(out_dir)), "perplexity ratio vs weight bytes skipped and vs nominal sparsity")
    if thresholds:
        p = plot_thresholds(thresholds, out_dir / plot_dir / "thresholds.png")
        report.image(str(p.relative_to(out_dir)), "per-layer thresholds")
    return report
