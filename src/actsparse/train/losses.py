"""Activation losses that keep the autograd graph, collected by owned hooks.

    with ActivationL1(model, sites="mlp.down:input") as l1:
        for batch in batches:
            out = model(**batch, labels=labels)
            loss = out.loss + lam * l1.loss        # L1 of the last forward, with graph
            loss.backward()
            print(l1.sparsity)                     # exact-zero fraction of that forward

Each forward of the root module starts a new sum (the root pre-hook clears the terms), so
``.loss`` always belongs to the latest forward and no graph outlives its step. Padding is
excluded through the ``attention_mask`` given to the model's forward (or
:meth:`GraphHooks.set_mask`). Hooks are removed on exit, also on error; hooks the session
did not add are never touched.
"""
from __future__ import annotations

import torch
from torch import nn

from actsparse.measure.capture import SiteSpec, resolve_sites
from actsparse.measure.hooks import SiteHooks, valid_tokens


def rows_and_mask(t: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``t`` as (tokens, width) with only the valid tokens when ``t`` is (batch, time, width)
    and ``mask`` is (batch, time); 2-D tensors pass through; >3-D keep the last dim."""
    fits = t.ndim == 3 and mask is not None and tuple(mask.shape) == tuple(t.shape[:2])
    return valid_tokens(t, mask.to(t.device).bool() if fits else None), (mask if fits else None)


def l1_per_token(h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean over (valid) tokens of ||h_t||_1``; differentiable, gradient ``sign(h) / n``."""
    rows, _ = rows_and_mask(h, mask)
    if rows.shape[0] == 0:
        return h.sum() * 0.0
    return rows.abs().sum() / rows.shape[0]


class GraphHooks:
    """Base context manager: owned forward hooks (the shared hook layer,
    :class:`~actsparse.measure.hooks.SiteHooks`) that keep the graph of site tensors.

    Subclasses implement :meth:`_on_tensor` (called with the site name and tensor) and
    :meth:`_reset` (called at the start of every forward of the root module).
    """

    default_io = "input"

    def __init__(self, model: nn.Module, sites: SiteSpec):
        self.model = model
        self.sites = resolve_sites(model, sites)
        if not self.sites:
            raise ValueError(f"no sites in {type(model).__name__} for spec {sites!r}")
        self._hooks = SiteHooks(model, [(s, self._callback(s.name)) for s in self.sites], on_forward=self._reset)

    def _callback(self, name: str):
        return lambda t: self._on_tensor(name, t)

    @property
    def mask(self) -> torch.Tensor | None:
        return self._hooks.mask

    @property
    def forwards(self) -> int:
        return self._hooks.tracker.forwards

    def __enter__(self):
        if self._hooks.active:
            raise RuntimeError(f"this {type(self).__name__} session is already active")
        self._hooks.__enter__()
        self._reset()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()

    def remove(self) -> None:
        self._hooks.remove()

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Use ``mask`` (batch, time; 1 = real token) instead of the forward's attention_mask."""
        self._hooks.set_mask(mask)

    def _reset(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _on_tensor(self, name: str, t: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class ActivationL1(GraphHooks):
    """ProSparse's L1 term: ``sum over sites of mean over tokens of ||h||_1``.

    Args:
        model: the model (its forward's ``attention_mask`` excludes padding).
        sites: where h is read; default the down-projection input (``mlp.down:input``).
            Any site spec of :func:`actsparse.measure.capture.resolve_sites` works.

    Attributes after a forward: ``loss`` (scalar tensor with graph; 0 before any
    forward), ``per_site`` (detached floats), ``sparsity`` (exact-zero fraction of the
    valid entries over all sites, last forward) and ``total_sparsity`` (the same,
    cumulative since entering or :meth:`reset_totals`).
    """

    def __init__(self, model: nn.Module, sites: SiteSpec = "mlp.down:input"):
        super().__init__(model, sites)
        self.reset_totals()

    def reset_totals(self) -> None:
        self.zeros_total = 0
        self.entries_total = 0

    def _reset(self) -> None:
        self._terms: list[torch.Tensor] = []
        self.per_site: dict[str, float] = {}
        self._zeros = 0
        self._entries = 0

    def _on_tensor(self, name: str, t: torch.Tensor) -> None:
        rows, _ = rows_and_mask(t, self.mask)
        n = rows.shape[0]
        term = rows.abs().sum() / n if n else t.sum() * 0.0
        self._terms.append(term)
        self.per_site[name] = float(term.detach())
        with torch.no_grad():
            z = int((rows == 0).sum())
        self._zeros += z
        self._entries += rows.numel()
        self.zeros_total += z
        self.entries_total += rows.numel()

    @property
    def loss(self) -> torch.Tensor:
        if not self._terms:
            return torch.zeros(())
        return torch.stack([t.float() for t in self._terms]).sum()

    @property
    def sparsity(self) -> float:
        return self._zeros / self._entries if self._entries else float("nan")

    @property
    def total_sparsity(self) -> float:
        return self.zeros_total / self.entries_total if self.entries_total else float("nan")
