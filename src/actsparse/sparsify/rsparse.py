"""R-Sparse (Zhang et al., ICLR 2025): exact product of the kept inputs plus a low-rank
estimate of the dropped ones.

For a linear ``y = W x`` with the TEAL mask ``keep = |x| > t``::

    y ~ W (x * keep) + U_r (S_r V_r^T (x * ~keep))

``W ~ U_r S_r V_r^T`` is the rank-r truncated SVD of the linear's own weight (fp32,
``torch.linalg.svd``). Per token the linear reads its kept columns plus the two factors,
``r * (in + out)`` weights, so at a budget of ``b`` (fraction of the linear's weights not
read) a rank-r site must drop a fraction ``s = b + r (in + out) / (in * out)`` of its inputs:
rank buys accuracy on the dropped part with sparsity.

``sparsity`` is that budget ``b``: the fraction of block-linear weight bytes skipped per
token, the factors counted (:func:`~actsparse.sparsify.modules.bytes_skipped`), so that R-Sparse
at 0.5 and TEAL at 0.5 read the same bytes.

**Search.** The paper picks per-layer sparsity and rank by an evolutionary search. Here every
linear keeps the budget ``b`` (as uniform TEAL does) and its rank is chosen exhaustively on
the ``ranks`` grid, each rank with the sparsity that keeps the budget, minimising the mean
over calibration token rows of the relative output error ``||(W - W_r)(x * ~keep)||^2 /
||W x||^2`` (in SVD coordinates: the dropped part's energy beyond the first r singular
directions). One dimension per linear, so the search is exact on the grid and needs no
evolution; the budget is not moved between linears because an error proxy of this kind
(TEAL's block-wise greedy, which reallocates sparsity by linear output errors) lost to the
uniform allocation on SmolLM2. Rank 0 is a candidate: where the factors do not pay for the
extra sparsity, the site is plain TEAL (same threshold, no factors).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from actsparse.errors import ConfigError
from actsparse.sparsify.allocation import row_key
from actsparse.sparsify.calibration import MIN_CALIBRATION_TOKENS, Request, quantile_threshold
from actsparse.sparsify.registry import Assignment, Handler, SparsityConfig, register_handler, register_method
from actsparse.sparsify.teal import INPUT_KINDS, KINDS, input_key

DEFAULT_RANKS = (0, 8, 16, 32, 64)


@register_method
@dataclass(frozen=True)
class RSparse(SparsityConfig):
    """``sparsity``: fraction of each block linear's weight bytes skipped per token, its low-rank
    factors counted; ``ranks``: the candidate ranks of the per-linear search (0 = plain TEAL);
    ``search_tokens``: calibration token rows per input on which the search measures errors;
    ``max_sparsity``: the highest input sparsity a site may be given to pay for its factors;
    ``kinds``: the TEAL input kinds to sparsify; ``overrides``: per-path budgets (None: dense)."""

    METHOD = "rsparse"
    VERSION = 1
    sparsity: float = 0.5
    ranks: tuple[int, ...] = DEFAULT_RANKS
    search_tokens: int = 512
    max_sparsity: float = 0.95
    kinds: tuple[str, ...] = KINDS
    overrides: tuple[tuple[str, float | None], ...] = ()

    def __post_init__(self):
        super().__post_init__()
        ranks = tuple(self.ranks)
        if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ranks):
            raise ConfigError(f"ranks must be a non-empty list of integers >= 0, got {self.ranks!r}")
        object.__setattr__(self, "ranks", tuple(sorted(set(ranks))))
        n = self.search_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < MIN_CALIBRATION_TOKENS:
            raise ConfigError(f"search_tokens must be an integer >= {MIN_CALIBRATION_TOKENS}, got {n!r}")
        m = self.max_sparsity
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < 1:
            raise ConfigError(f"max_sparsity must be in (0, 1), got {m!r}")
        object.__setattr__(self, "max_sparsity", float(m))
        object.__setattr__(self, "kinds", tuple(self.kinds))
        bad = [k for k in self.kinds if k not in INPUT_KINDS]
        if bad:
            raise ConfigError(f"unknown R-Sparse input kind(s) {bad}; valid: {', '.join(INPUT_KINDS)}")


def factor_weights(rank: int, width: int, out: int) -> int:
    """Weights of the two low-rank factors of a rank-``rank`` remainder."""
    return rank * (width + out)


def sparsity_for(budget: float, rank: int, width: int, out: int) -> float:
    """The input sparsity at which a rank-``rank`` site skips a fraction ``budget`` of its weights."""
    return budget + factor_weights(rank, width, out) / (width * out)


@dataclass
class SVD:
    """``W = U diag(S) Vh`` of one linear's (out x in) weight, fp32."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    @classmethod
    def of(cls, weight: torch.Tensor) -> "SVD":
        U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
        return cls(U, S, Vh)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U_r, S_r V_r^T)``: out x rank and rank x in."""
        return self.U[:, :rank].contiguous(), (self.S[:rank, None] * self.Vh[:rank]).contiguous()


def remainder_errors(svd: SVD, rows: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per rank r = 0..k: mean over ``rows`` (tokens x in) of ``||(W - W_r)(x * ~keep)||^2 /
    ||W x||^2`` with ``keep = |x| > threshold`` (k + 1 values; the last is 0)."""
    x = rows.detach().to(torch.float32)
    dropped = x * (x.abs() <= threshold)
    s2 = svd.S.pow(2)
    ref = (s2 * (x @ svd.Vh.T).pow(2)).sum(-1).clamp_min(1e-30)
    energy = s2 * (dropped @ svd.Vh.T).pow(2)  # tokens x k: the dropped product along each singular direction
    tail = energy.flip(-1).cumsum(-1).flip(-1)  # [:, r] = energy beyond the first r directions
    tail = torch.cat([tail, torch.zeros_like(tail[:, :1])], dim=-1)
    return (tail / ref[:, None]).mean(0)


@dataclass
class Choice:
    rank: int
    sparsity: float
    threshold: float
    error: float
    candidates: list  # (rank, sparsity, error) of every rank tried


def choose_rank(svd: SVD, rows: torch.Tensor, threshold_at, budget: float, ranks, max_sparsity: float) -> Choice:
    """The rank on the grid (with its budget-keeping sparsity) of least remainder error on
    ``rows``; ``threshold_at(s)``: the input threshold at sparsity s."""
    out, width = svd.U.shape[0], svd.Vh.shape[1]
    k = int(svd.S.numel())
    best, tried = None, []
    for r in ranks:
        if r > k:
            continue
        s = sparsity_for(budget, r, width, out)
        if r and s > max_sparsity:
            continue
        t = float(threshold_at(s))
        err = float(remainder_errors(svd, rows, t)[r])
        tried.append((r, s, err))
        if best is None or err < best.error:
            best = Choice(r, s, t, err, tried)
    if best is None:
        raise ConfigError(f"R-Sparse: no rank of {list(ranks)} fits a budget of {budget} on a {out} x {width} linear "
                          f"within max_sparsity={max_sparsity} (its factors would need more inputs dropped): add "
                          "rank 0 to ranks, give smaller ranks, or raise max_sparsity")
    best.candidates = tried
    return best


# SVDs by weight tensor identity: a sweep or a PPL-p% bisection pays for them once
_SVDS: dict = {}


def weight_svd(weight: torch.Tensor) -> SVD:
    key = (weight.data_ptr(), tuple(weight.shape), weight.dtype, weight._version)
    hit = _SVDS.get(key)
    if hit is not None and hit[0] is weight:
        return hit[1]
    svd = SVD.of(weight)
    if len(_SVDS) > 4096:
        _SVDS.clear()
    _SVDS[key] = (weight, svd)
    return svd


@register_handler(RSparse)
class _RSparseHandler(Handler):
    def requests(self, t):
        if t.generic:
            raise ConfigError(f"RSparse needs an architecture site map (which linears share an input); "
                              f"{type(t.model).__name__} has none: use TEAL on an unmapped model")
        t.require()
        reqs = []
        for layer in t.layers:
            for kind in t.config.kinds:
                if t.input_source(kind) is None:
                    continue
                if all(t.sparsity(t.path(layer, r)) is None for r in t.readers(kind)):
                    continue
                path = t.path(layer, t.input_source(kind))
                reqs.append(Request(f"{path}:input", path, "input"))
                reqs.append(Request(row_key(path, t.config.search_tokens), path, "input",
                                    sample_rows=t.config.search_tokens))
        return reqs

    def assign(self, t, stats):
        from actsparse.sparsify.modules import out_in_weight

        cfg = t.config
        out = []
        for layer in t.layers:
            for kind in cfg.kinds:
                src = t.input_source(kind)
                if src is None:
                    continue
                budgets = {t.path(layer, role): t.sparsity(t.path(layer, role)) for role in t.readers(kind)}
                if all(b is None for b in budgets.values()):
                    continue  # kept dense by an override: its statistics were not requested
                hist = stats[input_key(t, layer, kind)]
                rows = stats[row_key(t.path(layer, src), cfg.search_tokens)]
                for path, budget in budgets.items():
                    if budget is None:
                        continue
                    svd = weight_svd(out_in_weight(t.module(path)))
                    c = choose_rank(svd, rows, lambda s: quantile_threshold(hist, s), budget, cfg.ranks,
                                    cfg.max_sparsity)
                    u, v = svd.factors(c.rank) if c.rank else (None, None)
                    out.append(Assignment(path, "linear", f"{src}:input", threshold=c.threshold, skips=(path,),
                                          target=c.sparsity, factor_u=u, factor_v=v))
        return out
