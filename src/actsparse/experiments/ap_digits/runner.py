"""Pruning runs (one host, AP on/off, one seed) and the AP benchmark sweep.

A run trains the dense net (level 0), then for each cycle c = 1..cycles prunes
``rate`` of the surviving weights (host ``rate - ap``, AP ``ap``; see ``actsparse.prune.ap``),
rewinds and retrains ``epochs`` epochs, recording test accuracy, DNR and static dead
neurons at every level and DNR after every epoch. Orchestration by host:

- ``magnitude``: one-shot. Level c is reached in one step from the trained dense net
  (same remaining count as the iterative schedule; AP removes ``floor(ap * S_{c-1})``,
  the share it has in the last iterative step; movement = dense training), then rewound
  and trained.
- ``imp``, ``random``: iterative; score the trained weights, prune, rewind, retrain.
- ``snip``, ``grasp``, ``synflow``: iterative pruning at the rewind point: rewind first,
  score there (with the current mask), prune; AP uses the movement of the cycle just
  trained (``w_end`` = trained weights).

Rewind point: the initial weights (``rewind_iter=0``) or the weights before optimizer
step ``rewind_iter`` of the dense training. AP's ``w_start`` is the rewind point.

Resume: after each level the state is checkpointed under ``work_dir/<run id>/`` as
safetensors (model state incl. masks) + ``progress.json``, written atomically; a rerun
with the same config continues after the last completed level and gives the same
result as an uninterrupted run (all randomness is derived from seed/cycle/epoch).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import nn

from actsparse.config import VersionedConfig
from actsparse.errors import ConfigError
from actsparse.experiments.ap_digits.data import DATASETS, load_dataset
from actsparse.experiments.ap_digits.nets import MODELS, build_model
from actsparse.experiments.ap_digits.training import TrainConfig, evaluate, train
from actsparse.io import read_json, write_json, write_safetensors
from actsparse.prune.ap import check_rates, prune_cycle, snapshot_weights, split_counts
from actsparse.prune.dnr import relu_dead_stats
from actsparse.prune.hosts import (HOSTS, count_surviving, count_total, ensure_pruned, get_host,
                                   prunable_parameters)

RUN_FORMAT = 2


@dataclass(frozen=True)
class RunConfig(VersionedConfig):
    KIND: ClassVar[str] = "ap-run"
    model: str = "mlp"
    host: str = "imp"
    ap: float = 0.0
    rate: float = 0.2
    cycles: int = 13
    seed: int = 0
    dataset: str = "digits"
    rewind_iter: int = 0
    score_batch: int = 256
    synflow_rounds: int = 100
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; valid models: {', '.join(MODELS)}")
        if self.host not in HOSTS:
            raise ConfigError(f"unknown host {self.host!r}; valid hosts: {', '.join(HOSTS)}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; valid datasets: {', '.join(DATASETS)}")
        check_rates(self.rate, self.ap)
        if self.cycles < 0:
            raise ConfigError(f"cycles must be >= 0, got {self.cycles}")
        if self.rewind_iter < 0:
            raise ConfigError(f"rewind_iter must be >= 0, got {self.rewind_iter}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["train"] = self.train.as_dict()
        return d

    def run_id(self) -> str:
        h = hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.model}-{self.host}-ap{self.ap:g}-s{self.seed}-{h}"


def remaining_schedule(total: int, rate: float, cycles: int) -> list[int]:
    """Surviving counts S_0..S_cycles with S_c = S_{c-1} - floor(rate * S_{c-1})."""
    s = [total]
    for _ in range(cycles):
        s.append(s[-1] - int(math.floor(rate * s[-1] + 1e-9)))
    return s


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _load(model: nn.Module, sd: dict[str, torch.Tensor], masks: bool = True) -> None:
    if not masks:
        sd = {k: v for k, v in sd.items() if not k.endswith("_mask")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if masks or not k.endswith("_mask")]
    if bad or unexpected:
        raise ConfigError(f"checkpoint does not fit the model (missing {bad[:3]}, unexpected {unexpected[:3]})")


def _read_st(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


class Interrupted(Exception):
    """Raised by ``run_pruning(stop_after=...)`` to simulate an interruption (tests)."""


def run_pruning(cfg: RunConfig, work_dir: str | os.PathLike, *, data=None, progress: Callable[[str], None] | None = None,
                stop_after: int | None = None, resume: bool = True) -> dict:
    """Run (or resume) one pruning run; returns ``{"config", "levels", "run_id", ...}``.

    ``stop_after=c`` raises ``Interrupted`` right after level c is checkpointed.
    """
    data = data or load_dataset(cfg.dataset)
    run_dir = Path(work_dir) / cfg.run_id()
    prog_path = run_dir / "progress.json"
    model = build_model(cfg.model, data.input_shape, data.num_classes, seed=cfg.seed)
    params = prunable_parameters(model)
    ensure_pruned(params)
    total = count_total(params)
    sched = remaining_schedule(total, cfg.rate, cfg.cycles)
    g = torch.Generator().manual_seed(cfg.seed + 7919)
    idx = torch.randperm(len(data.x_train), generator=g)[: cfg.score_batch]
    score_batch = (data.x_train[idx], data.y_train[idx])
    oneshot = cfg.host == "magnitude"

    levels: list[dict] = []
    start = 0
    rewind_sd: dict[str, torch.Tensor] | None = None
    dense_sd: dict[str, torch.Tensor] | None = None
    if resume and prog_path.exists():
        prog = read_json(prog_path)
        if prog.get("config") != cfg.as_dict() or prog.get("format") != RUN_FORMAT:
            raise ConfigError(f"{run_dir} holds a run with a different config; use another work dir")
        levels = prog["levels"]
        start = prog["completed"] + 1
        _load(model, _read_st(run_dir / prog["state_file"]))
        rewind_sd = _read_st(run_dir / "rewind.safetensors")
        if oneshot:
            dense_sd = _read_st(run_dir / "dense.safetensors")

    def capture_rewind(step: int):
        nonlocal rewind_sd
        if step == cfg.rewind_iter and rewind_sd is None:
            rewind_sd = {k: v for k, v in _state(model).items() if not k.endswith("_mask")}

    for c in range(start, cfg.cycles + 1):
        t0 = time.time()
        counts = {"host_pruned": 0, "ap_requested": 0, "ap_pruned": 0, "host_fill": 0}
        if c > 0:
            host = get_host(cfg.host, **_host_kwargs(cfg, c))
            w_start_model = None
            if oneshot:
                _load(model, dense_sd)  # trained dense net, all-ones masks
                # AP's share is that of the last iterative step: floor(ap * S_{c-1})
                n_ap = int(math.floor(cfg.ap * sched[c - 1] + 1e-9))
                n_host = (total - sched[c]) - n_ap
            else:
                n_host, n_ap = split_counts(sched[c - 1], cfg.rate, cfg.ap)
            w_end = snapshot_weights(model, params)
            # AP's w_start: the rewind point (the start of every cycle)
            cur = _state(model)
            _load(model, rewind_sd, masks=False)
            w_start = snapshot_weights(model, params)
            if HOSTS[cfg.host].score_at != "init":
                _load(model, cur)
            res = prune_cycle(model, host, n_host=n_host, n_ap=n_ap, w_start=w_start, w_end=w_end,
                              batch=score_batch, parameters=params)
            counts = {"host_pruned": res.host_pruned, "ap_requested": res.ap_requested, "ap_pruned": res.ap_pruned,
                      "host_fill": res.host_fill}
            _load(model, rewind_sd, masks=False)  # rewind survivors (masks stay)
        survivors = count_surviving(params)
        if survivors != sched[c]:
            raise RuntimeError(f"level {c}: {survivors} survivors, expected {sched[c]}")
        hist = train(model, data, cfg.train, seed=cfg.seed, stream=c,
                     on_step=capture_rewind if c == 0 else None,
                     on_epoch=(lambda e, r: progress(f"level {c} epoch {e + 1}")) if progress else None)
        if c == 0 and rewind_sd is None:
            raise ConfigError(f"rewind_iter={cfg.rewind_iter} is past the end of the dense training")
        dead = relu_dead_stats(model, data.x_train)
        rec = {
            "cycle": c,
            "remaining": survivors,
            "remaining_frac": survivors / total,
            "test_acc": evaluate(model, data.x_test, data.y_test),
            "train_acc": evaluate(model, data.x_train, data.y_train),
            "dnr": dead["dnr"],
            "dnr_layer_mean": dead["dnr_layer_mean"],
            "static_dead": dead["static_dead"],
            "static_dead_frac": dead["static_dead_frac"],
            "layers": dead["layers"],
            "epochs": hist,
            **counts,
            "seconds": time.time() - t0,
        }
        levels.append(rec)
        # checkpoint: state file first, then progress.json (atomic); old state removed after
        run_dir.mkdir(parents=True, exist_ok=True)
        if c == 0:
            write_safetensors(run_dir / "rewind.safetensors", rewind_sd)
            if oneshot:
                dense_sd = _state(model)
                write_safetensors(run_dir / "dense.safetensors", dense_sd)
        state_file = f"level_{c:03d}.safetensors"
        write_safetensors(run_dir / state_file, _state(model))
        write_json(prog_path, {"format": RUN_FORMAT, "config": cfg.as_dict(), "completed": c,
                               "state_file": state_file, "levels": levels})
        for old in run_dir.glob("level_*.safetensors"):
            if old.name != state_file:
                old.unlink(missing_ok=True)
        if progress:
            progress(f"level {c} done: remaining {survivors / total:.1%} acc {rec['test_acc']:.3f} dnr {rec['dnr']:.3f}")
        if stop_after is not None and c == stop_after and c < cfg.cycles:
            raise Interrupted(f"stopped after level {c}")
    return {"run_id": cfg.run_id(), "config": cfg.as_dict(), "total_weights": total, "levels": levels}


def _host_kwargs(cfg: RunConfig, cycle: int) -> dict:
    if cfg.host == "random":
        return {"seed": cfg.seed * 1000 + cycle}
    if cfg.host == "synflow":
        return {"rounds": cfg.synflow_rounds}
    return {}


# --------------------------------------------------------------------------- sweep


@dataclass(frozen=True)
class SweepConfig(VersionedConfig):
    KIND: ClassVar[str] = "ap-sweep"
    models: tuple[str, ...] = ("mlp", "cnn")
    hosts: tuple[str, ...] = tuple(HOSTS)
    aps: tuple[float, ...] = (0.0, 0.02)
    seeds: tuple[int, ...] = (0, 1, 2)
    rate: float = 0.2
    cycles: int = 13
    dataset: str = "digits"
    synflow_rounds: int = 100
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20))
    # per-model epochs per cycle, overriding train.epochs (the CNN costs ~7x the MLP per epoch)
    model_epochs: tuple[tuple[str, int], ...] = (("mlp", 20), ("cnn", 8))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["train"] = self.train.as_dict()
        d["model_epochs"] = dict(self.model_epochs)
        return d

    def train_for(self, model: str) -> TrainConfig:
        ep = dict(self.model_epochs).get(model)
        return replace(self.train, epochs=ep) if ep else self.train

    def runs(self) -> list[RunConfig]:
        return [RunConfig(model=m, host=h, ap=a, rate=self.rate, cycles=self.cycles, seed=s, dataset=self.dataset,
                          synflow_rounds=self.synflow_rounds, train=self.train_for(m))
                for m in self.models for h in self.hosts for s in self.seeds for a in self.aps]


QUICK = SweepConfig(models=("mlp", "cnn"), hosts=tuple(HOSTS), aps=(0.0, 0.02), seeds=(0,), cycles=2,
                    synflow_rounds=10, train=TrainConfig(epochs=1, dnr_samples=64), model_epochs=())


def _mean_std(xs: list[float]) -> dict:
    t = torch.tensor(xs, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(xs) > 1 else 0.0, "n": len(xs),
            "min": float(t.min()), "max": float(t.max())}


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float((ra.norm() * rb.norm()))
    return float((ra * rb).sum()) / den if den else float("nan")


def aggregate(runs: list[dict], high_level_max_frac: float = 0.15) -> dict:
    """Means/spreads per (model, host, ap, level) and the two claims' evidence."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        c = r["config"]
        groups.setdefault((c["model"], c["host"], c["ap"]), []).append(r)
    summary = []
    for (m, h, a), rs in sorted(groups.items()):
        for li in range(min(len(r["levels"]) for r in rs)):
            lv = [r["levels"][li] for r in rs]
            summary.append({
                "model": m, "host": h, "ap": a, "cycle": li, "remaining_frac": lv[0]["remaining_frac"],
                "test_acc": _mean_std([x["test_acc"] for x in lv]),
                "dnr": _mean_std([x["dnr"] for x in lv]),
                "static_dead_frac": _mean_std([x["static_dead_frac"] for x in lv]),
                "seeds": [r["config"]["seed"] for r in rs],
            })
    # claim 1: DNR vs pruning level (AP off), per model/host and seed
    claim1 = []
    for (m, h, a), rs in sorted(groups.items()):
        if a != 0.0:
            continue
        rhos, drops = [], []
        for r in rs:
            fr = [x["remaining_frac"] for x in r["levels"]]
            d = [x["dnr"] for x in r["levels"]]
            rhos.append(_spearman(fr, d))  # > 0: DNR falls as remaining weights fall
            drops.append(d[0] - d[-1])
        claim1.append({"model": m, "host": h, "spearman_remaining_vs_dnr": _mean_std(rhos),
                       "dnr_dense_minus_sparsest": _mean_std(drops),
                       "holds": bool(sum(rhos) / len(rhos) > 0 and sum(drops) / len(drops) > 0)})
    # claim 2: AP on minus off at high pruning levels, paired by seed
    claim2 = []
    for (m, h, a), rs in sorted(groups.items()):
        if a == 0.0 or (m, h, 0.0) not in groups:
            continue
        off = {r["config"]["seed"]: r for r in groups[(m, h, 0.0)]}
        dacc, ddnr = [], []
        for r in rs:
            o = off.get(r["config"]["seed"])
            if o is None:
                continue
            hi = [i for i, x in enumerate(r["levels"]) if x["remaining_frac"] <= high_level_max_frac]
            if not hi:
                hi = [len(r["levels"]) - 1]
            dacc.append(sum(r["levels"][i]["test_acc"] - o["levels"][i]["test_acc"] for i in hi) / len(hi))
            ddnr.append(sum(r["levels"][i]["dnr"] - o["levels"][i]["dnr"] for i in hi) / len(hi))
        if dacc:
            claim2.append({"model": m, "host": h, "ap": a,
                           "levels_remaining_le": high_level_max_frac,
                           "acc_gain": _mean_std(dacc), "dnr_change": _mean_std(ddnr),
                           "lowers_dnr": bool(sum(ddnr) / len(ddnr) < 0),
                           "raises_acc": bool(sum(dacc) / len(dacc) > 0)})
    return {"summary": summary, "claim1_dnr_falls_with_pruning": claim1, "claim2_ap_at_high_pruning": claim2}


def versions() -> dict:
    import numpy
    import sklearn

    from actsparse.version import __version__

    return {"actsparse": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "scikit-learn": sklearn.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "threads": torch.get_num_threads()}


def run_sweep(sweep: SweepConfig, out_dir: str | os.PathLike, work_dir: str | os.PathLike, *,
              progress=None, plots: bool = True, name: str = "ap") -> dict:
    """Run every (model, host, ap, seed) (resuming finished levels), write ``<out>/<name>.json``
    (atomically, after every run) and the plots ``<out>/<name>_*.png``."""
    out_dir = Path(out_dir)
    data = load_dataset(sweep.dataset)
    cfgs = sweep.runs()
    results = []
    t0 = time.time()
    for i, cfg in enumerate(cfgs):
        if progress:
            progress(i, len(cfgs), cfg)
        results.append(run_pruning(cfg, work_dir, data=data))
        doc = {
            "benchmark": "AP (Activating-while-Pruning) on host pruners",
            "config": sweep.as_dict(),
            "data": {"dataset": sweep.dataset, "train": len(data.x_train), "test": len(data.x_test),
                     "split": "stratified 70/30, split_seed 0, standardised with train mean/std"},
            "versions": versions(),
            "complete": i + 1 == len(cfgs),
            "runs_done": i + 1, "runs_total": len(cfgs),
            "wall_seconds": time.time() - t0,
            "notes": NOTES,
            **aggregate(results),
            "runs": results,
        }
        write_json(out_dir / f"{name}.json", doc)
    if progress:
        progress(len(cfgs), len(cfgs), None)
    if plots:
        from actsparse.experiments.ap_digits.plots import plot_all

        doc["plots"] = [str(p) for p in plot_all(doc, out_dir, name)]
        write_json(out_dir / f"{name}.json", doc)
    return doc


NOTES = [
    "rate p per cycle; AP count n_ap = floor(a * S), host count floor(p * S) - n_ap, S = survivors at cycle start",
    "AP picks negative surviving weights with least |w_end - w_start| globally, ties by flat index;"
    " if fewer negative survivors exist the host removes the shortfall (host_fill), so AP on/off"
    " always reach the same remaining count",
    "magnitude is one-shot from the trained dense net to each level; AP then removes floor(a * S_{c-1})",
    "dnr: zeros / outputs pooled over all ReLU layers on the full training split at the end of each level;"
    " per-epoch dnr on the first train.dnr_samples training inputs",
    "static_dead_frac: ReLU neurons (conv: channels) never > 0 over the training split / all ReLU neurons",
    "claim 2 compares AP on vs off paired by seed, averaged over levels with remaining_frac <= 0.15",
    "biases and BatchNorm parameters are never pruned; torch.set_num_threads(1)",
]
