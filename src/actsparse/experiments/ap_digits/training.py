"""Reference training loop for the pruning experiments (seeded, deterministic on CPU).

Users keep their own loop; this one exists for the CLI and the benchmark. Every source
of randomness is derived from ``(seed, stream, epoch)``, so a run resumed from a
checkpoint reproduces the uninterrupted run exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from actsparse.config import VersionedConfig
from actsparse.errors import ConfigError
from actsparse.experiments.ap_digits.data import ImageData, batches
from actsparse.prune.dnr import relu_dead_stats


@dataclass(frozen=True)
class TrainConfig(VersionedConfig):
    KIND: ClassVar[str] = "ap-train"
    epochs: int = 15
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"  # "adam" | "sgd" (momentum 0.9)
    weight_decay: float = 0.0
    dnr_samples: int = 256  # training inputs used for the per-epoch DNR (0 = skip)

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")

    def as_dict(self) -> dict:
        return asdict(self)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy in eval mode."""
    was = model.training
    model.eval()
    correct = 0
    for xb, yb in batches(x, y, batch_size):
        correct += int((model(xb).argmax(1) == yb).sum())
    model.train(was)
    return correct / max(1, len(x))


def train(model: nn.Module, data: ImageData, cfg: TrainConfig, *, seed: int, stream: int = 0,
          on_step: Callable[[int], None] | None = None, on_epoch: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train ``cfg.epochs`` epochs with a fresh optimizer. Returns per-epoch records
    ``{"epoch", "loss", "dnr"}`` (DNR on the first ``cfg.dnr_samples`` training inputs).
    ``on_step(step)`` is called before each optimizer step (step counts from 0)."""
    opt = make_optimizer(model, cfg)
    history = []
    step = 0
    x_dnr = data.x_train[: cfg.dnr_samples] if cfg.dnr_samples else None
    for epoch in range(cfg.epochs):
        model.train()
        total, n = 0.0, 0
        for xb, yb in batches(data.x_train, data.y_train, cfg.batch_size, shuffle=True,
                              seed=(seed * 1_000_003 + stream) * 1009 + epoch):
            if on_step is not None:
                on_step(step)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
            n += len(xb)
            step += 1
        rec = {"epoch": epoch + 1, "loss": total / max(1, n)}
        if x_dnr is not None:
            rec["dnr"] = relu_dead_stats(model, x_dnr)["dnr"]
        history.append(rec)
        if on_epoch is not None:
            on_epoch(epoch, rec)
    return history
