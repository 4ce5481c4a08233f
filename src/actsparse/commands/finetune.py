"""`actsparse finetune`: ReLUfy a model and fine-tune it with a (ProSparse) L1 activation loss."""
from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.commands.common import check_output, nonnegative_int, positive_int, setup, window_int

EPILOG = """\
examples:
  # ReLUfy SmolLM2 and train 200 steps with ProSparse's progressive L1 (final lambda 1e-4)
  actsparse finetune --model smollm2-135m --relufy --schedule prosparse --lambda 1e-4 \\
      --steps 200 --data wiki --out runs/prosparse
  # continue an interrupted run (same settings; no step is repeated or lost)
  actsparse finetune --model smollm2-135m --relufy --schedule prosparse --lambda 1e-4 \\
      --steps 200 --data wiki --out runs/prosparse --resume
  # plain ReLUfication (no L1), then FATReLU with threshold 0.01 before the final eval
  actsparse finetune --relufy --schedule none --steps 100 --fatrelu 0.01 --out runs/relu

outputs (in --out):
  log.jsonl              one line per update: step, loss, lm_loss, l1, lambda, lr, sparsity, seconds
  checkpoint-NNNNNNN/    model.safetensors, optimizer.safetensors, state.json (latest only)
  latest.json            which checkpoint --resume continues from
  summary.json           config, schedule, module changes, held-out PPL and sparsity
  model/                 the final model (save_pretrained, safetensors) + tokenizer

ProSparse schedule (--schedule prosparse): lambda starts at LAMBDA / 2**(stages-1) for the
first 10%% of steps, then rises in STAGES-1 sine-shaped stages (each doubling it) over the
next 72%% of steps and stays at LAMBDA for the rest. sparsity = fraction of exact zeros
in the down-projection input (the --sites tensor) on the batch's real tokens.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="ReLUfy a model and fine-tune it with a ProSparse L1 activation loss (resumable)",
        description="Reference fine-tuning loop for inducing activation sparsity: optionally swap the MLP "
                    "activation for ReLU (ReLUfication), then minimise lm_loss + lambda(step) * sum over layers of "
                    "mean_tokens ||h||_1, h the down-projection input, with AdamW. Deterministic data order "
                    "indexed by step, atomic safetensors checkpoints (no pickle) and exact resumption. At the end, "
                    "held-out perplexity and sparsity on --eval-split (and again after FATReLU with --fatrelu).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded name (smollm2-135m), a local HF model directory, a .gguf file or a hub id "
                        "(default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype (default: float32)")
    p.add_argument("--relufy", action="store_true", help="replace the MLP activation (SiLU/GELU) with ReLU first")
    p.add_argument("--after-norms", action="store_true",
                   help="with --relufy: also apply ReLU after the norms feeding attention and the MLP "
                        "(LLaMA: input_layernorm, post_attention_layernorm)")
    p.add_argument("--schedule", default="prosparse", choices=["prosparse", "constant", "none"],
                   help="L1 weight over steps: prosparse (warm-up + sine rises to --lambda), constant (--lambda "
                        "throughout) or none (no L1; plain fine-tuning). Default: %(default)s")
    p.add_argument("--lambda", dest="lam", type=float, default=1e-4,
                   help="final (prosparse) or constant L1 weight. The L1 term is a SUM over layers of per-token "
                        "L1 norms (about 1e4 for ReLU-fied SmolLM2-135M), so pick lambda such that lambda * L1 is "
                        "comparable to, but below, the LM loss (default: %(default)s)")
    p.add_argument("--stages", type=positive_int, default=4,
                   help="prosparse stages: warm-up plus STAGES-1 rises, each doubling lambda (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, required=True, help="number of optimizer updates")
    p.add_argument("--data", default="wiki",
                   help="training text: wiki, news, a .txt/.jsonl file or a folder (default: %(default)s)")
    p.add_argument("--split", default="calibration", choices=["calibration", "validation", "test", "all"],
                   help="documents to train on (default: %(default)s = the first 40%%)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="cap on training tokens (default: whole split)")
    p.add_argument("--eval-split", default="test", choices=["validation", "test"],
                   help="held-out documents for the final perplexity (default: %(default)s)")
    p.add_argument("--eval-tokens", type=nonnegative_int, default=8192,
                   help="tokens of --eval-split to evaluate; 0 skips the evaluation (default: %(default)s)")
    p.add_argument("--eval-batch-size", type=positive_int, default=4,
                   help="windows per forward in the final evaluation (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="output directory (log, checkpoints, summary, model)")
    p.add_argument("--fatrelu", type=float, default=None, metavar="T",
                   help="after training, replace ReLU with FATReLU(T) (v if v >= T else 0; ProSparse uses 0.01) "
                        "and evaluate again")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--warmup-steps", type=nonnegative_int, default=0,
                   help="linear learning-rate warm-up steps (default: 0)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip; 0 disables (default: 1.0)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per update (default: %(default)s)")
    p.add_argument("--window", type=window_int, default=256, help="tokens per window (default: %(default)s)")
    p.add_argument("--sites", default="mlp.down:input",
                   help="where the L1 loss and sparsity are measured (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=positive_int, default=50, metavar="K",
                   help="write a checkpoint every K steps (and at the end) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and dropout (default: 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/latest.json (settings must match the interrupted run)")
    p.add_argument("--no-save-model", action="store_true", help="do not write OUT/model at the end")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from actsparse.experiments.finetune import finetune
    from actsparse.train.loop import FinetuneConfig

    setup(args)
    check_output(args.out, "--out", directory=True)
    config = FinetuneConfig(
        model=args.model, relufy=args.relufy, after_norms=args.after_norms, schedule=args.schedule, lam=args.lam,
        stages=args.stages, steps=args.steps, data=args.data, split=args.split, max_tokens=args.max_tokens,
        window=args.window, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, grad_clip=args.grad_clip or None, fatrelu=args.fatrelu, sites=args.sites,
        seed=args.seed, checkpoint_every=args.checkpoint_every, eval_split=args.eval_split,
        eval_tokens=args.eval_tokens, eval_batch_size=args.eval_batch_size)
    summary = finetune(config, args.out, resume=args.resume, progress=not args.no_progress,
                       save_model=not args.no_save_model, dtype=args.dtype)
    last = summary["last"]
    line = f"trained to step {last['step']}"
    if "sparsity" in last:
        line += f" (last lm_loss {last['lm_loss']:.4f}, sparsity {last['sparsity']:.3f})"
    for name, ev in summary.get("eval", {}).items():
        line += f"; {name}: PPL {ev['ppl']:.3f}, sparsity {ev['sparsity']:.3f}"
    print(line + f"; wrote {args.out / 'summary.json'}")
    return 0
