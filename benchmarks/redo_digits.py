"""ReDo on scikit-learn digits: dormant ratio over training with and without resets.

    .venv/bin/python benchmarks/redo_digits.py [--seeds 5] [--steps 4000] [--out benchmarks/results/redo.json]

Setting (offline, CPU, 1 thread): an MLP 64-256-256-256-10 (ReLU) trained with Adam at a
high learning rate (default 3e-3) on a non-stationary target: the class labels are
re-permuted every ``--phase`` steps (the "shifted target" of the ReDo paper's
motivation). The dormant ratio (tau = 0.1, score ``E|v_i| / mean_k E|v_k|``, over the three
hidden ReLU layers, via actsparse.measure capture) is recorded every ``--every`` steps on a
fixed probe batch of training images. With ``redo``, every ``--reset-every`` steps the
tau-dormant neurons are recycled (incoming weights re-initialised, bias and outgoing
weights zeroed, Adam moments of those entries zeroed). At the end of every phase the test
accuracy on that phase's labelling is recorded. Writes JSON (+ a PNG next to it).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("ACTSPARSE_DISABLE_NUMBA", "1")  # small layers: the torch reduction path is enough

import numpy as np
import torch
from torch import nn

from actsparse.io import write_json
from actsparse.train.redo import dormant_masks, mask_ratio, redo_reset_

SITES = ["1", "3", "5"]  # the ReLU modules of the Sequential below
PAIRS = [(0, 2), (2, 4), (4, 6)]  # (layer_in, layer_out) indices for each ReLU


def make_net(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def load_data(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return (torch.from_numpy(xtr), torch.from_numpy(ytr).long(), torch.from_numpy(xte), torch.from_numpy(yte).long())


def run(seed: int, redo: bool, args) -> dict:
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_data(seed)
    g = torch.Generator().manual_seed(1000 + seed)  # same data order and label shifts with and without ReDo
    net = make_net(args.width)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    probe = xtr[:512]
    perm = torch.arange(10)
    curve, resets, accs = [], [], []
    reset_total = 0
    for step in range(args.steps + 1):
        if step % args.phase == 0 and step > 0:
            with torch.no_grad():
                accs.append(float((net(xte).argmax(1) == perm[yte]).float().mean()))
            perm = torch.randperm(10, generator=g)
        if step % args.every == 0:
            masks = dormant_masks(net, [probe], SITES, tau=0.1)
            curve.append({"step": step, "dormant_ratio": mask_ratio(masks),
                          "per_layer": [float(masks[f"{s}:output"].float().mean()) for s in SITES]})
        if step == args.steps:
            break
        if redo and step > 0 and step % args.reset_every == 0:
            masks = dormant_masks(net, [probe], SITES, tau=0.1)
            n = 0
            for s, (i, o) in zip(SITES, PAIRS):
                n += redo_reset_(net[i], net[o], masks[f"{s}:output"], opt)
            resets.append(n)
            reset_total += n
        idx = torch.randint(0, xtr.shape[0], (args.batch_size,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(xtr[idx]), perm[ytr[idx]])
        loss.backward()
        opt.step()
    return {"seed": seed, "redo": redo, "curve": curve, "phase_test_accuracy": accs,
            "final_dormant_ratio": curve[-1]["dormant_ratio"],
            "mean_dormant_ratio": float(np.mean([c["dormant_ratio"] for c in curve])),
            "neurons_reset": reset_total, "resets": len(resets)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--phase", type=int, default=500, help="steps between label re-permutations")
    ap.add_argument("--every", type=int, default=100, help="steps between dormant-ratio measurements")
    ap.add_argument("--reset-every", type=int, default=250, help="ReDo period F")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="actsparse-out/redo.json",
                    help="JSON path (default: %(default)s; the committed result is regenerated "
                         "only with an explicit --out benchmarks/results/redo.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    runs = [run(seed, redo, args) for seed in range(args.seeds) for redo in (False, True)]
    summary = {}
    for redo in (False, True):
        rs = [r for r in runs if r["redo"] == redo]
        key = "redo" if redo else "baseline"
        accs = np.array([r["phase_test_accuracy"] for r in rs])
        summary[key] = {
            "final_dormant_ratio_mean": float(np.mean([r["final_dormant_ratio"] for r in rs])),
            "final_dormant_ratio_std": float(np.std([r["final_dormant_ratio"] for r in rs])),
            "mean_dormant_ratio_mean": float(np.mean([r["mean_dormant_ratio"] for r in rs])),
            "last_phase_test_accuracy_mean": float(accs[:, -1].mean()),
            "last_phase_test_accuracy_std": float(accs[:, -1].std()),
            "phase_test_accuracy_mean": accs.mean(0).tolist(),
        }
    result = {
        "experiment": "ReDo on scikit-learn digits, non-stationary labels (re-permuted every phase)",
        "settings": vars(args) | {"tau": 0.1, "net": f"64-{args.width}-{args.width}-{args.width}-10 ReLU",
                                  "optimizer": "Adam", "threads": 1, "dtype": "float32",
                                  "dormant_probe": "512 training images, fixed"},
        "summary": summary,
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = write_json(args.out, result)
    plot(result, str(out).rsplit(".", 1)[0] + ".png")
    for k, v in summary.items():
        print(f"{k:8s} final dormant {v['final_dormant_ratio_mean']:.3f} +- {v['final_dormant_ratio_std']:.3f}; "
              f"mean over training {v['mean_dormant_ratio_mean']:.3f}; last-phase test acc "
              f"{v['last_phase_test_accuracy_mean']:.3f} +- {v['last_phase_test_accuracy_std']:.3f}")
    print(f"wrote {out} in {result['seconds']} s")
    return 0


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in result["runs"]:
        color = "tab:green" if r["redo"] else "tab:red"
        steps = [c["step"] for c in r["curve"]]
        ax.plot(steps, [c["dormant_ratio"] for c in r["curve"]], color=color, alpha=0.7,
                label=("ReDo" if r["redo"] else "no reset") if r["seed"] == 0 else None)
    for x in range(0, result["settings"]["steps"] + 1, result["settings"]["phase"]):
        ax.axvline(x, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("dormant ratio (tau = 0.1)")
    ax.set_title("Dormant neurons, digits MLP, labels re-permuted each phase")
    ax.legend()
    for key, color in (("baseline", "tab:red"), ("redo", "tab:green")):
        accs = result["summary"][key]["phase_test_accuracy_mean"]
        ax2.plot(range(1, len(accs) + 1), accs, marker="o", color=color, label="ReDo" if key == "redo" else "no reset")
    ax2.set_xlabel("phase")
    ax2.set_ylabel("test accuracy at phase end (mean of seeds)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
