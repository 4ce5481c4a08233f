"""Recovery training of TEAL 50% on SmolLM2-135M: LoRA vs norms-only, then the longer run.

    .venv/bin/python benchmarks/recovery_smollm2.py [--compare-tokens 4096] [--tokens 24576] \
        [--workdir actsparse-out/recovery] [--out benchmarks/results/recovery-smollm2-135m.json]

1. Both trainable sets (``RecoveryConfig(trainable="lora")``: rank-8 LoRA on every sparse
   linear; ``"norms"``: the RMSNorm weights, SmolLM2 has no biases) are trained on the same
   ``--compare-tokens`` of the wiki calibration split (same batches, same lr), each one
   ``actsparse.experiments.recovery.recover`` run (what ``actsparse recover`` runs).
2. The one with the lower held-out PPL on the curve windows is extended (resumed with a
   larger ``tokens``: the same run continued) to ``--tokens``, with a curve point every
   ``--eval-every`` steps, and evaluated on ``--final-tokens`` test tokens under both
   protocols (dense, before and after on the same windows).

Resumable: rerunning continues where the runs stopped. Writes JSON (default under
actsparse-out/) and a PNG of the curve next to it.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from actsparse.io import write_json

TARGET = 1.15


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare-tokens", type=int, default=4096, help="training tokens of the LoRA / norms comparison")
    p.add_argument("--tokens", type=int, default=24576, help="training tokens of the chosen run (default: 24576)")
    p.add_argument("--eval-every", type=int, default=6, help="steps between curve points (default: 6)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="test tokens per curve point (default: 4096)")
    p.add_argument("--final-tokens", type=int, default=16384, help="test tokens of the final figure (default: 16384)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of both (default: 1e-3)")
    p.add_argument("--workdir", type=Path, default=Path("actsparse-out/recovery"),
                   help="run directories (default: actsparse-out/recovery)")
    p.add_argument("--out", type=Path, default=Path("actsparse-out/recovery-smollm2-135m.json"),
                   help="result JSON (default: actsparse-out/recovery-smollm2-135m.json)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p.parse_args(argv)


def extrapolate(curve: list[dict], target: float = TARGET) -> dict:
    """Tokens at which a power law ``log(ratio) = a * tokens**b`` through the trained points
    would reach ``target`` (a rough guide, not a measurement)."""
    pts = [(p["tokens"], math.log(p["ratio"])) for p in curve if p["tokens"] > 0 and p["ratio"] > 1]
    if len(pts) < 2:
        return {"tokens_to_target": None, "note": "fewer than two trained points"}
    x, y = np.log([t for t, _ in pts]), np.log([v for _, v in pts])
    b, log_a = np.polyfit(x, y, 1)
    if b >= 0:
        return {"tokens_to_target": None, "fit": {"a": float(np.exp(log_a)), "b": float(b)},
                "note": "the curve does not fall with tokens in this range"}
    tokens = float(np.exp((math.log(math.log(target)) - log_a) / b))
    return {"tokens_to_target": tokens, "fit": {"a": float(np.exp(log_a)), "b": float(b)},
            "model": "log(ppl ratio) = a * tokens**b, least squares in log-log over the trained curve points"}


def share_start(done: Path, todo: Path) -> None:
    """Seed ``todo`` with what its run would compute first and ``done`` already has: the plan
    (calibrated from the same tokens), the dense model's curve PPL and the step-0 point (both
    runs start from the same sparsified model)."""
    import json
    import shutil

    if (todo / "latest.json").is_file() or not (done / "curve.jsonl").is_file():
        return
    todo.mkdir(parents=True, exist_ok=True)
    shutil.copytree(done / "plan", todo / "plan", dirs_exist_ok=True)
    shutil.copy(done / "dense-curve.json", todo / "dense-curve.json")
    first = json.loads((done / "curve.jsonl").read_text().splitlines()[0])
    if first["step"] == 0:
        (todo / "curve.jsonl").write_text(json.dumps(first) + "\n")


def at_budget(summary: dict, steps: int, log_path: Path) -> dict:
    """The comparison figures of a run at ``steps`` (the chosen run's directory is extended
    afterwards: its later curve points and log lines are not part of the comparison)."""
    import json

    from actsparse.experiments.recovery import training_cost

    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return {**summary, "curve": [p for p in summary["curve"] if p["step"] <= steps],
            "cost": training_cost([r for r in log if r["step"] <= steps]),
            "last": next(r for r in log if r["step"] == steps)}


def slim(summary: dict) -> dict:
    """The summary without per-window lists (kept only for the final figures)."""
    out = {k: v for k, v in summary.items() if k != "final"}
    if "final" in summary:
        out["final"] = summary["final"]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in result["comparison"].items():
        c = run["curve"]
        ax.plot([p["tokens"] for p in c], [p["ratio"] for p in c], "o--", label=f"{name} ({result['compare_tokens']} tokens)")
    c = result["main"]["curve"]
    ax.plot([p["tokens"] for p in c], [p["ratio"] for p in c], "o-", label=f"{result['choice']} (main run)")
    ax.axhline(TARGET, color="grey", ls=":", label=f"target x{TARGET}")
    ax.set_xlabel("training tokens (wiki calibration split)")
    ax.set_ylabel("held-out PPL / dense (wiki test, protocol all)")
    ax.set_title("SmolLM2-135M, TEAL 50%: recovery by distillation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    from actsparse.experiments.recovery import recover
    from actsparse.provenance import environment, git_hash, machine_info
    from actsparse.train.recovery import RecoveryConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    base = dict(tokens=args.compare_tokens, lr=args.lr, eval_every=args.eval_every, eval_tokens=args.eval_tokens)
    comparison = {}
    for trainable in ("lora", "norms"):
        if trainable == "norms":
            share_start(args.workdir / "lora", args.workdir / trainable)
        cfg = RecoveryConfig(trainable=trainable, final_tokens=0, **base)
        s = recover(cfg, args.workdir / trainable, resume=True)
        comparison[trainable] = at_budget(slim(s), cfg.steps, args.workdir / trainable / "log.jsonl")
        print(f"{trainable}: {s['curve'][-1]}", flush=True)
    choice = min(comparison, key=lambda k: comparison[k]["curve"][-1]["ppl"])
    cfg = RecoveryConfig(trainable=choice, final_tokens=args.final_tokens, **{**base, "tokens": args.tokens})
    main_run = recover(cfg, args.workdir / choice, resume=True)
    ratios = main_run["ratios"]
    result = {
        "command": "benchmarks/recovery_smollm2.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "git": git_hash(), "machine": machine_info(), "environment": environment(),
        "model": "smollm2-135m (fp32)", "method": "TEAL(sparsity=0.5), thresholds from 16,384 calibration tokens",
        "compare_tokens": args.compare_tokens, "comparison": comparison, "choice": choice,
        "choice_rule": "lower held-out PPL on the curve windows after --compare-tokens",
        "main": main_run, "target_ratio": TARGET, "ratios": ratios,
        "reached_target_all": ratios["after_all"] <= TARGET, "extrapolation": extrapolate(main_run["curve"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print(f"ratios {ratios}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
