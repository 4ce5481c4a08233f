"""actsparse: measure, induce and exploit activation sparsity in PyTorch models.

Imports are cheap: heavy modules (transformers, numba) load on first use.
"""
from __future__ import annotations

import importlib

from actsparse.version import __version__

# public name -> module that defines it
_LAZY = {
    "load": "actsparse.models.loading",
    "ModelBundle": "actsparse.models.loading",
    "site_map": "actsparse.models.sitemaps",
    "text": "actsparse.data.text",
    "token_windows": "actsparse.data.text",
    "capture": "actsparse.measure.capture",
    "run": "actsparse.measure.capture",
    "profile": "actsparse.measure.profile",
    "Profile": "actsparse.measure.profile",
    "SiteStats": "actsparse.measure.accumulators",
    "metrics": "actsparse.measure",
    "sparsify_": "actsparse.sparsify", "desparsify_": "actsparse.sparsify", "calibrate": "actsparse.sparsify",
    "iter_sparse_modules": "actsparse.sparsify", "make_config": "actsparse.sparsify",
    "register_method": "actsparse.sparsify", "register_handler": "actsparse.sparsify",
    "perplexity": "actsparse.eval.perplexity",
    "save_plan": "actsparse.sparsify.plan", "load_plan": "actsparse.sparsify.plan",
    "rotate_": "actsparse.sparsify.rotation", "save_rotation": "actsparse.sparsify.rotation",
    "load_rotation": "actsparse.sparsify.rotation",
    "relufy_": "actsparse.train.relufy", "fatrelu_": "actsparse.train.fatrelu", "FATReLU": "actsparse.train.fatrelu",
    "ProSparse": "actsparse.train.schedule", "ActivationL1": "actsparse.train.losses",
    "TopKActivation": "actsparse.train.topk", "DeltaActivation": "actsparse.train.delta",
    "redo_reset_": "actsparse.train.redo", "dormant_masks": "actsparse.train.redo",
    "drm_perturb_": "actsparse.train.redo", "ReLUBalance": "actsparse.train.balance",
    "finetune": "actsparse.experiments.finetune", "FinetuneConfig": "actsparse.train.loop",
    "accelerate_": "actsparse.decode", "deaccelerate_": "actsparse.decode", "FastDecoder": "actsparse.decode",
    "DecodePlan": "actsparse.decode",
    "contrast": "actsparse.measure.contrast", "ContrastResult": "actsparse.measure.contrast",
    "Intervention": "actsparse.intervention", "Switch": "actsparse.intervention", "intervene": "actsparse.intervention",
    "intervene_": "actsparse.intervention", "unintervene_": "actsparse.intervention",
    "moefy": "actsparse.moe", "MoEPlan": "actsparse.moe", "apply_moe_": "actsparse.moe", "remove_moe_": "actsparse.moe",
}

# method configs (TEAL, CATS, ... and any registered later) are found in actsparse.sparsify
_METHOD_CONFIGS = ("TEAL", "CATS", "CHESS", "TopK", "WINA", "CETT", "RSparse")

__all__ = sorted(_LAZY) + list(_METHOD_CONFIGS) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        if name.startswith("_"):
            raise AttributeError(f"module 'actsparse' has no attribute {name!r}")
        sparsify = importlib.import_module("actsparse.sparsify")
        config = next((c for c in sparsify.registry.METHODS.values() if c.__name__ == name), None)
        if config is None:
            raise AttributeError(f"module 'actsparse' has no attribute {name!r}")
        value = config
    else:
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
