"""TEAL's block-wise greedy sparsity allocation (``TEAL(allocation="greedy")``).

Uniform TEAL gives every input kind of every block the same sparsity s. The greedy
allocation keeps each block's *parameter-weighted* sparsity at s but spends it where it
costs least:

1. every input kind of the block (q/k/v input, o input, gate/up input, down input) starts
   at sparsity 0;
2. for each kind, try raising its sparsity by ``step`` (0.05: 5% more of the weight of the
   linears reading that input can be skipped) and measure the block error; commit the kind
   with the smallest error increase per newly skipped parameter;
3. repeat until the block's parameter-weighted sparsity ``sum_k P_k s_k / sum_k P_k``
   reaches s (``P_k``: weights of the linears reading kind k); the last step is shortened
   so that it equals s exactly.

The greedy decisions do not depend on s, so one path per block serves every target (it is
computed lazily and cached per calibration sample; a sweep or a PPL-p% bisection pays once).
The threshold of a kind at sparsity s is, as for uniform TEAL, the s-quantile of ``|v|``
from the calibration histogram.

**Block error** (``TEAL.greedy_error``). ``"block"`` (the default, as in the TEAL paper): the
relative squared error of the true block output, mean over tokens, ``mean_t ||y_sparse[t] -
y[t]||^2 / ||y[t]||^2`` with ``y`` the dense output of the decoder layer (residual included),
measured by re-running the model's own layer module, with its linears' inputs masked, on
the dense hidden states of a few whole calibration sequences (``greedy_sequences`` windows,
each cut to ``greedy_sequence_tokens``; see :mod:`actsparse.sparsify.block_error`). Every
kind's mask reaches the output through attention (its real causal mask and rotary positions),
the MLP, the norms and the residuals.

``"linear"`` (the earlier measure, kept for comparison): the block's *linear outputs* on
``greedy_tokens`` token rows of the calibration statistics (rows, not sequences, so attention
cannot be re-run), dense inputs and ``m_t(v) = v * (|v| > t)``::

    E = rel(q/k/v outputs) + rel(o output) + rel(MLP output)

where ``rel`` is the mean over tokens of ``||y_sparse - y||^2 / ||y||^2``. q/k/v (one shared
mask, outputs concatenated) and o see dense inputs; the MLP is exact: ``down(m(act(gate(m(x)))
* up(m(x))))`` against the dense MLP, so masking gate/up reaches down's output.

Other row-based normalisations, kept for experiments (all worse than "linear" on SmolLM2 at
50%: "sublayer" and "token" on the validation split; "pooled" x2.05 vs uniform x1.56 on test): ``"pooled"`` = ``(||dAttn||^2 + ||dMLP||^2) / (||Attn||^2
+ ||MLP||^2)`` over all rows, with the attention error modelled as ``o(m(a + rep(dv)))`` -
``dv`` the value error of masking the q/k/v input, as if each token attended to itself;
``"sublayer"`` = the same two terms, each relative per token; ``"token"`` = the pooled error
relative per token. Pooled errors are dominated by the few tokens and blocks with massive
activations, so attention looks nearly free there (the greedy then gave q/k/v and o 0.95 in
block 0).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from actsparse.errors import ConfigError
from actsparse.sparsify.block_error import BlockOutputError, block_inputs, check_family, sequence_key

KIND_ORDER = ("attn.q", "attn.o", "mlp.gate", "mlp.down")
_NEEDED_ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "mlp.act")


def row_key(path: str, rows: int) -> str:
    """Stats key of the token-row sample of ``path``'s input (the greedy allocation, TEAL's compensation)."""
    return f"{path}:input-rows/{rows}"


def check_model(smap) -> None:
    missing = [r for r in _NEEDED_ROLES if r not in smap.roles]
    if smap.family == "generic" or not smap.gated or missing:
        raise ConfigError(
            "TEAL's greedy allocation needs a block with separate q/k/v/o projections and a gated MLP "
            f"(LLaMA family); this model's map ({smap.family}) lacks {missing or 'a gated MLP'}. "
            "Use allocation='uniform'")


def greedy_requests(target) -> list:
    """What the greedy needs besides the input histograms: the calibration sequences
    (``greedy_error="block"``) or the token-row samples (the row-based errors)."""
    from actsparse.sparsify.calibration import Request

    config = target.config
    if config.greedy_error != "block":
        return row_requests(target)
    check_model(target.smap)
    check_family(target.smap)
    n, tokens = config.greedy_sequences, config.greedy_sequence_tokens
    return [Request(sequence_key(n, tokens), target.smap.blocks_path, "input", sample_sequences=n,
                    sequence_tokens=tokens)]


def row_requests(target) -> list:
    """Token-row samples of the q, o and gate inputs of every block (aligned rows)."""
    from actsparse.sparsify.calibration import Request

    check_model(target.smap)
    rows = target.config.greedy_tokens
    out = []
    for layer in target.layers:
        for role in ("attn.q", "attn.o", "mlp.gate"):
            path = target.path(layer, role)
            out.append(Request(row_key(path, rows), path, "input", sample_rows=rows))
    return out


def _mask(v: torch.Tensor, t: float) -> torch.Tensor:
    return v * (v.abs() > t) if t > 0 else v


class GreedyPath:
    """The greedy path of one block over a grid of per-kind sparsities (``step`` apart, up to
    ``cap``). ``kinds``: the TEAL kinds being sparsified; ``params``: weights reading each
    kind; ``threshold(kind, s)``: the kind's threshold at sparsity s. Subclasses define
    ``error(state)``, the block error of a grid state (kind -> grid index)."""

    def __init__(self, kinds, params: dict[str, int], threshold, step: float = 0.05, cap: float = 0.95):
        self.kinds = [k for k in KIND_ORDER if k in kinds]
        if not self.kinds:
            raise ConfigError("greedy allocation: no TEAL input kind to allocate")
        self.params = {k: params[k] for k in self.kinds}
        self.total = float(sum(self.params.values()))
        self.threshold = threshold
        self.step = step
        self.levels = int(math.floor(cap / step + 1e-9))  # highest grid index per kind
        self._thr_cache: dict[tuple[str, int], float] = {}

    def start(self) -> None:
        self.state = {k: 0 for k in self.kinds}  # grid index per kind
        self.path = [(0.0, dict(self.state), None, self.error(self.state))]  # (weighted, state, raised kind, E)

    def _t(self, kind: str, i: int) -> float:
        if kind not in self.kinds or i == 0:
            return 0.0
        key = (kind, i)
        if key not in self._thr_cache:
            self._thr_cache[key] = float(self.threshold(kind, i * self.step))
        return self._thr_cache[key]

    def error(self, state: dict) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def weighted(self, state: dict) -> float:
        return sum(self.params[k] * state[k] * self.step for k in self.kinds) / self.total

    # -------------------------------------------------------------- greedy
    def extend_to(self, target: float) -> None:
        """Greedy steps until the weighted sparsity reaches ``target`` (or every kind is at the cap)."""
        while self.path[-1][0] < target - 1e-12:
            cur = self.path[-1][3]
            best = None
            for k in self.kinds:
                if self.state[k] >= self.levels:
                    continue
                cand = dict(self.state)
                cand[k] += 1
                e = self.error(cand)
                cost = (e - cur) / (self.params[k] * self.step)
                if best is None or cost < best[0]:
                    best = (cost, k, cand, e)
            if best is None:
                return  # every kind at the cap
            _, k, cand, e = best
            self.state = cand
            self.path.append((self.weighted(cand), dict(cand), k, e))

    def allocation(self, target: float) -> dict[str, float]:
        """Per-kind sparsities whose weighted sparsity is ``target`` (capped), from the path;
        the last greedy step is shortened to land on ``target`` exactly."""
        self.extend_to(target)
        path = self.path
        for i in range(1, len(path)):
            if path[i][0] >= target - 1e-12:
                w0, s0, _, _ = path[i - 1]
                k = path[i][2]
                out = {kk: s0[kk] * self.step for kk in self.kinds}
                out[k] += (target - w0) * self.total / self.params[k]
                return out
        return {kk: self.path[-1][1][kk] * self.step for kk in self.kinds}


class BlockOutputGreedy(GreedyPath):
    """The greedy with the true block-output error (``greedy_error="block"``): ``measure``
    is a :class:`~actsparse.sparsify.block_error.BlockOutputError` of the block."""

    def __init__(self, kinds, params: dict[str, int], threshold, measure: BlockOutputError, step: float = 0.05,
                 cap: float = 0.95):
        super().__init__(kinds, params, threshold, step, cap)
        self.measure = measure
        self._cache: dict[tuple, float] = {}
        self.start()

    def error(self, state: dict) -> float:
        key = tuple(state.get(k, 0) for k in self.kinds)
        if key not in self._cache:
            self._cache[key] = self.measure({k: self._t(k, state.get(k, 0)) for k in self.kinds})
        return self._cache[key]


class BlockGreedy(GreedyPath):
    """The greedy with a row-based error (``greedy_error`` "linear", "pooled", "sublayer",
    "token"). ``rows``: dense input rows ``{"attn.q": x_attn, "attn.o": a, "mlp.gate": x_mlp}``
    (same tokens); ``mods``: the block's modules by role; ``heads``: number of query heads."""

    def __init__(self, kinds, params: dict[str, int], threshold, rows: dict, mods: dict, heads: int,
                 step: float = 0.05, cap: float = 0.95, norm: str = "linear"):
        super().__init__(kinds, params, threshold, step, cap)
        self.norm = norm
        self.mods = mods
        with torch.no_grad():
            xa = rows["attn.q"].float()
            a = rows["attn.o"].float()
            xm = rows["mlp.gate"].float()
            self.xa, self.a, self.xm = xa, a, xm
            wv = mods["attn.v"].weight.float()
            self.wv = wv
            self.wo = mods["attn.o"].weight.float()
            hd = a.shape[1] // heads
            n_kv = wv.shape[0] // hd
            if hd * heads != a.shape[1] or n_kv * hd != wv.shape[0] or heads % n_kv:
                raise ConfigError(f"greedy allocation: cannot split o's input ({a.shape[1]}) into {heads} heads "
                                  f"matching v's output ({wv.shape[0]})")
            self.hd, self.n_kv, self.rep = hd, n_kv, heads // n_kv
            self.attn_ref = F.linear(a, self.wo)
            self.mlp_ref = self._mlp(xm)
            self.den = float(self.attn_ref.pow(2).sum() + self.mlp_ref.pow(2).sum()) or 1.0
            self.attn_tok = self.attn_ref.pow(2).sum(-1).clamp_min(1e-30)
            self.mlp_tok = self.mlp_ref.pow(2).sum(-1).clamp_min(1e-30)
        self._attn_cache: dict[tuple[int, int], float] = {}
        self._mlp_cache: dict[tuple[int, int], float] = {}
        self.start()

    # -------------------------------------------------------------- error
    def _mlp(self, x: torch.Tensor, t_in: float = 0.0, t_h: float = 0.0) -> torch.Tensor:
        m = self.mods
        xm = _mask(x, t_in)
        h = m["mlp.act"](m["mlp.gate"](xm)) * m["mlp.up"](xm)
        return m["mlp.down"](_mask(h, t_h))

    @torch.no_grad()
    def _attn_err(self, iq: int, io: int) -> float:
        key = (iq, io)
        if key not in self._attn_cache:
            if self.norm == "linear":
                self._attn_cache[key] = self._qkv_rel(iq) + self._o_rel(io)
                return self._attn_cache[key]
            a = self.a
            tq = self._t("attn.q", iq)
            if tq > 0:
                dv = F.linear(_mask(self.xa, tq) - self.xa, self.wv)  # (N, n_kv * hd); bias cancels
                dv = dv.view(-1, self.n_kv, 1, self.hd).expand(-1, self.n_kv, self.rep, self.hd)
                a = a + dv.reshape(a.shape)
            out = F.linear(_mask(a, self._t("attn.o", io)), self.wo)
            self._attn_cache[key] = self._reduce((out - self.attn_ref).pow(2).sum(-1), self.attn_tok)
        return self._attn_cache[key]

    def _qkv_rel(self, iq: int) -> float:
        """Mean over tokens of the relative squared error of the concatenated q/k/v outputs."""
        if not hasattr(self, "_wqkv"):
            self._wqkv = torch.cat([self.mods[r].weight.float() for r in ("attn.q", "attn.k", "attn.v")])
            self._qkv_tok = F.linear(self.xa, self._wqkv).pow(2).sum(-1).clamp_min(1e-30)
        d = F.linear(_mask(self.xa, self._t("attn.q", iq)) - self.xa, self._wqkv).pow(2).sum(-1)
        return float((d / self._qkv_tok).mean())

    def _o_rel(self, io: int) -> float:
        d = F.linear(_mask(self.a, self._t("attn.o", io)) - self.a, self.wo).pow(2).sum(-1)
        return float((d / self.attn_tok).mean())

    @torch.no_grad()
    def _mlp_err(self, ig: int, idn: int) -> float:
        key = (ig, idn)
        if key not in self._mlp_cache:
            out = self._mlp(self.xm, self._t("mlp.gate", ig), self._t("mlp.down", idn))
            self._mlp_cache[key] = self._reduce((out - self.mlp_ref).pow(2).sum(-1), self.mlp_tok)
        return self._mlp_cache[key]

    def _reduce(self, err_tok: torch.Tensor, ref_tok: torch.Tensor) -> float:
        if self.norm == "pooled":
            return float(err_tok.sum())
        if self.norm == "token":
            return float((err_tok / (self.attn_tok + self.mlp_tok)).mean())
        return float((err_tok / ref_tok).mean())  # "sublayer", "linear"

    def error(self, state: dict) -> float:
        """Relative squared block error ``E`` of a grid state (kind -> grid index)."""
        g = state.get
        e = self._attn_err(g("attn.q", 0), g("attn.o", 0)) + self._mlp_err(g("mlp.gate", 0), g("mlp.down", 0))
        return e / self.den if self.norm == "pooled" else e

        return e / self.den if self.norm == "pooled" else e


# how the greedy measures the block error (TEAL.greedy_error; see the module docstring): "block"
# is the paper's; of the row-based ones "linear" was best on the validation split of SmolLM2
# (TEAL 50%: x1.730 vs x1.811 "sublayer", x1.930 "token"; uniform x1.708)
ERROR_NORMS = ("block", "linear", "pooled", "sublayer", "token")

# paths cached per (statistics, kinds, step, error, layer): a sweep or a bisection reuses them
_PATHS: dict = {}
_PATHS_MAX = 4096


def _heads(model) -> int:
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not heads:
        raise ConfigError("greedy allocation needs model.config.num_attention_heads")
    return int(heads)


def _cached(cache_key, sources: tuple, build):
    hit = _PATHS.get(cache_key)
    if hit is not None and all(a is b for a, b in zip(hit[0], sources)):
        return hit[1]
    if len(_PATHS) > _PATHS_MAX:
        _PATHS.clear()
    g = build()
    _PATHS[cache_key] = (sources, g)
    return g


def block_greedy(target, stats, layer: int) -> GreedyPath:
    """The (cached) greedy path of ``layer`` for ``target``'s config and ``stats``."""
    from actsparse.sparsify.calibration import quantile_threshold

    model, smap, config = target.model, target.smap, target.config
    kinds = tuple(k for k in config.kinds if k in smap.roles)
    src_stats = {k: stats[f"{smap.module_path(layer, k)}:input"] for k in kinds}
    threshold = lambda k, s: quantile_threshold(src_stats[k], s)  # noqa: E731
    params = {k: sum(model.get_submodule(smap.module_path(layer, r)).weight.numel() for r in target.readers(k))
              for k in kinds}
    if config.greedy_error == "block":
        key = sequence_key(config.greedy_sequences, config.greedy_sequence_tokens)
        if key not in stats:
            raise ConfigError(f"greedy allocation needs the calibration sequences {key}")
        ids = stats[key]
        base = f"{smap.blocks_path}.{layer}."
        readers = {k: tuple(smap.module_path(layer, r).removeprefix(base) for r in target.readers(k)) for k in kinds}
        attention = smap.module_path(layer, "attn.o").removeprefix(base).rpartition(".")[0]

        def build():
            measure = BlockOutputError(block_inputs(model, smap, ids), layer, readers, attention)
            return BlockOutputGreedy(kinds, params, threshold, measure, step=config.greedy_step)

        sources = (ids, model) + tuple(src_stats.values())
        return _cached((layer, kinds, config.greedy_step, "block", id(model), id(ids)), sources, build)
    rows = {}
    for role in ("attn.q", "attn.o", "mlp.gate"):
        key = row_key(smap.module_path(layer, role), config.greedy_tokens)
        if key not in stats:
            raise ConfigError(f"greedy allocation needs the calibration sample {key}")
        rows[role] = stats[key]
    n = min(int(r.shape[0]) for r in rows.values())
    if any(int(r.shape[0]) != n for r in rows.values()):
        raise ConfigError(f"greedy allocation: the row samples of layer {layer} are not aligned")
    mods = {r: model.get_submodule(smap.module_path(layer, r)) for r in _NEEDED_ROLES}
    return _cached((layer, kinds, config.greedy_step, config.greedy_error, tuple(id(r) for r in rows.values())),
                   tuple(rows.values()) + tuple(src_stats.values()),
                   lambda: BlockGreedy(kinds, params, threshold, rows, mods, _heads(model), step=config.greedy_step,
                                       norm=config.greedy_error))


def greedy_sparsities(target, stats) -> dict[tuple[int, str], float]:
    """``{(layer, kind): sparsity}`` from the block-wise greedy at the config's sparsity."""
    check_model(target.smap)
    out = {}
    for layer in target.layers:
        alloc = block_greedy(target, stats, layer).allocation(target.config.sparsity)
        for k, s in alloc.items():
            out[(layer, k)] = min(max(s, 0.0), 0.99)
    return out
