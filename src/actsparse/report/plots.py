"""Matplotlib figures rendered from saved JSON (Agg backend, written atomically as PNG).

Values read from JSON may be None or the strings the JSON writer uses for non-finite numbers
("nan", "inf"): every value goes through :func:`~actsparse.report.document.num`, so a layer
without finite statistics is a gap in its line, never an exception.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

from actsparse.io import write_bytes
from actsparse.report.document import num


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return write_bytes(path, buf.getvalue())


def _layer_xs(layers: list[dict]) -> list:
    return [r["layer"] if r["layer"] is not None else i for i, r in enumerate(layers)]


def per_layer_sparsity(kinds: dict, path: Path, eps: str = "0.1", zero_floor: float = 0.01) -> Path:
    return save_figure(per_layer_sparsity_figure(kinds, eps, zero_floor), path)


def per_layer_sparsity_figure(kinds: dict, eps: str = "0.1", zero_floor: float = 0.01):
    """|v| <= eps per layer for every site kind; a kind's exact-zero fraction is drawn dashed
    in the same colour when it exceeds ``zero_floor`` at some layer."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    dashed = False
    for kind, table in kinds.items():
        layers = table["layers"]
        xs = _layer_xs(layers)
        ys = [num((r.get("threshold_sparsity") or {}).get(eps)) for r in layers]
        line, = ax.plot(xs, ys, marker=".", label=f"{kind} |v|<={eps}")
        zero = [num(r.get("zero_sparsity")) for r in layers]
        if any(z > zero_floor for z in zero if math.isfinite(z)):
            ax.plot(xs, zero, ls="--", color=line.get_color(), label=f"{kind} exact 0")
            dashed = True
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of activations")
    ax.set_ylim(0, 1)
    zeros = "dashed: exact zeros" if dashed else f"exact zeros below {zero_floor:.0%} at every layer"
    ax.set_title(f"Per-layer sparsity by site kind (|v| <= {eps}; {zeros})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def _hist_curve(h: dict) -> tuple[list[float], list[float], list[float]]:
    """Bin centres (geometric), density per ln|v| and the cumulative fraction of one pooled histogram."""
    counts, edges = h["counts"], h["lower_edges"]
    total = sum(counts)
    xs, ys, cum = [], [], []
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        lo = edges[i]
        hi = edges[i + 1] if i + 1 < len(edges) else lo * 1.03
        if lo <= 0:
            continue
        xs.append((lo * hi) ** 0.5)
        ys.append(c / total / (hi - lo) * xs[-1])
        cum.append(seen / total)
    return xs, ys, cum


def abs_histograms(kinds: dict, path: Path, tail: float = 1e-4) -> Path:
    """Density of |v| per site kind (pooled over layers), on the range that holds all but a
    fraction ``tail`` of every kind's values at each end."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    lo, hi = math.inf, 0.0
    for kind, table in kinds.items():
        if not sum(table["abs_hist"]["counts"]):
            continue
        xs, ys, cum = _hist_curve(table["abs_hist"])
        ax.plot(xs, ys, label=kind, lw=1.2)
        inside = [x for x, c in zip(xs, cum) if tail <= c <= 1 - tail]
        if inside:
            lo, hi = min(lo, inside[0]), max(hi, inside[-1])
    ax.set_xscale("log")
    if hi > lo:
        ax.set_xlim(lo, hi)
    ax.set_xlabel("|v|")
    ax.set_ylabel("density per ln|v|")
    ax.set_title("Distribution of |v| per site kind (all layers pooled)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def per_layer_metric(kinds: dict, key: str, path: Path, title: str, ylabel: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for kind, table in kinds.items():
        layers = table["layers"]
        ys = [num(r.get(key)) for r in layers]
        if not any(math.isfinite(y) for y in ys):
            continue
        ax.plot(_layer_xs(layers), ys, marker=".", label=kind)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    return save_figure(fig, path)
