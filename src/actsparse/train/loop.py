"""A small reference fine-tuning loop (ReLUfication + ProSparse L1), resumable.

The pieces it uses (``relufy_``, ``ProSparse``, ``ActivationL1``, ``fatrelu_``) are meant
for your own loop; this loop is what ``actsparse finetune`` runs, and it is short on
purpose. Properties:

* deterministic data order indexed by step: update s uses the windows at positions
  ``s*B .. s*B+B-1`` of a sequence of per-epoch permutations seeded by ``(seed, epoch)``,
  so a resumed run sees exactly the batches the uninterrupted run would have seen;
  ``torch.manual_seed`` is also set from ``(seed, step)`` before every update (dropout);
* atomic checkpoints every K steps in ``OUT/checkpoint-<step>/``: ``model.safetensors``
  (tied weights stored once), ``optimizer.safetensors`` (every state tensor) and
  ``state.json`` (step, config, param groups, schedule); ``OUT/latest.json`` is replaced
  last and names the checkpoint to resume from. No pickle, no torch.save;
* ``OUT/log.jsonl``: one line per update: step (updates done), loss, lm_loss, l1, lambda,
  lr, sparsity (exact-zero fraction of the down-projection input on that batch's real
  tokens), seconds. On resume, lines after the checkpoint are dropped, so each step is
  logged once.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import nn

from actsparse.config import VersionedConfig
from actsparse.errors import ConfigError, DataError
from actsparse.io import read_json, write_json, write_safetensors
from actsparse.train.losses import ActivationL1
from actsparse.train.schedule import Constant, ProSparse, Schedule

SCHEDULE_KINDS = ("prosparse", "constant", "none")
# config fields that may differ between a run and its resumption
RESUME_FREE = ("checkpoint_every", "eval_split", "eval_tokens", "eval_batch_size")


@dataclass(frozen=True)
class FinetuneConfig(VersionedConfig):
    """Everything that determines a fine-tuning run (strict JSON round trip)."""

    KIND: ClassVar[str] = "finetune"

    model: str = "smollm2-135m"
    relufy: bool = True
    after_norms: bool = False
    schedule: str = "prosparse"  # prosparse | constant | none
    lam: float = 1e-4  # final L1 weight (ProSparse) or the constant weight
    stages: int = 4  # ProSparse stages (warm-up + sine rises, each doubling lambda)
    steps: int = 100
    data: str = "wiki"
    split: str = "calibration"
    max_tokens: int | None = None  # cap on training tokens (None: the whole split)
    window: int = 256
    batch_size: int = 4
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear learning-rate warm-up
    grad_clip: float | None = 1.0
    fatrelu: float | None = None  # FATReLU threshold applied after training (ProSparse's last stage)
    sites: str = "mlp.down:input"
    seed: int = 0
    checkpoint_every: int = 50
    eval_split: str = "test"
    eval_tokens: int = 8192
    eval_batch_size: int = 4

    def __post_init__(self):
        if self.schedule not in SCHEDULE_KINDS:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULE_KINDS)}, got {self.schedule!r}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam)) or self.lam < 0:
            raise ConfigError(f"lambda must be a finite number >= 0, got {self.lam!r}")
        for name in ("steps", "window", "batch_size", "checkpoint_every", "stages", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.window < 2:
            raise ConfigError(f"window must be >= 2, got {self.window}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.eval_tokens < 0:
            raise ConfigError("warmup_steps and eval_tokens must be >= 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.after_norms and not self.relufy:
            raise ConfigError("after_norms needs relufy")
        if self.fatrelu is not None:
            from actsparse.train.fatrelu import check_threshold

            check_threshold(self.fatrelu)
            if not self.relufy:
                raise ConfigError("fatrelu needs relufy (FATReLU replaces the MLP activation)")

    def build_schedule(self) -> Schedule:
        if self.schedule == "none":
            return Constant(0.0)
        if self.schedule == "constant":
            return Constant(self.lam)
        return ProSparse.even(self.lam, self.steps, stages=self.stages)


# ------------------------------------------------------------------ data order
def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Window indices of update ``step`` (0-based): a pure function of its arguments."""
    if n < 1:
        raise ValueError("no windows to train on")
    out = []
    perms: dict[int, torch.Tensor] = {}
    for p in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(p, n)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=g)
        out.append(int(perms[epoch][pos]))
    return torch.tensor(out, dtype=torch.long)


# ----------------------------------------------------------------- checkpoints
def model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with shared storage stored once: (tensors, {alias: stored name})."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, aliases


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as safetensors-ready tensors plus JSON-able param groups / scalars."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, _, k = key.partition(".")
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, _, k = key.partition(".")
        state.setdefault(int(pid), {})[k] = v
    groups = meta["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(out: Path, step: int, model: nn.Module, optimizer, extra: dict, *,
                    params: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``out/checkpoint-<step>`` atomically, then point ``out/latest.json`` at it and
    delete older checkpoints. ``params``: store only these named tensors (the trained ones)
    instead of the whole model."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{name}."))
    try:
        if params is None:
            mt, aliases = model_tensors(model)
        else:
            mt, aliases = {k: v.detach().cpu().contiguous() for k, v in params.items()}, {}
        write_safetensors(tmp / "model.safetensors", mt, metadata={"step": str(step)})
        ot, ometa = optimizer_tensors(optimizer)
        write_safetensors(tmp / "optimizer.safetensors", ot, metadata={"step": str(step)})
        write_json(tmp / "state.json", {"step": step, "aliases": aliases, "optimizer": ometa, **extra})
        final = out / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json(out / "latest.json", {"step": step, "checkpoint": name})
    for old in out.glob("checkpoint-*"):
        if old.name != name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out: Path, model: nn.Module, optimizer, *,
                    params: dict[str, torch.Tensor] | None = None) -> dict | None:
    """Restore the latest checkpoint in ``out`` into model and optimizer; returns its
    state.json (None when there is none). ``params``: the checkpoint holds only these named
    tensors (see :func:`save_checkpoint`); they are copied in place."""
    from safetensors.torch import load_file

    latest = out / "latest.json"
    if not latest.is_file():
        return None
    info = read_json(latest)
    ckpt = out / info["checkpoint"]
    state = read_json(ckpt / "state.json")
    if state["step"] != info["step"]:
        raise DataError(f"{ckpt} holds step {state['step']} but latest.json says {info['step']}")
    tensors = load_file(str(ckpt / "model.safetensors"))
    for alias, name in state.get("aliases", {}).items():
        tensors[alias] = tensors[name]
    if params is None:
        model.load_state_dict(tensors, strict=True)
    else:
        if set(tensors) != set(params):
            extra = sorted(set(tensors) ^ set(params))
            raise DataError(f"{ckpt} holds other trained tensors than this run trains (e.g. {extra[0]})")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[k])
    load_optimizer(optimizer, load_file(str(ckpt / "optimizer.safetensors")), state["optimizer"])
    return state


def truncate_log(path: Path, step: int) -> None:
    """Keep the lines of a JSON-lines log whose ``step`` is <= ``step`` (resume)."""
    if not path.is_file():
        return
    keep = []
    with open(path) as fh:
        for line in fh:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by the interruption
    from actsparse.io import write_text

    write_text(path, "".join(keep))


def _comparable(cfg: dict, free: tuple[str, ...] = RESUME_FREE) -> dict:
    return {k: v for k, v in cfg.items() if k not in free + ("kind", "version")}


def resume_or_start(out: Path, resume: bool, model: nn.Module, optimizer, config, *,
                    free: tuple[str, ...] = RESUME_FREE, params: dict[str, torch.Tensor] | None = None) -> int:
    """The step a run in ``out`` starts at: 0 for a fresh run (an old log removed), or the latest
    checkpoint's step (model, ``params`` and optimizer restored; log lines after it dropped),
    refusing a checkpoint made with other settings than ``config`` (keys in ``free`` may differ)."""
    log_path = out / "log.jsonl"
    if not (out / "latest.json").is_file():
        if log_path.exists():
            log_path.unlink()
        return 0
    if not resume:
        raise ConfigError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    state = load_checkpoint(out, model, optimizer, params=params)
    now = config.to_dict()
    if _comparable(state["config"], free) != _comparable(now, free):
        diff = sorted(k for k in _comparable(now, free) if state["config"].get(k) != now[k])
        raise ConfigError(f"cannot resume {out}: the run was started with different settings ({', '.join(diff)})")
    start = int(state["step"])
    truncate_log(log_path, start)
    return start


# ------------------------------------------------------------------------ loop
def train_loop(model: nn.Module, windows, config: FinetuneConfig, out: str | os.PathLike, *,
               resume: bool = False, progress: bool = True,
               callback: Callable[[dict], None] | None = None) -> dict:
    """Fine-tune ``model`` on ``windows`` (:class:`actsparse.data.text.Windows`) with
    ``loss = lm_loss + schedule(step) * L1(config.sites)`` for ``config.steps`` updates.

    The model must already be prepared (relufied); it is trained in place. With
    ``resume=True`` the latest checkpoint in ``out`` (if any) is restored first and
    training continues from its step. ``callback(record)`` runs after every update (a
    raised exception stops the run, as an interruption would). Returns the last record.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    schedule = config.build_schedule()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    log_path = out / "log.jsonl"
    start = resume_or_start(out, resume, model, optimizer, config)
    n = len(windows)
    model.train()
    extra = {"use_cache": False} if "use_cache" in _forward_params(model) else {}
    record: dict = {"step": start}
    if start >= config.steps:
        return record
    bar = tqdm(total=config.steps, initial=start, desc="finetune", unit="step", disable=not progress)
    t0 = time.perf_counter()
    try:
        with ActivationL1(model, config.sites) as l1, open(log_path, "a") as log:
            for step in range(start, config.steps):
                torch.manual_seed(config.seed * 1_000_003 + step)
                idx = batch_indices(step, config.batch_size, n, config.seed)
                ids = windows.input_ids[idx]
                mask = windows.attention_mask[idx]
                labels = ids.masked_fill(mask == 0, -100)
                lr = config.lr * (min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                lam = schedule(step)
                out_ = model(input_ids=ids, attention_mask=mask, labels=labels, **extra)
                lm_loss = out_.loss
                l1_loss = l1.loss
                loss = lm_loss + lam * l1_loss if lam > 0 else lm_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                record = {"step": step + 1, "loss": float(loss.detach()), "lm_loss": float(lm_loss.detach()),
                          "l1": float(l1_loss.detach()),
                          "lambda": lam, "lr": lr, "sparsity": l1.sparsity,
                          "seconds": round(time.perf_counter() - t0, 3)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{record['lm_loss']:.3f}", lam=f"{lam:.2e}", sparsity=f"{l1.sparsity:.3f}")
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                    save_checkpoint(out, step + 1, model, optimizer,
                                    {"config": config.to_dict(), "schedule": schedule.to_dict()})
                if callback is not None:
                    callback(record)
    finally:
        bar.close()
        model.eval()
    return record


def _forward_params(model: nn.Module) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()
