"""Streaming statistics of one activation site.

Everything is a sum or a count, so two accumulators merge exactly (``a.merge(b)``),
whether they saw different batches or ran in different processes, and memory does not
grow with the number of tokens: it is O(width * len(eps) + histogram bins).

Values arrive as ``(rows, width)`` where a row is one token (or one sample / spatial
position for conv outputs) and a column is one neuron. A row mask excludes padding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

DEFAULT_EPS = (1e-3, 1e-2, 0.05, 0.1, 0.2, 0.5)

# Histogram of |v|: bin 0 holds exact zeros; then log-spaced bins from HIST_LO to HIST_HI
# with HIST_PER_DECADE bins per decade; one underflow bin (0, HIST_LO) and one overflow bin.
HIST_LO_EXP, HIST_HI_EXP, HIST_PER_DECADE = -6, 4, 128
HIST_LOG_BINS = (HIST_HI_EXP - HIST_LO_EXP) * HIST_PER_DECADE
HIST_BINS = HIST_LOG_BINS + 3  # zero, underflow, log bins, overflow


def hist_edges() -> torch.Tensor:
    """Upper edges of bins 1..HIST_BINS-2 (underflow + log bins), float64."""
    exps = torch.arange(0, HIST_LOG_BINS + 1, dtype=torch.float64) / HIST_PER_DECADE + HIST_LO_EXP
    return torch.pow(10.0, exps)


def hist_bin_index(absv: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each |v| (float tensor, finite, >= 0)."""
    logv = torch.log10(absv.clamp_min(1e-30))
    idx = torch.floor((logv - HIST_LO_EXP) * HIST_PER_DECADE).to(torch.int64) + 2
    idx = idx.clamp_(1, HIST_BINS - 1)
    idx[absv < 10.0**HIST_LO_EXP] = 1
    idx[absv == 0] = 0
    return idx


@dataclass
class SiteStats:
    """Running statistics of one site. Per-neuron arrays have length ``width``."""

    width: int
    eps: tuple[float, ...] = DEFAULT_EPS
    rows: int = 0  # rows seen (after masking)
    count: torch.Tensor = field(default=None)  # per neuron: finite values seen
    nonzero: torch.Tensor = field(default=None)  # v != 0
    positive: torch.Tensor = field(default=None)  # v > 0
    le_eps: torch.Tensor = field(default=None)  # (len(eps), width): |v| <= eps
    abs_sum: torch.Tensor = field(default=None)
    sum: torch.Tensor = field(default=None)
    sq_sum: torch.Tensor = field(default=None)
    neg_sum: torch.Tensor = field(default=None)  # sum of v over v < 0
    neg_sq_sum: torch.Tensor = field(default=None)
    pos_sq_sum: torch.Tensor = field(default=None)
    row_nonzero_frac_sum: float = 0.0  # sum over rows of (nonzeros in row / width)
    hist: torch.Tensor = field(default=None)  # HIST_BINS counts of |v|, all neurons
    nonfinite: int = 0
    # temporal statistics over consecutive rows of one sequence
    pairs: int = 0  # consecutive (t-1, t) row pairs seen
    delta_le_eps: torch.Tensor = field(default=None)  # (len(eps), width): |v_t - v_{t-1}| <= eps
    delta_zero: torch.Tensor = field(default=None)  # per neuron: v_t == v_{t-1}
    both_active: torch.Tensor = field(default=None)  # per neuron: active at t-1 and t
    run_starts: torch.Tensor = field(default=None)  # per neuron: active at t, not at t-1 (or t first)
    flow_active: torch.Tensor = field(default=None)  # per neuron: active rows counted for flow

    _PER_NEURON = ("count", "nonzero", "positive", "abs_sum", "sum", "sq_sum", "neg_sum", "neg_sq_sum",
                   "pos_sq_sum", "delta_zero", "both_active", "run_starts", "flow_active")
    _PER_EPS = ("le_eps", "delta_le_eps")
    _INT = ("count", "nonzero", "positive", "le_eps", "hist", "delta_le_eps", "delta_zero", "both_active",
            "run_starts", "flow_active")

    def __post_init__(self):
        self.eps = tuple(float(e) for e in self.eps)
        for name in self._PER_NEURON:
            if getattr(self, name) is None:
                dtype = torch.int64 if name in self._INT else torch.float64
                setattr(self, name, torch.zeros(self.width, dtype=dtype))
        for name in self._PER_EPS:
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(len(self.eps), self.width, dtype=torch.int64))
        if self.hist is None:
            self.hist = torch.zeros(HIST_BINS, dtype=torch.int64)

    # ----------------------------------------------------------------- updates
    @torch.no_grad()
    def update(self, values: torch.Tensor) -> None:
        """Add rows of ``values`` (rows, width). Non-finite entries are counted, then ignored."""
        if values.ndim != 2 or values.shape[1] != self.width:
            raise ValueError(f"expected (rows, {self.width}) values, got {tuple(values.shape)}")
        if values.shape[0] == 0:
            return
        v = values.detach().to(torch.float32)
        finite = torch.isfinite(v)
        n_bad = int(v.numel() - finite.sum())
        if n_bad:
            self.nonfinite += n_bad
            v = torch.where(finite, v, torch.zeros((), dtype=v.dtype))
        absv = v.abs()
        self.rows += v.shape[0]
        fin = finite if n_bad else None

        def count(mask: torch.Tensor) -> torch.Tensor:
            if fin is not None:
                mask = mask & fin
            return mask.sum(0, dtype=torch.int64)

        self.count += count(torch.ones_like(finite)) if fin is not None else v.shape[0]
        nz = v != 0
        self.nonzero += count(nz)
        self.positive += count(v > 0)
        for i, e in enumerate(self.eps):
            self.le_eps[i] += count(absv <= e)
        vd = v.double()
        self.abs_sum += absv.double().sum(0)
        self.sum += vd.sum(0)
        sq = vd * vd
        self.sq_sum += sq.sum(0)
        neg = v < 0
        self.neg_sum += torch.where(neg, vd, 0.0).sum(0)
        self.neg_sq_sum += torch.where(neg, sq, 0.0).sum(0)
        self.pos_sq_sum += torch.where(v > 0, sq, 0.0).sum(0)
        nz_fin = nz if fin is None else nz & fin
        self.row_nonzero_frac_sum += float(nz_fin.sum(1, dtype=torch.float64).sum() / self.width)
        if fin is not None:
            absv = absv[fin]
        self.hist += torch.bincount(hist_bin_index(absv.reshape(-1)), minlength=HIST_BINS)

    @torch.no_grad()
    def update_sequence(self, values: torch.Tensor, valid: torch.Tensor | None = None, *,
                        flow_threshold: float = 0.0) -> None:
        """Add one batch of sequences ``(batch, time, width)``; ``valid`` (batch, time) masks padding.

        Updates the per-row statistics and the temporal ones (deltas between consecutive
        valid tokens of the same sequence, activation runs).
        """
        if values.ndim != 3:
            raise ValueError(f"expected (batch, time, width) values, got {tuple(values.shape)}")
        v = values.detach().to(torch.float32)
        if valid is None:
            valid = torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)
        valid = valid.to(torch.bool)
        self.update(v[valid])
        if v.shape[1] < 1:
            return
        finite = torch.isfinite(v)
        v = torch.where(finite, v, torch.zeros((), dtype=v.dtype))
        active = (v.abs() > flow_threshold) & finite & valid[..., None]
        self.flow_active += active.sum((0, 1), dtype=torch.int64)
        prev_active = torch.zeros_like(active)
        prev_active[:, 1:] = active[:, :-1]
        pair = valid[:, 1:] & valid[:, :-1]
        # a run starts where a neuron is active and was not active on the previous token
        starts = active & ~(prev_active & torch.cat([torch.zeros_like(valid[:, :1]), pair], 1)[..., None])
        self.run_starts += starts.sum((0, 1), dtype=torch.int64)
        if v.shape[1] < 2:
            return
        both_fin = (finite[:, 1:] & finite[:, :-1]) & pair[..., None]
        delta = (v[:, 1:] - v[:, :-1]).abs()
        self.pairs += int(pair.sum())
        for i, e in enumerate(self.eps):
            self.delta_le_eps[i] += ((delta <= e) & both_fin).sum((0, 1), dtype=torch.int64)
        self.delta_zero += ((delta == 0) & both_fin).sum((0, 1), dtype=torch.int64)
        self.both_active += (active[:, 1:] & active[:, :-1] & pair[..., None]).sum((0, 1), dtype=torch.int64)

    # ----------------------------------------------------------------- merging
    def merge(self, other: "SiteStats") -> "SiteStats":
        """Add ``other`` into self (exact: all fields are sums or counts)."""
        if other.width != self.width or other.eps != self.eps:
            raise ValueError(
                f"cannot merge statistics of width {other.width} / eps {other.eps} into width "
                f"{self.width} / eps {self.eps}"
            )
        for f in fields(self):
            if f.name in ("width", "eps"):
                continue
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def copy(self) -> "SiteStats":
        out = SiteStats(self.width, self.eps)
        return out.merge(self)

    # ----------------------------------------------------------- serialisation
    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[prefix + f.name] = value
            elif f.name == "eps":
                out[prefix + f.name] = torch.tensor(value, dtype=torch.float64)
            else:
                dtype = torch.float64 if isinstance(value, float) else torch.int64
                out[prefix + f.name] = torch.tensor([value], dtype=dtype)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> "SiteStats":
        eps = tuple(tensors[prefix + "eps"].tolist())
        width = int(tensors[prefix + "count"].numel())
        kwargs = {}
        for f in fields(cls):
            if f.name in ("width", "eps"):
                continue
            t = tensors.get(prefix + f.name)
            if t is None:
                raise KeyError(f"statistics file is missing {prefix + f.name!r}")
            if f.type in ("int", int):
                kwargs[f.name] = int(t.item())
            elif f.type in ("float", float):
                kwargs[f.name] = float(t.item())
            else:
                kwargs[f.name] = t.clone()
        return cls(width=width, eps=eps, **kwargs)

    # ------------------------------------------------------------- quantiles
    def abs_quantile(self, q: float) -> float:
        """The q-quantile of |v| over all neurons, from the histogram (log-linear within a bin).

        Returns 0.0 when at least a fraction q of the values are exact zeros.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        total = int(self.hist.sum())
        if total == 0:
            raise ValueError("no values captured: cannot compute a quantile")
        cum = torch.cumsum(self.hist, 0).double() / total
        b = int(torch.searchsorted(cum, torch.tensor([q], dtype=torch.float64)).item())
        b = min(b, HIST_BINS - 1)
        if b == 0:
            return 0.0
        edges = hist_edges()
        if b == 1:
            lo, hi = 0.0, float(edges[0])
            prev = float(cum[0])
        elif b == HIST_BINS - 1:
            return float(edges[-1])
        else:
            lo, hi = float(edges[b - 2]), float(edges[b - 1])
            prev = float(cum[b - 1])
        frac = (q - prev) / max(float(cum[b]) - prev, 1e-300)
        frac = min(max(frac, 0.0), 1.0)
        if lo == 0.0:
            return hi * frac
        return lo * (hi / lo) ** frac

    def frac_abs_le(self, t: float) -> float:
        """Fraction of values with |v| <= t, estimated from the histogram (exact at bin edges)."""
        total = int(self.hist.sum())
        if total == 0:
            return math.nan
        if t <= 0:
            return float(self.hist[0]) / total
        edges = hist_edges()
        # bins whose upper edge is <= t are fully included
        k = int(torch.searchsorted(edges, torch.tensor([t], dtype=torch.float64), right=True).item())
        full = int(self.hist[: k + 1].sum())
        if k >= len(edges):
            return full / total
        lo = 0.0 if k == 0 else float(edges[k - 1])
        hi = float(edges[k])
        part = (math.log(t / lo) / math.log(hi / lo)) if lo > 0 else t / hi
        return (full + part * float(self.hist[k + 1])) / total
