"""`actsparse recover`: distil a sparsified model against its dense self (recovery training)."""
from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.commands.common import DEFAULT_OUT, check_output, nonnegative_int, positive_int, setup, window_int

EPILOG = """\
examples:
  # TEAL 50% calibrated here (16,384 calibration tokens), LoRA rank 8, 32,768 training tokens
  actsparse recover --sparsity 0.5 --trainable lora --tokens 32768 --out recover-out/
  # a plan from `actsparse calibrate`, norms only
  actsparse recover --plan plan/ --trainable norms --tokens 32768 --out recover-norms/
  # continue an interrupted run, or extend a finished one to more tokens (same other settings)
  actsparse recover --plan plan/ --tokens 65536 --out recover-out/ --resume

outputs (in --out, default actsparse-out/recover):
  plan/                  the plan trained for (load it, then the recovery)
  recovery/              recovery.json + recovery.safetensors: the trained tensors only
  log.jsonl              one line per update: step, tokens, kl, lr, sparsity, teacher_s, student_s, seconds
  curve.jsonl            held-out PPL / dense every --eval-every steps (wiki test, protocol all)
  checkpoint-NNNNNNN/    trained tensors + optimizer state (latest only); latest.json
  summary.json           dense / before / after PPL under --protocol all and decode, the curve, the cost

Load the result in Python:
  load_plan(model, "recover-out/plan"); load_recovery(model, "recover-out/recovery")
"""


def register(sub) -> None:
    p = sub.add_parser(
        "recover",
        help="recovery training: distil a sparsified model (TEAL plan) against the dense one, LoRA or norms only",
        description="A short distillation fine-tune of a sparsified model: the student is the model with the plan "
                    "installed (thresholds fixed, masks in the forward with a straight-through gradient), the "
                    "teacher the dense model; loss = KL(teacher || student) on the logits of every real token. "
                    "Trains only rank-r LoRA adapters on the sparse linears (on their masked input, so they merge "
                    "exactly) or only the norm weights and biases, with AdamW at a constant learning rate, on "
                    "--split. Deterministic data order, atomic safetensors checkpoints of the trained tensors, "
                    "exact resumption; a held-out PPL curve and final dense / before / after figures.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded name (smollm2-135m), a local HF model directory or a hub id (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype (default: float32)")
    p.add_argument("--plan", type=Path, default=None,
                   help="a plan directory from `actsparse calibrate` (default: calibrate TEAL at --sparsity here)")
    p.add_argument("--sparsity", type=float, default=0.5, help="TEAL sparsity when no --plan (default: %(default)s)")
    p.add_argument("--calib-tokens", type=positive_int, default=16384,
                   help="calibration-split tokens for the TEAL thresholds when no --plan (default: %(default)s)")
    p.add_argument("--trainable", default="lora", choices=["lora", "norms"],
                   help="what is trained: lora (adapters on the sparse linears) or norms (norm weights + biases) "
                        "(default: %(default)s)")
    p.add_argument("--rank", type=positive_int, default=8, help="LoRA rank (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scale = alpha / rank (default: %(default)s)")
    p.add_argument("--tokens", type=positive_int, required=True,
                   help="training-token budget; updates = ceil(tokens / (batch-size * window))")
    p.add_argument("--data", default="wiki", help="training and evaluation text (default: %(default)s)")
    p.add_argument("--split", default="calibration", choices=["calibration", "validation"],
                   help="documents to train on (default: %(default)s)")
    p.add_argument("--window", type=window_int, default=512, help="tokens per training window (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="windows per update (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    p.add_argument("--warmup-steps", type=nonnegative_int, default=0, help="linear lr warm-up steps (default: 0)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip; 0 disables (default: 1.0)")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default: 1)")
    p.add_argument("--no-straight-through", action="store_true",
                   help="let the masks' gradient be the mask (zero for dropped entries) instead of the identity")
    p.add_argument("--eval-every", type=positive_int, default=8, metavar="STEPS",
                   help="updates between held-out curve points (default: %(default)s)")
    p.add_argument("--eval-tokens", type=nonnegative_int, default=4096,
                   help="wiki test tokens per curve point; 0: no curve (default: %(default)s)")
    p.add_argument("--final-tokens", type=nonnegative_int, default=16384,
                   help="wiki test tokens of the final dense / before / after figures under both protocols; 0 skips "
                        "them (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=positive_int, default=8, metavar="K",
                   help="write a checkpoint every K updates (and at the end) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and the LoRA init (default: 0)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT / "recover",
                   help="output directory (default: actsparse-out/recover)")
    p.add_argument("--resume", action="store_true",
                   help="continue OUT's latest checkpoint (settings must match; --tokens may be larger)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from actsparse.experiments.recovery import recover
    from actsparse.train.recovery import RecoveryConfig

    setup(args)
    check_output(args.out, "--out", directory=True)
    config = RecoveryConfig(
        model=args.model, plan=str(args.plan) if args.plan else None, sparsity=args.sparsity,
        calib_tokens=args.calib_tokens, trainable=args.trainable, lora_rank=args.rank, lora_alpha=args.alpha,
        tokens=args.tokens, data=args.data, split=args.split, window=args.window, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, grad_clip=args.grad_clip or None,
        temperature=args.temperature, straight_through=not args.no_straight_through, seed=args.seed,
        checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, eval_tokens=args.eval_tokens,
        final_tokens=args.final_tokens)
    summary = recover(config, args.out, resume=args.resume, progress=not args.no_progress, dtype=args.dtype)
    line = f"trained {summary['last']['tokens']} tokens in {summary['last']['step']} updates"
    if summary["curve"]:
        line += f"; curve PPL / dense {summary['curve'][0]['ratio']:.3f} -> {summary['curve'][-1]['ratio']:.3f}"
    for key, v in summary.get("ratios", {}).items():
        line += f"; {key} x{v:.3f}"
    print(line + f"; wrote {args.out / 'summary.json'}")
    return 0
