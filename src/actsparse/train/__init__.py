"""Inducing activation sparsity by training: modules, losses and schedules that plug into
your own training loop, plus one small reference loop (``actsparse finetune``).

Modules load lazily (``from actsparse.train import relufy_`` imports only what it needs).
"""
from __future__ import annotations

import importlib

_LAZY = {
    "relufy_": "actsparse.train.relufy",
    "Change": "actsparse.train.relufy",
    "ProSparse": "actsparse.train.schedule",
    "Constant": "actsparse.train.schedule",
    "LinearDecay": "actsparse.train.schedule",
    "schedule_from_dict": "actsparse.train.schedule",
    "ActivationL1": "actsparse.train.losses",
    "l1_per_token": "actsparse.train.losses",
    "FATReLU": "actsparse.train.fatrelu",
    "fatrelu_": "actsparse.train.fatrelu",
    "TopKActivation": "actsparse.train.topk",
    "topk_activation": "actsparse.train.topk",
    "DeltaActivation": "actsparse.train.delta",
    "delta_loss": "actsparse.train.delta",
    "redo_reset_": "actsparse.train.redo",
    "dormant_masks": "actsparse.train.redo",
    "dormant_scores_by_site": "actsparse.train.redo",
    "drm_alpha": "actsparse.train.redo",
    "drm_perturb_": "actsparse.train.redo",
    "exploration_noise": "actsparse.train.redo",
    "ReLUBalance": "actsparse.train.balance",
    "balance_loss": "actsparse.train.balance",
    "FinetuneConfig": "actsparse.train.loop",
    "train_loop": "actsparse.train.loop",
    "finetune": "actsparse.train.loop",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'actsparse.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
