"""The one hook layer: owned site hooks and the attention-mask root hook.

Everything in actsparse that reads tensors inside a model goes through here: statistics
capture, calibration, the training losses, and the sparse modules' reached-sparsity
counters. Two pieces:

* :class:`MaskTracker` follows the ``attention_mask`` of the current forward (a pre-hook
  on the root module that sees its kwargs), so padding can be excluded at every site.
* :class:`SiteHooks` is a context manager that registers the tracker plus one callback per
  site and removes exactly the hooks it added, on exit and on error; it never touches hooks
  it did not add, and sessions nest.

Callbacks receive the raw tensor (inputs: the first positional argument; outputs: the
first element of a tuple output) and run inside the model's forward, so they must be
cheap; they keep the autograd graph unless they detach.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from actsparse.models.sitemaps import Site


def attention_mask_of(args, kwargs) -> torch.Tensor | None:
    """The (batch, time) attention mask of a forward call, if it has one."""
    m = kwargs.get("attention_mask")
    if m is None and len(args) >= 2 and isinstance(args[1], torch.Tensor):
        m = args[1]
    return m if isinstance(m, torch.Tensor) and m.ndim == 2 else None


class MaskTracker:
    """The attention mask of the current forward of a root module (None when it has none).

    ``set(mask)`` pins a mask for the next forwards instead (``set(None)``: automatic again).
    ``forwards`` counts the root forwards seen; ``on_forward`` runs at the start of each.
    """

    __slots__ = ("mask", "_explicit", "forwards", "on_forward")

    def __init__(self, on_forward: Callable[[], None] | None = None):
        self.mask: torch.Tensor | None = None
        self._explicit = False
        self.forwards = 0
        self.on_forward = on_forward

    def set(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self._explicit = mask is not None

    def pre_hook(self, module, args, kwargs):
        if not self._explicit:
            self.mask = attention_mask_of(args, kwargs)
        self.forwards += 1
        if self.on_forward is not None:
            self.on_forward()
        return None

    def attach(self, model: nn.Module):
        """Register on ``model``; returns the hook handle."""
        return model.register_forward_pre_hook(self.pre_hook, with_kwargs=True)

    def valid_rows(self, t: torch.Tensor) -> torch.Tensor | None:
        """The (batch, time) bool mask of real tokens if it fits ``t`` (batch, time, width)."""
        m = self.mask
        if m is not None and t.ndim == 3 and tuple(m.shape) == tuple(t.shape[:2]):
            return m.to(t.device).bool()
        return None


def valid_tokens(t: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``t`` as (tokens, width) with only the real tokens when ``valid`` (batch, time) is given;
    2-D tensors pass through; other shapes keep their last dim."""
    if valid is not None:
        return t[valid]
    return t if t.ndim == 2 else t.reshape(-1, t.shape[-1])


SiteCallback = Callable[[torch.Tensor], None]


class SiteHooks:
    """Owned hooks: a :class:`MaskTracker` on the root plus ``(site, callback)`` pairs.

    Several callbacks may watch the same site. ``on_forward`` runs at the start of every
    root forward (e.g. to reset per-forward sums).
    """

    def __init__(self, model: nn.Module, entries: Sequence[tuple[Site, SiteCallback]], *,
                 on_forward: Callable[[], None] | None = None):
        self.model = model
        self.entries = list(entries)
        self.tracker = MaskTracker(on_forward)
        self._handles: list = []

    @property
    def mask(self) -> torch.Tensor | None:
        return self.tracker.mask

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.tracker.set(mask)

    def __enter__(self) -> "SiteHooks":
        if self._handles:
            raise RuntimeError("this hook session is already active")
        try:
            self._handles.append(self.tracker.attach(self.model))
            for site, fn in self.entries:
                module = self.model.get_submodule(site.module_path)
                if site.io == "input":
                    self._handles.append(module.register_forward_pre_hook(_input_hook(fn)))
                else:
                    self._handles.append(module.register_forward_hook(_output_hook(fn)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @property
    def active(self) -> bool:
        return bool(self._handles)


def _input_hook(fn: SiteCallback):
    def hook(module, args):
        if args and isinstance(args[0], torch.Tensor):
            fn(args[0])
    return hook


def _output_hook(fn: SiteCallback):
    def hook(module, args, output):
        t = output[0] if isinstance(output, tuple) else output
        if isinstance(t, torch.Tensor):
            fn(t)
    return hook
