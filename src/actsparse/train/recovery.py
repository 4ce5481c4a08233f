"""Recovery training of a sparsified model: a short distillation fine-tune against the dense
model, resumable, training only LoRA adapters or only norms (and biases).

    student = the model with a plan installed (sparsify_ / load_plan; thresholds fixed)
    teacher = the dense model (a separate copy, evaluated under no_grad)
    loss    = KL(teacher || student) on the logits of every real token (train.distill)

The masks stay in the forward; with ``straight_through`` (the default) their gradient is the
identity (``sparsify.modules.straight_through``), so the trained parameters upstream of a
mask see the gradient of the dense product. The loop reuses the pieces of
:mod:`actsparse.train.loop`: data order indexed by step (``batch_indices``), atomic
checkpoints (here of the trained tensors and the optimizer only), the log truncated on
resume. The learning rate is constant after its warm-up, so a run of N steps is the prefix
of one of M > N steps: ``steps`` may grow on resume (a run is extended, never re-done).

The trained artefact (:func:`save_recovery`: ``recovery.json`` + ``recovery.safetensors``)
names the model weights and the plan it was trained for; :func:`load_recovery` refuses
another model or plan.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import nn

from actsparse.config import VersionedConfig
from actsparse.errors import ConfigError, DataError, StateError
from actsparse.io import read_json, write_json, write_safetensors
from actsparse.sparsify.modules import iter_sparse_modules, reached_sparsity, reset_counts, straight_through
from actsparse.train.distill import kl_on_logits
from actsparse.train.loop import batch_indices, resume_or_start, save_checkpoint

TRAINABLE = ("lora", "norms")
FORMAT = "actsparse.recovery/1"
# config fields that may differ between a run and its resumption (steps: a run may be extended)
RESUME_FREE = ("steps", "tokens", "checkpoint_every", "eval_every", "eval_tokens", "final_tokens",
               "eval_batch_size")


@dataclass(frozen=True)
class RecoveryConfig(VersionedConfig):
    """Everything that determines a recovery run (strict JSON round trip)."""

    KIND: ClassVar[str] = "recovery"

    model: str = "smollm2-135m"
    plan: str | None = None  # a plan directory; None: calibrate TEAL at `sparsity`
    sparsity: float = 0.5
    calib_tokens: int = 16384
    calib_window: int = 1024
    trainable: str = "lora"  # lora | norms
    lora_rank: int = 8
    lora_alpha: float = 16.0
    tokens: int = 32768  # training-token budget; steps = ceil(tokens / (batch_size * window))
    data: str = "wiki"
    split: str = "calibration"
    window: int = 512
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    temperature: float = 1.0
    straight_through: bool = True
    seed: int = 0
    checkpoint_every: int = 8
    eval_every: int = 8  # steps between points of the held-out curve
    eval_tokens: int = 4096  # test tokens per curve point
    final_tokens: int = 16384  # test tokens of the final figure (0: none)
    eval_window: int = 1024
    eval_batch_size: int = 2

    def __post_init__(self):
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        for name in ("tokens", "window", "batch_size", "lora_rank", "checkpoint_every", "eval_every",
                     "calib_tokens", "calib_window", "eval_window", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.window < 2:
            raise ConfigError(f"window must be >= 2, got {self.window}")
        if not 0 < self.sparsity < 1:
            raise ConfigError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if not self.lr > 0 or not self.temperature > 0:
            raise ConfigError("lr and temperature must be > 0")
        if self.warmup_steps < 0 or self.eval_tokens < 0 or self.final_tokens < 0:
            raise ConfigError("warmup_steps, eval_tokens and final_tokens must be >= 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0 or None, got {self.grad_clip}")

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / (self.batch_size * self.window))


# ------------------------------------------------------------ trained params
def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of every norm module (RMSNorm / LayerNorm, by class name) and every bias of
    the model's linears: what "norms only" trains."""
    out: dict[str, nn.Parameter] = {}
    for path, m in model.named_modules():
        name = type(m).__name__
        prefix = f"{path}." if path else ""
        if name.endswith("Norm") or isinstance(m, nn.LayerNorm):
            out.update({prefix + n: p for n, p in m.named_parameters(recurse=False)})
        elif getattr(m, "bias", None) is not None and isinstance(m.bias, nn.Parameter) and hasattr(m, "weight"):
            out[prefix + "bias"] = m.bias
    if not out:
        raise ConfigError(f"{type(model).__name__} has no norm weights or biases to train: use trainable='lora'")
    return out


def prepare_trainable_(model: nn.Module, config: RecoveryConfig) -> dict[str, nn.Parameter]:
    """Freeze ``model`` but for what ``config.trainable`` trains (adding the LoRA adapters
    first); returns those parameters by name, in model order."""
    from actsparse.train.lora import add_lora_, lora_parameters

    if not any(True for _ in iter_sparse_modules(model)):
        raise StateError("recovery training needs a sparsified model: install a plan first (sparsify_ or load_plan)")
    if config.trainable == "lora":
        add_lora_(model, config.lora_rank, config.lora_alpha, seed=config.seed)
        params = lora_parameters(model)
    else:
        params = norm_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return params


# ----------------------------------------------------------------- the loop
def _forward_logits(model: nn.Module, ids, mask) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]




def recovery_loop(student: nn.Module, teacher: nn.Module, windows, config: RecoveryConfig,
                  params: dict[str, nn.Parameter], out: str | os.PathLike, *, resume: bool = False,
                  progress: bool = True, callback: Callable[[dict], None] | None = None) -> dict:
    """Train ``params`` of ``student`` to match ``teacher``'s logits on ``windows`` for
    ``config.steps`` updates (KL on real tokens, AdamW, constant lr after warm-up).

    ``OUT/log.jsonl``: one line per update: step, tokens (real tokens trained on so far), kl,
    lr, sparsity (mean reached sparsity of the sparse modules on that batch), teacher_s,
    student_s (forward+backward+update), seconds (since this process started training).
    Checkpoints hold only ``params`` and the optimizer state. ``resume=True`` continues the
    latest checkpoint in ``out`` (``steps`` may be larger than the run's). ``callback(record)``
    runs after every update and its checkpoint. Returns the last record."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plist = list(params.values())
    optimizer = torch.optim.AdamW(plist, lr=config.lr, weight_decay=config.weight_decay)
    log_path = out / "log.jsonl"
    start = resume_or_start(out, resume, student, optimizer, config, free=RESUME_FREE, params=params)
    n = len(windows)
    tokens = sum(int(windows.attention_mask[batch_indices(s, config.batch_size, n, config.seed)].sum())
                 for s in range(start))
    record: dict = {"step": start, "tokens": tokens}
    if start >= config.steps:
        return record
    teacher.eval()
    student.train()
    bar = tqdm(total=config.steps, initial=start, desc="recover", unit="step", disable=not progress)
    t0 = time.perf_counter()
    try:
        with open(log_path, "a") as log:
            for step in range(start, config.steps):
                torch.manual_seed(config.seed * 1_000_003 + step)
                idx = batch_indices(step, config.batch_size, n, config.seed)
                ids, mask = windows.input_ids[idx], windows.attention_mask[idx]
                lr = config.lr * (min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                ta = time.perf_counter()
                with torch.no_grad():
                    t_logits = _forward_logits(teacher, ids, mask)
                tb = time.perf_counter()
                reset_counts(student)
                if config.straight_through:
                    with straight_through(student):
                        s_logits = _forward_logits(student, ids, mask)
                else:
                    s_logits = _forward_logits(student, ids, mask)
                loss = kl_on_logits(s_logits, t_logits, mask, temperature=config.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(plist, config.grad_clip)
                optimizer.step()
                tc = time.perf_counter()
                tokens += int(mask.sum())
                reached = [v for v in reached_sparsity(student).values() if not math.isnan(v)]
                record = {"step": step + 1, "tokens": tokens, "kl": float(loss.detach()), "lr": lr,
                          "sparsity": sum(reached) / len(reached) if reached else float("nan"),
                          "teacher_s": round(tb - ta, 3), "student_s": round(tc - tb, 3),
                          "seconds": round(tc - t0, 3)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(kl=f"{record['kl']:.4f}", tokens=tokens)
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                    save_checkpoint(out, step + 1, student, optimizer, {"config": config.to_dict(), "tokens": tokens},
                                    params=params)
                if callback is not None:
                    callback(record)
    finally:
        bar.close()
        student.eval()
    return record


# ------------------------------------------------------------------ artefact
def plan_fingerprint(model: nn.Module) -> str:
    """A hash of the installed plan: every sparse module's path, mode, k and threshold values."""
    h = hashlib.sha256()
    for path, m in iter_sparse_modules(model):
        h.update(f"{path}:{type(m).__name__}:{m.mode}:{m.k}:".encode())
        for t in (m.threshold, getattr(m, "centre", None), getattr(m, "offset", None)):
            if isinstance(t, torch.Tensor):
                h.update(t.detach().float().cpu().numpy().tobytes())
            else:
                h.update(repr(t).encode())
    return h.hexdigest()[:16]


def _base_identity(model: nn.Module) -> dict:
    from actsparse.sparsify.api import sparsity_state

    return sparsity_state(model).identity  # the weights the plan was installed on


def save_recovery(model: nn.Module, path: str | os.PathLike, params: dict[str, torch.Tensor],
                  config: RecoveryConfig, *, meta: dict | None = None) -> Path:
    """Write the trained tensors of a recovered ``model`` (``recovery.safetensors``) and what
    they fit (``recovery.json``: the config, the base weights identity, the plan fingerprint)."""
    from actsparse.version import __version__

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "recovery.safetensors",
                      {k: v.detach().cpu().contiguous() for k, v in params.items()}, metadata={"format": FORMAT})
    write_json(directory / "recovery.json", {
        "format": FORMAT, "actsparse": __version__, "config": config.to_dict(), "trainable": config.trainable,
        "model": _base_identity(model), "plan_fingerprint": plan_fingerprint(model), "tensors": sorted(params),
        "meta": meta or {}})
    return directory


def load_recovery(model: nn.Module, path: str | os.PathLike) -> dict[str, nn.Parameter]:
    """Apply a saved recovery to ``model``, which must carry the very plan it was trained with
    (``load_plan`` first) on the same base weights; returns the loaded parameters."""
    from safetensors.torch import load_file

    from actsparse.sparsify.plan import check_identity
    from actsparse.train.lora import add_lora_, lora_parameters

    directory = Path(path)
    jf, tf = directory / "recovery.json", directory / "recovery.safetensors"
    if not jf.is_file() or not tf.is_file():
        raise ConfigError(f"{directory} is not a saved recovery (needs recovery.json and recovery.safetensors)")
    doc = read_json(jf)
    if doc.get("format") != FORMAT:
        raise ConfigError(f"{jf} has format {doc.get('format')!r}, expected {FORMAT!r}")
    if not any(True for _ in iter_sparse_modules(model)):
        raise StateError(f"{directory} recovers a sparsified model: load its plan first (load_plan)")
    check_identity(doc["model"], _base_identity(model), f"recovery {directory}")
    fp = plan_fingerprint(model)
    if fp != doc["plan_fingerprint"]:
        raise ConfigError(f"recovery {directory} was trained with another plan (plan fingerprint "
                          f"{doc['plan_fingerprint']} vs the installed plan's {fp}): load the plan it was trained "
                          f"with (saved next to it by `actsparse recover`)")
    config = RecoveryConfig.from_dict(doc["config"])
    tensors = load_file(str(tf))
    if config.trainable == "lora":
        add_lora_(model, config.lora_rank, config.lora_alpha, seed=config.seed)
        params = lora_parameters(model)
    else:
        params = norm_parameters(model)
    if set(tensors) != set(params):
        diff = sorted(set(tensors) ^ set(params))
        raise DataError(f"{tf} does not hold the tensors this model trains ({diff[0]} ...)")
    with torch.no_grad():
        for k, p in params.items():
            if tuple(tensors[k].shape) != tuple(p.shape):
                raise DataError(f"{tf}: {k} has shape {tuple(tensors[k].shape)}, the model's is {tuple(p.shape)}")
            p.copy_(tensors[k])
    return params
