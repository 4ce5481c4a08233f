"""ProSparse on SmolLM2-135M: ReLUfication + L1 with no / constant / progressive lambda.

    .venv/bin/python benchmarks/prosparse_smollm2.py [--steps 60] [--lam 3e-4] [--lr 2e-4] \
        [--workdir ~/.cache/actsparse/experiments] [--out benchmarks/results/prosparse_smollm2.json]

Variants, all from the same ReLUfied SmolLM2-135M (``relufy_``: SiLU -> ReLU in every
MLP), the same data order (seed 0), the same number of AdamW updates of the same batches
(``--steps`` x ``--batch-size`` x ``--window`` tokens of the wiki calibration split):

  (a) no L1                       (``--schedule none``)
  (b) constant lambda             (``--schedule constant --lambda LAM``)
  (c) ProSparse staged sine rise  (``--schedule prosparse --lambda LAM``: LAM/8 warm-up for
      10% of the steps, three sine rises each doubling lambda, LAM for the last 18%)
  (d) (c) + FATReLU t = 0.01      (the trained model of (c) with its ReLUs replaced by
      FATReLU(0.01) before evaluation; no extra training, as ProSparse's last stage)

Each variant is one ``actsparse.train.loop.finetune`` run (what ``actsparse finetune``
runs; resumable: rerunning the script continues an interrupted variant and skips
finished ones) in ``WORKDIR/prosparse-<variant>``; the model of (c) is kept in
``WORKDIR/prosparse-c/model`` (loadable by ``actsparse.load(dir)``; re-apply
``fatrelu_(model, 0.01)`` for (d)). Held-out evaluation: wiki test split, non-overlapping
``--window``-token windows, ``--eval-tokens`` tokens; sparsity = fraction of exact zeros of
the down-projection input over the real tokens of those windows. The original SiLU model
and the ReLUfied model before any training are evaluated the same way. Writes JSON and
two PNGs next to it. One torch thread.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from actsparse.io import read_json, write_json
from actsparse.provenance import git_hash

VARIANTS = {
    "a": {"schedule": "none", "label": "(a) ReLU, no L1"},
    "b": {"schedule": "constant", "label": "(b) constant lambda"},
    "c": {"schedule": "prosparse", "label": "(c) ProSparse sine stages"},
}


def versions() -> dict:
    import transformers

    import actsparse

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "actsparse": actsparse.__version__}


def reference_evals(args, path: Path) -> dict:
    """PPL and sparsity of the original SiLU model and of the ReLUfied one before training."""
    if path.is_file():
        doc = read_json(path)
        if doc.get("eval_tokens") == args.eval_tokens and doc.get("window") == args.window:
            return doc
    import actsparse as asp
    from actsparse.data.text import text, token_windows
    from actsparse.experiments.finetune import evaluate
    from actsparse.train.relufy import relufy_

    model, tok = asp.load("smollm2-135m")
    ev = token_windows(tok, text("wiki", "test"), window=args.window, max_tokens=args.eval_tokens)
    t0 = time.perf_counter()
    silu = evaluate(model, ev, "mlp.down:input", args.eval_batch_size)
    relufy_(model)
    relu0 = evaluate(model, ev, "mlp.down:input", args.eval_batch_size)
    doc = {"eval_tokens": args.eval_tokens, "window": args.window, "silu": silu, "relu_untrained": relu0,
           "seconds": round(time.perf_counter() - t0, 1)}
    write_json(path, doc)
    return doc


def config_for(variant: str, args):
    from actsparse.train.loop import FinetuneConfig

    return FinetuneConfig(
        model="smollm2-135m", relufy=True, schedule=VARIANTS[variant]["schedule"],
        lam=args.lam if VARIANTS[variant]["schedule"] != "none" else 0.0, stages=4, steps=args.steps,
        data="wiki", split="calibration", window=args.window, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, grad_clip=1.0, fatrelu=0.01 if variant == "c" else None,
        sites="mlp.down:input", seed=0, checkpoint_every=args.checkpoint_every, eval_split="test",
        eval_tokens=args.eval_tokens, eval_batch_size=args.eval_batch_size)


def run_variant(variant: str, args) -> dict:
    from actsparse.experiments.finetune import finetune

    out = Path(args.workdir) / f"prosparse-{variant}"
    config = config_for(variant, args)
    summary_path = out / "summary.json"
    if summary_path.is_file():
        s = read_json(summary_path)
        if s.get("config") == config.to_dict() and s.get("last", {}).get("step") == config.steps:
            print(f"variant {variant}: finished earlier, reusing {summary_path}", flush=True)
            return s
    t0 = time.perf_counter()
    s = finetune(config, out, resume=True, progress=False, save_model=(variant == "c"))
    s["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(summary_path, s)
    return s


def weight_norms(path: Path) -> dict:
    """Mean over layers of the Frobenius norms of the MLP weights in a safetensors file: the
    L1 on h = relu(gate) * up can be lowered without any new zero by shrinking gate/up and
    growing down, so the norms tell how the L1 was met."""
    from safetensors import safe_open

    sums: dict[str, list[float]] = {"gate_proj": [], "up_proj": [], "down_proj": []}
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():
            for kind in sums:
                if key.endswith(f"mlp.{kind}.weight"):
                    sums[kind].append(float(fh.get_tensor(key).float().norm()))
    return {k: sum(v) / len(v) for k, v in sums.items() if v}


def original_weights() -> Path:
    from actsparse.models.loading import _embedded_dir

    return _embedded_dir("smollm2-135m") / "model.safetensors"


def read_log(out: Path) -> list[dict]:
    with open(out / "log.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="AdamW updates per variant")
    ap.add_argument("--lam", type=float, default=3e-4, help="final (c) / constant (b) L1 weight")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-batch-size", type=int, default=4)
    ap.add_argument("--checkpoint-every", type=int, default=30)
    ap.add_argument("--variants", default="a,b,c")
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/actsparse/experiments"))
    ap.add_argument("--out", default="actsparse-out/prosparse_smollm2.json",
                    help="JSON path (default: %(default)s; the committed result is regenerated "
                         "only with an explicit --out benchmarks/results/prosparse_smollm2.json)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    ref = reference_evals(args, Path(args.workdir) / f"prosparse-reference-{args.window}-{args.eval_tokens}.json")
    print(f"SiLU PPL {ref['silu']['ppl']:.3f}; ReLUfied untrained PPL {ref['relu_untrained']['ppl']:.1f}", flush=True)
    summaries = {}
    for v in variants:
        s = run_variant(v, args)
        summaries[v] = s
        line = f"variant {v}: " + "; ".join(f"{k} PPL {e['ppl']:.3f} sparsity {e['sparsity']:.4f}"
                                            for k, e in s["eval"].items())
        print(line, flush=True)
    rows = {}
    curves = {}
    for v, s in summaries.items():
        rows[v] = {"label": VARIANTS[v]["label"], "ppl": s["eval"]["relu"]["ppl"],
                   "sparsity": s["eval"]["relu"]["sparsity"], "schedule": s["schedule"],
                   "train_seconds": s.get("wall_seconds"), "final_lm_loss": s["last"].get("lm_loss"),
                   "final_train_sparsity": s["last"].get("sparsity")}
        if "fatrelu" in s["eval"]:
            rows["d"] = {"label": "(d) = (c) + FATReLU 0.01", "ppl": s["eval"]["fatrelu"]["ppl"],
                         "sparsity": s["eval"]["fatrelu"]["sparsity"], "schedule": s["schedule"],
                         "fatrelu": 0.01}
        log = read_log(Path(args.workdir) / f"prosparse-{v}")
        curves[v] = {k: [r[k] for r in log] for k in ("step", "lm_loss", "l1", "lambda", "sparsity", "seconds")}
    norms = {"original": weight_norms(original_weights())}
    for v in summaries:
        ck = read_json(Path(args.workdir) / f"prosparse-{v}" / "latest.json")["checkpoint"]
        norms[v] = weight_norms(Path(args.workdir) / f"prosparse-{v}" / ck / "model.safetensors")
    c0 = summaries[variants[0]]
    result = {
        "experiment": "ProSparse on SmolLM2-135M: ReLUfication + L1 on the down-projection input, "
                      "no / constant / progressive (sine-staged) lambda, + FATReLU",
        "protocol": {
            "model": "smollm2-135m (SmolLM2-135M-Instruct, fp32, dequantised from the embedded Q4_1 GGUF)",
            "training": {"data": "wiki calibration split", "updates": args.steps, "batch_size": args.batch_size,
                         "window": args.window, "tokens_per_variant": args.steps * args.batch_size * args.window,
                         "optimizer": "AdamW", "lr": args.lr, "weight_decay": 0.0,
                         "warmup_steps": args.warmup_steps, "grad_clip": 1.0, "seed": 0,
                         "same batches in every variant": True, "train_windows": c0["train_windows"]},
            "l1": "lambda(step) * sum over the 30 layers of mean over real tokens of ||h||_1, h = down_proj input "
                  "(actsparse.train.ActivationL1)",
            "lambda": args.lam,
            "evaluation": {"data": "wiki test split", "window": args.window, "windows": "non-overlapping",
                           "tokens_cap": args.eval_tokens, "scored_tokens": c0["eval"]["relu"]["tokens"],
                           "sparsity": "fraction of exact zeros of mlp.down_proj input over all layers, real tokens "
                                       "of the evaluation windows"},
            "threads": args.threads, "dtype": "float32",
            "command": "python benchmarks/prosparse_smollm2.py " + " ".join(sys.argv[1:] if argv is None else argv),
        },
        "reference": {"silu": {"ppl": ref["silu"]["ppl"], "sparsity": ref["silu"]["sparsity"]},
                      "relu_untrained": {"ppl": ref["relu_untrained"]["ppl"],
                                         "sparsity": ref["relu_untrained"]["sparsity"]}},
        "variants": rows,
        "mlp_weight_norms_mean_over_layers": norms,
        "curves": curves,
        "model_dir_c": str(Path(args.workdir) / "prosparse-c" / "model") if "c" in summaries else None,
        "versions": versions(),
        "git": git_hash(short=False),
        "wall_seconds_this_invocation": round(time.perf_counter() - t0, 1),
        "train_wall_seconds": {v: s.get("wall_seconds") for v, s in summaries.items()},
    }
    out = write_json(args.out, result)
    plot(result, str(out).rsplit(".", 1)[0])
    print(f"wrote {out}", flush=True)
    return 0


def plot(result: dict, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"a": "tab:grey", "b": "tab:blue", "c": "tab:red", "d": "tab:purple"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for v, cur in result["curves"].items():
        lab = result["variants"][v]["label"]
        axes[0].plot(cur["step"], cur["lm_loss"], color=colors[v], label=lab)
        axes[1].plot(cur["step"], cur["sparsity"], color=colors[v], label=lab)
        axes[2].plot(cur["step"], cur["lambda"], color=colors[v], label=lab)
    axes[0].set_ylabel("LM loss (training batch)")
    axes[1].set_ylabel("exact zeros of h (training batch)")
    axes[1].set_title("h = down_proj input", fontsize=9)
    axes[2].set_ylabel("lambda")
    for ax in axes:
        ax.set_xlabel("update")
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    fig.suptitle("ReLUfied SmolLM2-135M fine-tuning curves (same batches in every variant)")
    fig.tight_layout()
    fig.savefig(stem + "_curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for v, row in result["variants"].items():
        ax.scatter(row["sparsity"], row["ppl"], color=colors[v], s=60, label=row["label"], zorder=3)
    silu = result["reference"]["silu"]
    ax.axhline(silu["ppl"], color="black", ls="--", lw=1, label=f"original SiLU model (PPL {silu['ppl']:.1f})")
    ax.set_xlabel("held-out exact-zero sparsity of down_proj input")
    ax.set_ylabel("held-out PPL (wiki test)")
    ev = result["protocol"]["evaluation"]
    ax.set_title(f"SmolLM2-135M, {result['protocol']['training']['tokens_per_variant']:,} training tokens each\n"
                 f"eval: {ev['scored_tokens']:,} tokens, {ev['window']}-token windows", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
