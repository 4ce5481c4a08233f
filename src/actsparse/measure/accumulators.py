"""Streaming statistics of one activation site.

Everything is a sum or a count, so two accumulators merge exactly (``a.merge(b)``),
whether they saw different batches or ran in different processes, and memory does not
grow with the number of tokens: it is O(width * len(eps) + histogram bins).

Values arrive as ``(rows, width)`` where a row is one token (or one sample / spatial
position for conv outputs) and a column is one neuron. A row mask excludes padding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from actsparse.measure import fused
from actsparse.measure.histogram import HIST_BINS, hist_bin_index, hist_lower_edges  # noqa: F401  (re-exported)

DEFAULT_EPS = (1e-3, 1e-2, 0.05, 0.1, 0.2, 0.5)
LIGHT_CHUNK_ROWS = 1024  # rows per step of the torch light update (its temporaries are O(rows x width))

def _column_bincount(codes: torch.Tensor, n_codes: int) -> torch.Tensor:
    """Per-column histogram of small integer ``codes`` (rows, width) -> (width, n_codes)."""
    width = codes.shape[1]
    offsets = torch.arange(width, dtype=torch.int64) * n_codes
    flat = (codes.to(torch.int64) + offsets).reshape(-1)
    return torch.bincount(flat, minlength=width * n_codes).reshape(width, n_codes)


def _use_numba(backend: str | None) -> bool:
    if backend not in (None, "numba", "torch"):
        raise ValueError(f"backend must be 'numba', 'torch' or None, got {backend!r}")
    if backend == "torch":
        return False
    enabled = fused.numba_enabled()
    if backend == "numba" and not enabled:
        raise RuntimeError("numba backend requested but numba is missing or ACTSPARSE_DISABLE_NUMBA is set")
    return enabled


@dataclass
class SiteStats:
    """Running statistics of one site. Per-neuron arrays have length ``width``.

    Counts are int64 and exact. Sums are float64 accumulations of per-batch float32 column
    sums, so merging is exact up to float64 rounding.
    """

    width: int
    eps: tuple[float, ...] = DEFAULT_EPS
    rows: int = 0  # rows (tokens) seen after masking
    nonfinite: int = 0  # NaN / inf entries: counted, then excluded from everything else
    count: torch.Tensor = None  # per neuron: finite values seen
    nonzero: torch.Tensor = None  # v != 0
    positive: torch.Tensor = None  # v > 0
    le_eps: torch.Tensor = None  # (len(eps), width): |v| <= eps
    abs_sum: torch.Tensor = None
    sum: torch.Tensor = None
    sq_sum: torch.Tensor = None
    pos_sum: torch.Tensor = None  # sum of v over v > 0
    pos_sq_sum: torch.Tensor = None
    hist: torch.Tensor = None  # HIST_BINS counts of |v| over all neurons
    # temporal statistics over consecutive valid tokens of one sequence
    pairs: int = 0  # (t-1, t) token pairs seen
    delta_zero: torch.Tensor = None  # per neuron: v_t == v_{t-1}
    delta_le_eps: torch.Tensor = None  # (len(eps), width): |v_t - v_{t-1}| <= eps
    flow_active: torch.Tensor = None  # per neuron: tokens with |v| > flow threshold
    both_active: torch.Tensor = None  # per neuron: active at t-1 and at t

    _FLOAT = ("abs_sum", "sum", "sq_sum", "pos_sum", "pos_sq_sum")
    _INT = ("count", "nonzero", "positive", "delta_zero", "flow_active", "both_active")
    _PER_EPS = ("le_eps", "delta_le_eps")

    def __post_init__(self):
        self.eps = tuple(sorted(float(e) for e in self.eps))
        if any(e <= 0 for e in self.eps):
            raise ValueError(f"eps values must be > 0, got {self.eps}")
        for name in self._FLOAT:
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(self.width, dtype=torch.float64))
        for name in self._INT:
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(self.width, dtype=torch.int64))
        for name in self._PER_EPS:
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(len(self.eps), self.width, dtype=torch.int64))
        if self.hist is None:
            self.hist = torch.zeros(HIST_BINS, dtype=torch.int64)
        self._bounds = torch.tensor((0.0,) + self.eps, dtype=torch.float32)

    @property
    def run_starts(self) -> torch.Tensor:
        """Per neuron: active tokens not preceded by an active token of the same sequence."""
        return self.flow_active - self.both_active

    # ----------------------------------------------------------------- updates
    def _eps_codes(self, absv: torch.Tensor) -> torch.Tensor:
        """0 for exact zeros, i for eps[i-2] < |v| <= eps[i-1], len(eps)+1 above all eps."""
        return torch.bucketize(absv, self._bounds)

    @torch.no_grad()
    def update(self, values: torch.Tensor, *, backend: str | None = None) -> None:
        """Add rows of ``values`` (rows, width). Non-finite entries are counted, then ignored.

        ``backend``: "numba" (one fused pass), "torch" (reference), or None for numba when
        available."""
        if values.ndim != 2 or values.shape[1] != self.width:
            raise ValueError(f"expected (rows, {self.width}) values, got {tuple(values.shape)}")
        if _use_numba(backend):
            v = values.detach().to(torch.float32).cpu()
            fused.reduce_into(self, v.numpy()[None], np.ones((1, v.shape[0]), dtype=np.bool_),
                              temporal=False, flow_threshold=0.0)
            return
        self._update_torch(values)

    @torch.no_grad()
    def update_light(self, values: torch.Tensor, valid: torch.Tensor | None = None, *,
                     scale: torch.Tensor | None = None, backend: str | None = None) -> None:
        """Add ``values`` to the fields a threshold needs only: the |v| histogram, per-neuron
        counts, nonzeros and |v| sums (the other fields stay as they are).

        ``values``: (rows, width), or (batch, time, width) with ``valid`` (batch, time) marking
        the real tokens; ``scale``: statistics of ``|v_j| * scale_j`` instead of ``|v_j|``.
        Non-finite entries are counted, then ignored. The numba pass reads the tensor in place
        (no masked copy, no temporaries: calibration's memory stays flat)."""
        v = values.detach()
        if v.ndim == 2:
            v, valid = v[None], None
        if v.ndim != 3 or v.shape[-1] != self.width:
            raise ValueError(f"expected (rows, {self.width}) or (batch, time, {self.width}) values, got "
                             f"{tuple(values.shape)}")
        if _use_numba(backend):
            ok = torch.ones(v.shape[:2], dtype=torch.bool) if valid is None else valid.cpu().to(torch.bool)
            s = None if scale is None else scale.detach().to(torch.float32).cpu().numpy()
            fused.reduce_light_into(self, v.to(torch.float32).cpu().numpy(), ok.numpy(), s)
            return
        flat = v.reshape(-1, v.shape[-1])
        keep = valid.to(v.device).bool().reshape(-1) if valid is not None else None
        for r0 in range(0, flat.shape[0], LIGHT_CHUNK_ROWS):  # bounded temporaries, not one per tensor
            rows = flat[r0:r0 + LIGHT_CHUNK_ROWS]
            if keep is not None:
                rows = rows[keep[r0:r0 + LIGHT_CHUNK_ROWS]]
            rows = rows.to(torch.float32)
            self._update_light_rows(rows.abs() * scale.to(rows.device) if scale is not None else rows)

    def _update_light_rows(self, v: torch.Tensor) -> None:
        bad = ~torch.isfinite(v)
        n_bad = int(bad.sum())
        absv = v.abs()
        if n_bad:
            self.nonfinite += n_bad
            absv = absv.masked_fill(bad, 0.0)
        self.rows += v.shape[0]
        valid = v.shape[0] - (bad.sum(0) if n_bad else 0)
        self.count += valid
        self.nonzero += (absv != 0).sum(0)
        self.abs_sum += absv.sum(0, dtype=torch.float64)
        hist = torch.bincount(hist_bin_index(absv).reshape(-1), minlength=HIST_BINS)
        if n_bad:
            hist[0] -= n_bad
        self.hist += hist

    def _update_torch(self, values: torch.Tensor) -> None:
        n_rows = values.shape[0]
        if n_rows == 0:
            return
        v = values.detach().to(torch.float32)
        bad = ~torch.isfinite(v)
        n_bad = int(bad.sum())
        bad_per_col = None
        if n_bad:
            self.nonfinite += n_bad
            bad_per_col = bad.sum(0, dtype=torch.int64)
            v = v.masked_fill(bad, 0.0)
        absv = v.abs()
        self.rows += n_rows
        n_codes = len(self.eps) + 2
        codes = self._eps_codes(absv)
        codes += (v > 0).to(codes.dtype) * n_codes
        per_col = _column_bincount(codes, 2 * n_codes)
        by_abs = per_col[:, :n_codes] + per_col[:, n_codes:]
        if bad_per_col is not None:
            by_abs[:, 0] -= bad_per_col  # cleaned entries were counted as zeros
        le = torch.cumsum(by_abs, 1)  # le[:, j] = count of code <= j
        count = le[:, -1]
        self.count += count
        self.nonzero += count - by_abs[:, 0]
        self.positive += per_col[:, n_codes:].sum(1)
        self.le_eps += le[:, 1:-1].T
        self.abs_sum += absv.sum(0).double()
        self.sum += v.sum(0).double()
        self.sq_sum += (v * v).sum(0).double()
        pos = v.clamp_min(0.0)
        self.pos_sum += pos.sum(0).double()
        self.pos_sq_sum += (pos * pos).sum(0).double()
        hist = torch.bincount(hist_bin_index(absv).reshape(-1), minlength=HIST_BINS)
        if n_bad:
            hist[0] -= n_bad
        self.hist += hist

    @torch.no_grad()
    def update_sequence(self, values: torch.Tensor, valid: torch.Tensor | None = None, *,
                        flow_threshold: float = 0.0, backend: str | None = None) -> None:
        """Add a batch of sequences ``(batch, time, width)``; ``valid`` (batch, time) masks padding.

        Updates the per-token statistics and the temporal ones: deltas between consecutive
        valid tokens of the same sequence, and activation runs (``|v| > flow_threshold``).
        """
        if values.ndim != 3:
            raise ValueError(f"expected (batch, time, width) values, got {tuple(values.shape)}")
        if values.shape[-1] != self.width:
            raise ValueError(f"expected width {self.width}, got {tuple(values.shape)}")
        v = values.detach().to(torch.float32).cpu()
        if _use_numba(backend):
            if valid is None:
                valid = torch.ones(v.shape[:2], dtype=torch.bool)
            fused.reduce_into(self, v.numpy(), valid.cpu().to(torch.bool).numpy(),
                              temporal=True, flow_threshold=flow_threshold)
            return
        all_valid = valid is None or bool(valid.all())
        if all_valid:
            self._update_torch(v.reshape(-1, v.shape[-1]))
            valid = torch.ones(v.shape[:2], dtype=torch.bool)
        else:
            valid = valid.to(torch.bool)
            self._update_torch(v[valid])
        bad = ~torch.isfinite(v)
        has_bad = bool(bad.any())
        if has_bad:
            v = v.masked_fill(bad, 0.0)
        ok = valid[..., None] if not has_bad else valid[..., None] & ~bad
        active = v.abs() > flow_threshold
        if not all_valid or has_bad:
            active &= ok
        self.flow_active += active.sum((0, 1), dtype=torch.int64)
        if v.shape[1] < 2:
            return
        linked = valid[:, 1:] & valid[:, :-1]
        self.pairs += int(linked.sum())
        pair_ok = linked[..., None]
        if has_bad:
            pair_ok = pair_ok & ok[:, 1:] & ok[:, :-1]
        self.both_active += (active[:, 1:] & active[:, :-1]).sum((0, 1), dtype=torch.int64)
        n_codes = len(self.eps) + 2
        codes = self._eps_codes((v[:, 1:] - v[:, :-1]).abs())
        if not all_valid or has_bad:
            codes = torch.where(pair_ok, codes, n_codes)  # excluded pairs get their own code
        per_col = _column_bincount(codes.reshape(-1, self.width), n_codes + 1)
        le = torch.cumsum(per_col[:, :n_codes], 1)
        self.delta_zero += per_col[:, 0]
        self.delta_le_eps += le[:, 1:-1].T

    # ----------------------------------------------------------------- merging
    def merge(self, other: "SiteStats") -> "SiteStats":
        """Add ``other`` into self (all fields are sums or counts)."""
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
        return SiteStats(self.width, self.eps).merge(self)

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
                out[prefix + f.name] = torch.tensor([int(value)], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> "SiteStats":
        missing = [f.name for f in fields(cls) if f.name != "width" and prefix + f.name not in tensors]
        if missing:
            raise KeyError(f"statistics are missing {', '.join(prefix + m for m in missing)}")
        kwargs = {}
        for f in fields(cls):
            if f.name == "width":
                continue
            t = tensors[prefix + f.name]
            if f.name == "eps":
                kwargs["eps"] = tuple(t.tolist())
            elif t.ndim == 1 and t.numel() == 1 and f.name in ("rows", "nonfinite", "pairs"):
                kwargs[f.name] = int(t.item())
            else:
                kwargs[f.name] = t.clone()
        return cls(width=int(kwargs["count"].numel()), **kwargs)

    # ------------------------------------------------------------- quantiles
    def abs_quantile(self, q: float) -> float:
        """The q-quantile of |v| over all neurons, from the histogram (linear within a bin,
        about 2% resolution). Returns 0.0 when at least a fraction q of the values are 0."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        total = int(self.hist.sum())
        if total == 0:
            raise ValueError("no values captured: cannot compute a quantile")
        zeros = total - int(self.nonzero.sum())
        if q * total <= zeros:
            return 0.0
        cum = torch.cumsum(self.hist, 0).double()
        target = q * total
        b = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).item())
        b = min(b, HIST_BINS - 1)
        lower = hist_lower_edges()
        if b == HIST_BINS - 1:
            return float(lower[-1])
        lo, hi = float(lower[b]), float(lower[b + 1])
        prev = float(cum[b - 1]) if b > 0 else 0.0
        if b == 0:
            prev = float(zeros)  # zeros sit at the bottom of bin 0
        frac = (target - prev) / max(float(cum[b]) - prev, 1e-300)
        return lo + min(max(frac, 0.0), 1.0) * (hi - lo)

    def frac_abs_le(self, t: float) -> float:
        """Fraction of values with |v| <= t, from the histogram (linear within a bin)."""
        total = int(self.hist.sum())
        if total == 0:
            return math.nan
        zeros = total - int(self.nonzero.sum())
        if t <= 0:
            return zeros / total
        lower = hist_lower_edges()
        b = int(hist_bin_index(torch.tensor([t], dtype=torch.float32)).item())
        below = float(self.hist[:b].sum())
        if b == HIST_BINS - 1:
            return (below + float(self.hist[b])) / total
        lo, hi = float(lower[b]), float(lower[b + 1])
        in_bin = float(self.hist[b])
        if b == 0:
            in_bin -= zeros
            below += zeros
        return (below + in_bin * min(max((t - lo) / (hi - lo), 0.0), 1.0)) / total
