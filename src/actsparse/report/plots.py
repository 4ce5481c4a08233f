"""Matplotlib figures rendered from saved JSON (Agg backend, written atomically as PNG)."""
from __future__ import annotations

import io
from pathlib import Path

from actsparse.io import write_bytes


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


def per_layer_sparsity(kinds: dict, path: Path, eps: str = "0.1") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for kind, table in kinds.items():
        layers = [r for r in table["layers"] if r["layer"] is not None] or table["layers"]
        xs = [r["layer"] if r["layer"] is not None else i for i, r in enumerate(layers)]
        line, = ax.plot(xs, [r["threshold_sparsity"].get(eps) for r in layers], marker=".", label=f"{kind} |v|<={eps}")
        zero = [r["zero_sparsity"] for r in layers]
        if max(zero) > 0.01:
            ax.plot(xs, zero, ls="--", color=line.get_color(), label=f"{kind} exact 0")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of activations")
    ax.set_ylim(0, 1)
    ax.set_title(f"Per-layer sparsity by site kind (|v| <= {eps}; dashed: exact zeros)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def abs_histograms(kinds: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for kind, table in kinds.items():
        h = table["abs_hist"]
        counts, edges = h["counts"], h["lower_edges"]
        if not counts:
            continue
        total = sum(counts)
        xs, ys = [], []
        for i, c in enumerate(counts):
            lo = edges[i]
            hi = edges[i + 1] if i + 1 < len(edges) else lo * 1.03
            if lo <= 0:
                continue
            xs.append((lo * hi) ** 0.5)
            ys.append(c / total / (hi - lo) * xs[-1])  # density per log-unit
        ax.plot(xs, ys, label=kind, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("|v|")
    ax.set_ylabel("density per ln|v|")
    ax.set_title("Distribution of |v| per site kind (pooled over layers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def per_layer_metric(kinds: dict, key: str, path: Path, title: str, ylabel: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for kind, table in kinds.items():
        layers = table["layers"]
        ys = [r.get(key) for r in layers]
        if all(y is None for y in ys):
            continue
        xs = [r["layer"] if r["layer"] is not None else i for i, r in enumerate(layers)]
        ax.plot(xs, ys, marker=".", label=kind)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
