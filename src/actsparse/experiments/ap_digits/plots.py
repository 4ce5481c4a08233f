"""Plots for the AP benchmark (matplotlib, Agg backend): rendered from the JSON document only."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(doc, model, host, ap, key):
    rows = [r for r in doc["summary"] if r["model"] == model and r["host"] == host and r["ap"] == ap]
    rows.sort(key=lambda r: -r["remaining_frac"])
    x = [100 * r["remaining_frac"] for r in rows]
    return x, [r[key]["mean"] for r in rows], [r[key]["std"] for r in rows]


def _grid(doc, out: Path, key: str, ylabel: str, title: str):
    plt = _plt()
    models = list(doc["config"]["models"])
    hosts = list(doc["config"]["hosts"])
    aps = list(doc["config"]["aps"])
    fig, axes = plt.subplots(len(models), len(hosts), figsize=(3.2 * len(hosts), 2.8 * len(models)),
                             squeeze=False, sharex=True)
    for i, m in enumerate(models):
        for j, h in enumerate(hosts):
            ax = axes[i][j]
            for a in aps:
                x, y, e = _series(doc, m, h, a, key)
                if x:
                    ax.errorbar(x, y, yerr=e, marker="o", ms=3, capsize=2,
                                label="AP off" if a == 0 else f"AP a={a:g}")
            ax.set_xscale("log")
            ax.invert_xaxis()
            ax.set_title(f"{m} / {h}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(models) - 1:
                ax.set_xlabel("remaining weights (%)")
            if j == 0:
                ax.set_ylabel(ylabel)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title} (mean ± std over seeds {doc['config']['seeds']})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _dnr_epochs(doc, out: Path, host: str = "imp"):
    plt = _plt()
    models = list(doc["config"]["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.6), squeeze=False)
    for i, m in enumerate(models):
        ax = axes[0][i]
        for a, style in zip(doc["config"]["aps"], ["-", "--", ":"]):
            runs = [r for r in doc["runs"] if r["config"]["model"] == m and r["config"]["host"] == host
                    and r["config"]["ap"] == a]
            if not runs:
                continue
            # concatenate epochs across levels; mean over seeds
            n_lv = min(len(r["levels"]) for r in runs)
            xs, ys, bounds = [], [], []
            e0 = 0
            for li in range(n_lv):
                n_ep = len(runs[0]["levels"][li]["epochs"])
                for e in range(n_ep):
                    vals = [r["levels"][li]["epochs"][e].get("dnr") for r in runs]
                    if any(v is None for v in vals):
                        continue
                    xs.append(e0 + e + 1)
                    ys.append(sum(vals) / len(vals))
                e0 += n_ep
                bounds.append(e0)
            ax.plot(xs, ys, style, label="AP off" if a == 0 else f"AP a={a:g}")
            for b in bounds[:-1]:
                ax.axvline(b + 0.5, color="grey", alpha=0.15)
        ax.set_title(f"{m} / {host}: DNR over training (grey lines: prune + rewind)", fontsize=9)
        ax.set_xlabel("epoch (all levels, dense first)")
        ax.set_ylabel("dynamic DNR (train subset)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_all(doc: dict, out_dir, name: str = "ap") -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _grid(doc, out_dir / f"{name}_accuracy.png", "test_acc", "test accuracy", "Accuracy vs remaining weights"),
        _grid(doc, out_dir / f"{name}_dnr_levels.png", "dnr", "dynamic DNR", "DNR vs pruning level"),
        _dnr_epochs(doc, out_dir / f"{name}_dnr_epochs.png"),
    ]
