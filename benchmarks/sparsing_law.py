"""Sparsing Law trend: activation ratio over training for ReLU vs SiLU, from scratch.

    .venv/bin/python benchmarks/sparsing_law.py [--steps 200] [--out benchmarks/results/sparsing_law.json]

Two small LLaMA-style models (transformers ``LlamaConfig``: ``--layers`` layers, hidden
``--hidden``, intermediate 4x, gated MLP, vocabulary of the SmolLM2 tokenizer, context
``--context``) are trained from scratch on the wiki calibration split, identical in every
respect (same seed, so the same initial weights; the same batches in the same order; the
same AdamW settings) except ``hidden_act`` (relu vs silu).

Tracked every ``--every`` updates on a fixed probe of validation-split windows (never
trained on):

* threshold activation ratios of the MLP activation output ``a = act(gate)`` and of the
  down-projection input ``h = a * up``: the fraction of entries with ``|v| > eps``
  (eps = 0, 1e-3, 1e-2, 0.1); for ReLU the eps = 0 ratio is 1 - exact-zero sparsity;
* validation loss on the probe.

At the updates listed by ``--pplp-at`` (fractions of the run) and at the end: the
Sparsing Law's PPL-1% activation ratio, ``1 - PPL-1% sparsity``: one CETT value shared by
all layers is bisected (``actsparse.eval.perplexity.ppl_p_search``, per layer the
threshold on ``|h_i| * ||W_down[:, i]||`` giving that CETT, from ``--cett-tokens``
calibration-split tokens) so that perplexity on the probe rises by at most 1%; the
sparsity is the fraction of down-projection inputs cut at that point. Writes JSON and a
PNG next to it. One torch thread.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time

import torch

from actsparse.io import write_json
from actsparse.provenance import git_hash

EPS = (0.0, 1e-3, 1e-2, 0.1)


def make_model(act: str, vocab: int, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=args.context,
                      hidden_act=act, tie_word_embeddings=True, attention_dropout=0.0)
    torch.manual_seed(args.seed)  # the same initial weights for both activations
    return LlamaForCausalLM(cfg)


class Probe:
    """Counts ``|v| > eps`` on the activation output and the down-projection input of every
    layer, over the real tokens of one forward."""

    def __init__(self, model):
        self.model = model
        self.handles = []
        self.mask = None
        self.counts = {}

    def __enter__(self):
        for i, layer in enumerate(self.model.model.layers):
            self.handles.append(layer.mlp.act_fn.register_forward_hook(self._hook(f"act.{i}", out=True)))
            self.handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._hook(f"h.{i}", out=False)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, name, out):
        def hook(module, args, output=None):
            v = output if out else args[0]
            rows = v[self.mask.bool()] if self.mask is not None else v.reshape(-1, v.shape[-1])
            a = rows.detach().abs()
            c = self.counts.setdefault(name, [0] * (len(EPS) + 1))
            c[0] += a.numel()
            for k, eps in enumerate(EPS):
                c[k + 1] += int((a > eps).sum())
        if out:
            return lambda m, a, o: hook(m, a, o)
        return lambda m, a: hook(m, a)

    def ratios(self, prefix: str) -> dict:
        keys = [k for k in self.counts if k.startswith(prefix + ".")]
        tot = sum(self.counts[k][0] for k in keys)
        return {f"eps={eps:g}": sum(self.counts[k][j + 1] for k in keys) / tot for j, eps in enumerate(EPS)}

    def per_layer(self, prefix: str, j: int) -> list[float]:
        keys = sorted((k for k in self.counts if k.startswith(prefix + ".")), key=lambda k: int(k.split(".")[1]))
        return [self.counts[k][j + 1] / self.counts[k][0] for k in keys]


@torch.no_grad()
def probe(model, windows) -> dict:
    import torch.nn.functional as F

    model.eval()
    nll, n = 0.0, 0
    with Probe(model) as p:
        for b in windows.batches(4):
            ids, mask = b["input_ids"], b["attention_mask"]
            p.mask = mask
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            valid = (mask[:, 1:] * mask[:, :-1]).bool()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            nll += float(loss.reshape(valid.shape)[valid].double().sum())
            n += int(valid.sum())
    model.train()
    return {"val_loss": nll / n, "act_ratio_act": p.ratios("act"), "act_ratio_h": p.ratios("h"),
            "act_ratio_act_per_layer_eps0": p.per_layer("act", 0),
            "act_ratio_act_per_layer_eps0.01": p.per_layer("act", 2)}


def pplp(model, cal, val, args) -> dict:
    from actsparse.eval.perplexity import perplexity, ppl_p_search
    from actsparse.sparsify.api import calibrate
    from actsparse.sparsify.cett import CETT

    model.eval()
    t0 = time.perf_counter()
    try:
        make = lambda x: CETT(cett=x, sample_tokens=args.cett_tokens)  # noqa: E731
        stats = calibrate(model, make(0.2), cal)
        dense = perplexity(model, val).ppl
        r = ppl_p_search(model, make, stats, val, dense, p=1.0, lo=0.0, hi=args.cett_hi, steps=args.pplp_steps)
    finally:
        model.train()
    sp = r["reached_sparsity"].get("mlp.down:input", math.nan)
    return {"cett": r["knob"], "dense_ppl": dense, "ppl": r["ppl"], "ratio": r["ratio"], "sparsity": sp,
            "activation_ratio": 1 - sp, "search": r["search"], "seconds": round(time.perf_counter() - t0, 1)}


def train(act: str, tok, train_w, val_w, cal_w, args) -> dict:
    from actsparse.train.loop import batch_indices

    model = make_model(act, len(tok), args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    pplp_steps = sorted({max(1, round(f * args.steps)) for f in args.pplp_at} | {args.steps})
    curve, pplps, losses = [], [], []
    t0 = time.perf_counter()
    train_seconds = 0.0
    rec = probe(model, val_w)
    curve.append({"step": 0, "tokens": 0, **rec})
    model.train()
    for step in range(args.steps):
        ts = time.perf_counter()
        idx = batch_indices(step, args.batch_size, len(train_w), args.seed)
        ids, mask = train_w.input_ids[idx], train_w.attention_mask[idx]
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_seconds += time.perf_counter() - ts
        losses.append(out.loss.item())
        s = step + 1
        tokens = s * args.batch_size * args.context
        if s % args.every == 0 or s == args.steps:
            rec = probe(model, val_w)
            curve.append({"step": s, "tokens": tokens, "train_loss": losses[-1], **rec})
            print(f"[{act}] step {s} train {losses[-1]:.3f} val {rec['val_loss']:.3f} "
                  f"act>0 {rec['act_ratio_act']['eps=0']:.3f} |act|>0.01 {rec['act_ratio_act']['eps=0.01']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if s in pplp_steps:
            r = pplp(model, cal_w, val_w, args)
            pplps.append({"step": s, "tokens": tokens, **r})
            print(f"[{act}] step {s} PPL-1%: CETT {r['cett']:.4f}, sparsity {r['sparsity']:.4f}, "
                  f"activation ratio {r['activation_ratio']:.4f} ({r['seconds']} s)", flush=True)
    return {"act": act, "curve": curve, "pplp": pplps, "train_loss": losses,
            "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
            "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--pplp-at", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.25, 0.5, 0.75])
    ap.add_argument("--pplp-steps", type=int, default=8, help="bisection steps of the PPL-1%% search")
    ap.add_argument("--cett-hi", type=float, default=0.9)
    ap.add_argument("--cett-tokens", type=int, default=512)
    ap.add_argument("--val-tokens", type=int, default=2048)
    ap.add_argument("--acts", default="relu,silu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="actsparse-out/sparsing_law.json",
                    help="JSON path (default: %(default)s; the committed result is regenerated "
                         "only with an explicit --out benchmarks/results/sparsing_law.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    import actsparse as asp
    from actsparse.data.text import text, token_windows

    t0 = time.perf_counter()
    tok = _tokenizer()
    train_w = token_windows(tok, text("wiki", "calibration"), window=args.context)
    val_w = token_windows(tok, text("wiki", "validation"), window=args.context, max_tokens=args.val_tokens)
    # CETT thresholds come from calibration-split text (disjoint from the validation probe)
    cal_w = token_windows(tok, text("wiki", "calibration"), window=args.context, max_tokens=max(args.cett_tokens, 256))
    runs = {}
    for act in [a.strip() for a in args.acts.split(",") if a.strip()]:
        runs[act] = train(act, tok, train_w, val_w, cal_w, args)
    result = {
        "experiment": "Sparsing Law trend: activation ratio over training, ReLU vs SiLU LLaMA-style models "
                      "trained from scratch, identical except hidden_act",
        "protocol": {
            "model": {"family": "LlamaForCausalLM (gated MLP)", "layers": args.layers, "hidden": args.hidden,
                      "intermediate": 4 * args.hidden, "heads": args.heads, "context": args.context,
                      "vocab": len(tok), "tied_embeddings": True, "init_seed": args.seed},
            "training": {"data": "wiki calibration split", "train_windows": len(train_w),
                         "train_tokens_available": train_w.tokens, "updates": args.steps,
                         "batch_size": args.batch_size, "tokens_per_update": args.batch_size * args.context,
                         "optimizer": "AdamW betas (0.9, 0.95)", "lr": args.lr, "warmup": args.warmup,
                         "schedule": "linear warm-up, then constant", "weight_decay": args.weight_decay,
                         "grad_clip": 1.0},
            "probe": {"data": "wiki validation split", "windows": len(val_w), "tokens": val_w.tokens,
                      "every": args.every,
                      "activation_ratio_threshold": "fraction of entries with |v| > eps over all layers and real "
                                                    "tokens; act = MLP activation output, h = down_proj input"},
            "pplp": {"p": 1.0, "knob": "one CETT value for all layers, bisection", "range": [0.0, args.cett_hi],
                     "steps": args.pplp_steps, "cett_calibration_tokens": cal_w.tokens,
                     "cett_calibration_data": "wiki calibration split",
                     "ppl_data": "the validation probe windows",
                     "activation_ratio": "1 - fraction of down_proj inputs cut at the PPL-1% CETT"},
            "threads": args.threads, "dtype": "float32",
            "command": "python benchmarks/sparsing_law.py " + " ".join(sys.argv[1:] if argv is None else argv),
        },
        "runs": runs,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "actsparse": asp.__version__},
        "git": git_hash(short=False),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    out = write_json(args.out, result)
    plot(result, str(out).rsplit(".", 1)[0] + ".png")
    print(f"wrote {out}", flush=True)
    return 0


def _tokenizer():
    """The SmolLM2 tokenizer (loaded with the embedded model, which is then dropped)."""
    import actsparse as asp

    model, tok = asp.load("smollm2-135m")
    del model
    return tok


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"relu": "tab:red", "silu": "tab:blue"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    for act, run in result["runs"].items():
        c = colors.get(act, None)
        tokens = [r["tokens"] for r in run["curve"][1:]]
        if act == "relu":
            axes[0].plot(tokens, [r["act_ratio_act"]["eps=0"] for r in run["curve"][1:]], color=c,
                         label="ReLU: act > 0")
        axes[0].plot(tokens, [r["act_ratio_act"]["eps=0.01"] for r in run["curve"][1:]], color=c, ls="--",
                     label=f"{act}: |act| > 0.01")
        axes[0].plot(tokens, [r["act_ratio_act"]["eps=0.1"] for r in run["curve"][1:]], color=c, ls=":",
                     label=f"{act}: |act| > 0.1")
        pp = run["pplp"]
        axes[1].plot([r["tokens"] for r in pp], [r["activation_ratio"] for r in pp], color=c, marker="o",
                     label=f"{act}")
        axes[2].plot(tokens, [r["val_loss"] for r in run["curve"][1:]], color=c, label=f"{act} (validation probe)")
    axes[0].set_ylabel("activation ratio (threshold)")
    axes[0].set_title("MLP activation output, validation probe", fontsize=10)
    axes[1].set_ylabel("PPL-1% activation ratio (1 - CETT sparsity of h)")
    axes[1].set_title("Sparsing Law activation ratio", fontsize=10)
    axes[2].set_ylabel("validation loss")
    for ax in axes:
        ax.set_xlabel("training tokens")
        ax.legend(fontsize=8)
    m = result["protocol"]["model"]
    fig.suptitle(f"From scratch: {m['layers']} layers, hidden {m['hidden']}, intermediate {m['intermediate']}, "
                 f"context {m['context']}; identical except hidden_act", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
