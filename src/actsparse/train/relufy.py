"""ReLUfication: swap the MLP activation for ReLU, optionally add ReLU after the norms.

    changes = relufy_(model)                   # SiLU/GELU -> nn.ReLU in every MLP
    changes = relufy_(model, after_norms=True) # also ReLU after the norms feeding attn + MLP

Which modules change:

* MLP activation: the ``mlp.act`` role of the model's site map (LLaMA/Mistral/Qwen/SmolLM/
  Gemma ``mlp.act_fn``, GPT-2 ``mlp.act``, OPT ``activation_fn``, BERT
  ``intermediate.intermediate_act_fn``). For unmapped models (the generic fallback) every
  module that looks like an elementwise activation (by class name) is swapped. The model
  config's activation field (``hidden_act`` / ``hidden_activation`` /
  ``activation_function``) is set to ``"relu"`` for mapped models, so ``save_pretrained``
  reloads as a ReLU model.
* ``after_norms=True`` (ReLU strikes back, stage 2): the norm in front of attention and
  the norm in front of the MLP of every block get a ReLU on their output:
  LLaMA family / Gemma: ``input_layernorm`` + ``post_attention_layernorm`` (Gemma 2/3:
  ``input_layernorm`` + ``pre_feedforward_layernorm``); GPT-2: ``ln_1`` + ``ln_2``;
  OPT: ``self_attn_layer_norm`` + ``final_layer_norm``. The final norm before the LM head
  is left alone. The norm module keeps its identity, parameters and state-dict keys; its
  class becomes a subclass that applies ``relu`` after the original forward. This part is
  not recorded in the HF config: re-apply ``relufy_(..., after_norms=True)`` after loading.
  Post-norm models (BERT) and the generic fallback raise ConfigError for ``after_norms``.

Idempotent: modules that are already ReLU (or FATReLU / a norm with ReLU) are left as
they are, and a second call returns an empty list.
"""
from __future__ import annotations

import torch
from torch import nn

from actsparse.errors import ConfigError
from actsparse.models.swap import swap_class, swap_module
from actsparse.train.targets import OWNER, Change, activation_paths, norm_paths  # noqa: F401  (Change: public)

CONFIG_ACT_FIELDS = ("hidden_act", "hidden_activation", "activation_function")


class ReLUAfterNorm:
    """Mixin for norm classes: ``relu(norm(x))``. Applied by swapping the module's class."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        return torch.relu(out)


_NORM_CLASSES: dict[type, type] = {}


def _with_relu(cls: type) -> type:
    if cls not in _NORM_CLASSES:
        _NORM_CLASSES[cls] = type(f"{cls.__name__}WithReLU", (ReLUAfterNorm, cls), {"__module__": __name__})
    return _NORM_CLASSES[cls]


def _is_relu(module: nn.Module) -> bool:
    """ReLU already, or one of this package's training activations (left as they are)."""
    from actsparse.train.delta import DeltaActivation
    from actsparse.train.fatrelu import FATReLU
    from actsparse.train.topk import TopKActivation

    return isinstance(module, (nn.ReLU, FATReLU, TopKActivation, DeltaActivation))


def relufy_(model: nn.Module, *, after_norms: bool = False) -> list[Change]:
    """Make ``model`` a ReLU model in place; returns what changed (empty if nothing did)."""
    from actsparse.models.sitemaps import site_map

    changes: list[Change] = []
    paths = activation_paths(model)
    if not paths:
        raise ConfigError(f"found no MLP activation module in {type(model).__name__} to replace with ReLU")
    for path in paths:
        old = model.get_submodule(path)
        if _is_relu(old):
            continue
        swap_module(model, path, nn.ReLU(), owner=OWNER)
        changes.append(Change(path, type(old).__name__, "ReLU"))
    if site_map(model, warn=False).family != "generic":
        config = getattr(model, "config", None)
        for name in CONFIG_ACT_FIELDS:
            if config is not None and isinstance(getattr(config, name, None), str) and getattr(config, name) != "relu":
                changes.append(Change(f"config.{name}", getattr(config, name), "relu"))
                setattr(config, name, "relu")
    if after_norms:
        for path in norm_paths(model):
            norm = model.get_submodule(path)
            if isinstance(norm, ReLUAfterNorm):
                continue
            before = type(norm).__name__
            swap_class(model, path, _with_relu(type(norm)), owner=OWNER)
            changes.append(Change(path, before, type(norm).__name__))
    return changes
