"""Streaming co-activation counts of one layer's neurons (what Read-ME-style expert clustering reads).

A neuron is *active* on a token when its ``|v|`` is among the token's ``k`` largest
(``k = round(rate * width)``): top-k per token, not a global threshold. Why top-k: it needs
no first pass (a threshold that gives a chosen rate must be read from a histogram first);
every token contributes the same number of active neurons, so the few tokens with massive
activations (BOS, the first positions) do not dominate the counts as they would above a
fixed threshold; and it is the same per-token budget the top-k expert MLP spends.

:class:`Coactivation` keeps, for one site of width ``n``:

* ``co[i, j]``: tokens on which neurons i and j were both active (int64, exact; the diagonal
  is each neuron's active count),
* ``abs_sum[i]``: the sum of ``|v_i|`` (float64),
* ``rows``: tokens seen; ``nonfinite_rows``: tokens skipped because a value was NaN / inf.

Memory is O(n^2) (a 1536-wide layer: 18.9 MB) and does not grow with tokens; two
accumulators of the same width and rate merge exactly (``a.merge(b)``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from actsparse.errors import ConfigError

CHUNK_ROWS = 2048  # rows per matmul: A^T A of 0/1 float32 entries is exact below 2^24 rows


def active_count(rate: float, width: int) -> int:
    """Active neurons per token for ``rate`` of ``width`` (at least 1)."""
    if not 0.0 < rate <= 1.0:
        raise ConfigError(f"the co-activation rate must be in (0, 1], got {rate}")
    return max(1, round(rate * width))


@dataclass
class Coactivation:
    width: int
    rate: float
    rows: int = 0
    nonfinite_rows: int = 0
    co: torch.Tensor = None  # (width, width) int64
    abs_sum: torch.Tensor = None  # (width,) float64

    def __post_init__(self):
        self.k = active_count(self.rate, self.width)
        if self.co is None:
            self.co = torch.zeros(self.width, self.width, dtype=torch.int64)
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(self.width, dtype=torch.float64)
        if tuple(self.co.shape) != (self.width, self.width) or tuple(self.abs_sum.shape) != (self.width,):
            raise ValueError(f"co-activation tensors of shapes {tuple(self.co.shape)} / {tuple(self.abs_sum.shape)} "
                             f"do not fit width {self.width}")

    @property
    def active(self) -> torch.Tensor:
        """Per neuron: tokens on which it was active (the diagonal of ``co``)."""
        return self.co.diagonal().clone()

    @torch.no_grad()
    def update(self, values: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add ``values`` (rows, width), or (batch, time, width) with ``valid`` (batch, time)
        marking the real tokens. Rows holding a NaN / inf are counted and skipped."""
        v = values.detach()
        if v.ndim == 3:
            v = v[valid.to(v.device).bool()] if valid is not None else v.reshape(-1, v.shape[-1])
        if v.ndim != 2 or v.shape[1] != self.width:
            raise ValueError(f"expected (rows, {self.width}) values, got {tuple(values.shape)}")
        for r0 in range(0, v.shape[0], CHUNK_ROWS):
            chunk = v[r0:r0 + CHUNK_ROWS].to(torch.float32).cpu().abs()
            ok = torch.isfinite(chunk).all(1)
            if not bool(ok.all()):
                self.nonfinite_rows += int((~ok).sum())
                chunk = chunk[ok]
            if chunk.shape[0] == 0:
                continue
            top = chunk.topk(self.k, dim=1).indices
            hits = torch.zeros_like(chunk).scatter_(1, top, 1.0)
            self.co += (hits.T @ hits).round().to(torch.int64)
            self.abs_sum += chunk.sum(0, dtype=torch.float64)
            self.rows += chunk.shape[0]

    def merge(self, other: "Coactivation") -> "Coactivation":
        if other.width != self.width or other.rate != self.rate:
            raise ValueError(f"cannot merge co-activation counts of width {other.width} / rate {other.rate} into "
                             f"width {self.width} / rate {self.rate}")
        self.rows += other.rows
        self.nonfinite_rows += other.nonfinite_rows
        self.co += other.co
        self.abs_sum += other.abs_sum
        return self

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + "co": self.co, prefix + "abs_sum": self.abs_sum,
                prefix + "rows": torch.tensor([self.rows, self.nonfinite_rows], dtype=torch.int64),
                prefix + "rate": torch.tensor([self.rate], dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> "Coactivation":
        co = tensors[prefix + "co"].clone()
        rows, bad = (int(x) for x in tensors[prefix + "rows"].tolist())
        return cls(int(co.shape[0]), float(tensors[prefix + "rate"].item()), rows, bad, co,
                   tensors[prefix + "abs_sum"].clone())

    def correlation(self) -> torch.Tensor:
        """``co[i, j] / sqrt(co[i, i] co[j, j])`` in float64 (0 for a neuron never active):
        the cosine of two neurons' 0/1 activity vectors over the tokens seen."""
        d = self.co.diagonal().to(torch.float64).clamp_min(1.0).sqrt()
        return self.co.to(torch.float64) / d[:, None] / d[None, :]


@torch.no_grad()
def layer_coactivation(model, windows, *, rate: float, site_role: str = "mlp.down:input", batch_size: int = 4,
                       progress: bool = False) -> dict[int, Coactivation]:
    """Co-activation counts of every layer's ``site_role`` (default: the down projection's input,
    ``act(gate) * up``) over ``windows``; padding is excluded. Returns ``{layer: Coactivation}``."""
    from actsparse.measure.capture import resolve_sites, run

    hooks, out = coactivation_hooks(model, {s.layer: s for s in resolve_sites(model, [site_role])}, rate)
    with hooks:
        run(model, windows.batches(batch_size), progress=progress, desc="co-activation",
            total=windows.num_batches(batch_size))
    return out


def coactivation_hooks(model, sites: dict, rate: float):
    """Owned hooks (a :class:`~actsparse.measure.hooks.SiteHooks`, not yet entered) that fold
    every forward's activations at ``sites`` (key -> Site) into ``{key: Coactivation}``, the
    dict returned beside them; padding is excluded."""
    from actsparse.measure.hooks import SiteHooks

    out: dict = {}
    hooks = None

    def reducer(key):
        def fold(t: torch.Tensor) -> None:
            acc = out.get(key)
            if acc is None:
                acc = out[key] = Coactivation(t.shape[-1], rate)
            acc.update(t, hooks.tracker.valid_rows(t) if t.ndim == 3 else None)
        return fold

    hooks = SiteHooks(model, [(s, reducer(k)) for k, s in sites.items()])
    return hooks, out
