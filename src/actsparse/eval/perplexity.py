"""Held-out perplexity with its protocol recorded next to the number.

Non-overlapping windows by default (each window starts with BOS; every following token is
scored once, padding never). With ``stride < window`` a sliding evaluation is used: windows
start every ``stride`` tokens of the token stream and each scores only the tokens no earlier
window scored, with up to ``window - stride`` tokens of context.

Which tokens a sparsified model sparsifies (``sparse_protocol``):

* ``"all"``: every token of every window runs through the sparse modules (the prompt too);
* ``"decode"``: TEAL's evaluation, a dense prefill then sparse decoding. The first half of each
  window runs dense (every sparse module bypassed) and fills the KV cache; the second half runs
  sparse on that cache, and only its predictions are scored (the tokens after the half).
  Sparse modules act token by token, so one batched pass over the second half gives what
  decoding it one token at a time gives.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from actsparse.errors import DataError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int
    window: int
    stride: int
    data: str
    split: str
    batch_size: int
    seconds: float
    reached_sparsity: dict = field(default_factory=dict)  # per site kind, on this data (sparse models)
    bytes_skipped: float | None = None  # fraction of block linear weight bytes skippable per token
    sampling: str | None = None  # how the windows were chosen from the split: spread, prefix (None: given)
    window_nll: list[float] = field(default_factory=list)  # summed NLL of each window (for spreads)
    window_tokens: list[int] = field(default_factory=list)  # tokens scored in each window
    sparse_protocol: str = "all"  # "all": every token sparse; "decode": dense first half, sparse scored half

    def to_dict(self) -> dict:
        return asdict(self)

    def interval(self, level: float = 0.95, *, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
        """A bootstrap interval of the perplexity, resampling whole windows."""
        return bootstrap_ratio(self, None, level=level, samples=samples, seed=seed)

    @property
    def protocol(self) -> str:
        mode = "non-overlapping" if self.stride == self.window else f"sliding, stride {self.stride}"
        if self.sampling:
            mode += f", {self.sampling}"
        if self.sparse_protocol == "decode":
            mode += ", dense first half, second half sparse and scored"
        return (f"{self.data}/{self.split}, {self.windows} x {self.window}-token windows ({mode}), "
                f"{self.tokens} scored tokens")

    def __str__(self) -> str:
        return f"PPL {self.ppl:.3f} ({self.protocol})"


def _stream(tokenizer, docs, max_tokens):
    eos = tokenizer.eos_token_id
    stream = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(eos)
        if max_tokens and len(stream) >= max_tokens + 1:
            break
    return stream[: max_tokens + 1] if max_tokens else stream


@torch.no_grad()
def _nll_batch(model, ids, mask, score_from: int = 0, extra=None):
    """Per row (window): summed NLL and count over positions t >= score_from predicted from t-1."""
    out = model(input_ids=ids, attention_mask=mask, **(extra or {}))
    logits = out.logits if hasattr(out, "logits") else out[0]
    logits = logits[:, :-1].float()
    labels = ids[:, 1:]
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    if score_from > 1:
        valid[:, : score_from - 1] = False
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    nll = torch.where(valid, nll.reshape(labels.shape).double(), 0.0)
    return nll.sum(1).tolist(), valid.sum(1).tolist()


SPARSE_PROTOCOLS = ("all", "decode")


def cache_argument(model, out) -> dict:
    """The KV cache of ``out`` as the keyword ``model.forward`` takes (``cache`` from
    transformers 5.x, ``past_key_values`` before)."""
    import inspect

    if "cache" in inspect.signature(model.forward).parameters:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


@torch.no_grad()
def _nll_batch_decode(model, ids, mask):
    """The decode protocol on one batch of windows: the first half dense with a KV cache, the
    second half sparse on it; per row, summed NLL and count of the second half's predictions."""
    from actsparse.sparsify.modules import dense_forward

    half = ids.shape[1] // 2
    with dense_forward(model):
        prefill = model(input_ids=ids[:, :half], attention_mask=mask[:, :half], use_cache=True)
    out = model(input_ids=ids[:, half:], attention_mask=mask, use_cache=True, **cache_argument(model, prefill))
    logits = out.logits[:, :-1].float()
    labels = ids[:, half + 1:]
    valid = (mask[:, half + 1:] * mask[:, half:-1]).bool()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    nll = torch.where(valid, nll.reshape(labels.shape).double(), 0.0)
    return nll.sum(1).tolist(), valid.sum(1).tolist()


@torch.no_grad()
def perplexity(model: nn.Module, data="wiki", *, tokenizer=None, split: str = "test", window: int = 1024,
               stride: int | None = None, tokens: int | None = None, batch_size: int = 1,
               progress: bool = False, sampling: str | None = None, text_field: str = "text",
               encoding: str = "utf-8", doc_separator: str | None = None,
               desc: str = "perplexity", sparse_protocol: str = "all", world=None) -> PerplexityResult:
    """Perplexity of ``model`` on ``data``: a :class:`~actsparse.data.text.Windows`, a corpus name
    or path (tokenised with ``tokenizer``; ``split`` picks the documents; ``text_field``,
    ``encoding``, ``doc_separator`` say how files are read) or a list of documents.
    ``tokens`` caps the evaluated tokens; ``sampling`` says which windows a cap takes:
    ``"spread"`` (evenly over the split; the default for non-overlapping windows) or
    ``"prefix"`` (the first tokens; the default, and the only choice, for sliding windows,
    which score one contiguous stretch). If the model is sparsified, the reached sparsity per
    site kind on this data and the weight bytes skipped are recorded too. ``progress`` shows a
    progress bar labelled ``desc``. ``sparse_protocol``: "all" (every token sparse) or
    "decode" (dense first half of each window, sparse second half scored; see the module
    docstring); the dense model gives the same tokens under both, so compare a sparse "decode"
    result with the dense model evaluated under "decode" too.

    ``world`` (a :class:`~actsparse.measure.distributed.World` of several torchrun ranks): each
    rank scores a contiguous block of the batches (sliding: of the windows); the per-window NLLs
    and token counts are gathered in window order and the sparse modules' counters summed, so
    every rank returns the one-process result (the same per-window list, hence the same sums
    and bootstrap intervals)."""
    import inspect

    from tqdm.auto import tqdm

    from actsparse.data.text import Windows, text, token_windows
    from actsparse.models.loading import check_window, require_causal_lm
    from actsparse.sparsify.modules import bytes_skipped, iter_sparse_modules, reached_sparsity, reset_counts

    require_causal_lm(model, what="perplexity")
    check_window(model, data.input_ids.shape[1] if isinstance(data, Windows) else window)
    if tokens is not None and tokens < 1:
        raise DataError(f"tokens must be a positive number of tokens (or None for the whole split), got {tokens}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if sparse_protocol not in SPARSE_PROTOCOLS:
        raise DataError(f"sparse_protocol must be one of {', '.join(SPARSE_PROTOCOLS)}, got {sparse_protocol!r}")
    decode = sparse_protocol == "decode"
    stride = stride or window
    if stride > window or stride < 1:
        raise DataError(f"stride must be in [1, window={window}], got {stride}")
    sliding = stride != window
    if sampling is None:
        sampling = "prefix" if sliding else "spread"
    has_cache = "use_cache" in inspect.signature(model.forward).parameters
    extra = {"use_cache": False} if has_cache else {}
    if decode and sliding:
        raise DataError("the decode protocol (a dense first half, then sparse decoding on its KV cache) scores "
                        "non-overlapping windows: drop the stride (--stride) or use the 'all' protocol")
    if decode and not has_cache:
        raise DataError(f"the decode protocol needs a KV cache, and {type(model).__name__}.forward takes no "
                        "use_cache: use the 'all' protocol")
    if isinstance(data, Windows):
        if stride != window:
            raise DataError("sliding evaluation (stride < window) needs text, not pre-cut Windows")
        windows, source, split_name = data, "windows", "-"
        window = data.input_ids.shape[1]
        stride = window
        sampling = data.sampling
    else:
        if tokenizer is None:
            raise DataError("perplexity on text needs the tokenizer")
        if sliding and sampling != "prefix":
            raise DataError("sliding evaluation (stride < window) scores one contiguous stretch of text: "
                            "use sampling='prefix' (--sampling prefix)")
        docs = (text(data, split, text_field=text_field, encoding=encoding, doc_separator=doc_separator)
                if isinstance(data, str) else list(data))
        source = data if isinstance(data, str) else "documents"
        split_name = split if isinstance(data, str) else "-"
        windows = None
        if not sliding:
            windows = token_windows(tokenizer, docs, window=window, max_tokens=tokens, sampling=sampling)
    sparse = any(True for _ in iter_sparse_modules(model))
    if sparse:
        reset_counts(model)
    from actsparse.measure import distributed as dist

    world = world or dist.SINGLE
    start = time.perf_counter()
    window_nll, window_tokens = [], []
    if windows is not None:
        local = windows
        if world.active:
            _check_same_eval(model, world, windows.input_ids, windows.attention_mask, batch_size, sparse_protocol)
            local, _ = dist.shard_batches(windows, batch_size, world)
        for batch in tqdm(local.batches(batch_size), total=local.num_batches(batch_size), disable=not progress,
                          desc=desc):
            if decode:
                s, c = _nll_batch_decode(model, batch["input_ids"], batch["attention_mask"])
            else:
                s, c = _nll_batch(model, batch["input_ids"], batch["attention_mask"], extra=extra)
            window_nll += s
            window_tokens += c
    else:
        stream = _stream(tokenizer, docs, tokens)
        if len(stream) < window:
            raise DataError(f"the data gives {len(stream)} tokens, fewer than one window of {window}")
        spans, prev_end, n = [], 0, len(stream)
        for begin in range(0, n - 1, stride):
            end = min(begin + window, n)
            spans.append((begin, end, max(prev_end - begin, 1)))
            prev_end = end
            if end == n:
                break
        if world.active:
            ids_all = torch.tensor(stream)
            _check_same_eval(model, world, ids_all, torch.tensor(spans), 1)
            spans = [spans[i] for i in dist.shard_range(len(spans), world, what="sliding windows",
                                                        detail="give more tokens or fewer ranks")]
        for begin, end, score_from in tqdm(spans, disable=not progress, desc=desc):
            ids = torch.tensor([stream[begin:end]])
            s, c = _nll_batch(model, ids, torch.ones_like(ids), score_from=score_from, extra=extra)
            window_nll += s
            window_tokens += c
    if world.active:
        window_nll = dist.gather_list(window_nll, world, torch.float64)
        window_tokens = [int(c) for c in dist.gather_list(window_tokens, world, torch.int64)]
        if sparse:
            mods = [m for _, m in iter_sparse_modules(model)]
            counts = dist.all_reduce_ints([v for m in mods for v in (m.zeros, m.entries)], world)
            for i, m in enumerate(mods):
                m.zeros, m.entries = counts[2 * i], counts[2 * i + 1]
    seconds = time.perf_counter() - start
    nll_sum, count, n_windows = float(sum(window_nll)), int(sum(window_tokens)), len(window_nll)
    if count == 0:
        raise DataError("no tokens were scored")
    nll = nll_sum / count
    if not math.isfinite(nll):
        raise DataError(f"the perplexity is not a number (mean NLL {nll}): the model produced NaN/inf logits on "
                        f"{source}/{split_name}; check its weights and dtype (fp16/bf16 overflow?)")
    result = PerplexityResult(math.exp(nll), nll, count, n_windows, window, stride, str(source), split_name,
                              batch_size, seconds, sampling=sampling, window_nll=window_nll,
                              window_tokens=[int(c) for c in window_tokens], sparse_protocol=sparse_protocol)
    if sparse:
        result.reached_sparsity = reached_sparsity(model)
        result.bytes_skipped = bytes_skipped(model)
    return result


def _check_same_eval(model, world, ids: torch.Tensor, mask: torch.Tensor, batch_size: int,
                     sparse_protocol: str = "all") -> None:
    """Refuse ranks that evaluate different models, plans or text (see ``distributed.check_same``)."""
    import hashlib

    from actsparse.measure import distributed as dist
    from actsparse.models.loading import weights_fingerprint
    from actsparse.sparsify.modules import iter_sparse_modules

    h = hashlib.sha1()
    for t in (ids, mask):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    plan = hashlib.sha1()
    for path, m in iter_sparse_modules(model):
        thr = m.threshold
        plan.update(f"{path}:{m.mode}:{m.k}:".encode())
        if isinstance(thr, torch.Tensor):
            plan.update(thr.detach().float().cpu().numpy().tobytes())
        else:
            plan.update(repr(thr).encode())
    dtype = next((str(p.dtype) for p in model.parameters()), None)
    dist.check_same({"model": {"class": type(model).__name__, "weights_fingerprint": weights_fingerprint(model),
                               "dtype": dtype},
                     "plan_sha1": plan.hexdigest(), "data_sha1": h.hexdigest(), "batch_size": batch_size,
                     "sparse_protocol": sparse_protocol},
                    world, what="evaluation")


def _windows_of(r) -> tuple[np.ndarray, np.ndarray]:
    d = r if isinstance(r, dict) else r.to_dict()
    nll, tok = np.asarray(d.get("window_nll") or [], float), np.asarray(d.get("window_tokens") or [], float)
    if nll.size == 0 or nll.size != tok.size:
        raise DataError("this perplexity result has no per-window NLL (made by an older actsparse?); "
                        "evaluate again to get a spread")
    return nll, tok


def _field(r, name: str, default):
    return (r.get(name, default) if isinstance(r, dict) else getattr(r, name, default)) or default


def bootstrap_ratio(result, reference=None, *, level: float = 0.95, samples: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """A paired bootstrap interval over windows of ``ppl(result) / ppl(reference)`` (or of
    ``ppl(result)`` alone without a reference): the same resampled windows for both, so the
    noise of the text, common to both, cancels. Both must be evaluated on the same windows."""
    nll, tok = _windows_of(result)
    ref_nll = np.zeros_like(nll)
    if reference is not None:
        protocols = {_field(r, "sparse_protocol", "all") for r in (result, reference)}
        if len(protocols) > 1:
            raise DataError(f"a paired bootstrap needs both results under one protocol, got {sorted(protocols)}: "
                            "evaluate the reference with the same sparse_protocol (--protocol)")
        ref_nll, ref_tok = _windows_of(reference)
        if ref_nll.size != nll.size or not np.array_equal(ref_tok, tok):
            raise DataError("a paired bootstrap needs both results on the same windows (same count and tokens)")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, nll.size, size=(samples, nll.size))
    t = tok[idx].sum(1)
    log_ratio = (nll[idx].sum(1) - ref_nll[idx].sum(1)) / t
    lo, hi = np.quantile(log_ratio, [(1 - level) / 2, (1 + level) / 2])
    return float(np.exp(lo)), float(np.exp(hi))


def rank_within_noise(points: list[dict], *, level: float = 0.95) -> dict:
    """Rank the results of one sparsity target (dicts with ``method``, ``ppl`` and per-window
    NLL, all on the same windows) without over-reading noise: the best method, and for each
    other its paired bootstrap interval of ``ppl / ppl(best)``; a method whose interval reaches
    1 is tied with the best, not ranked below it."""
    if not points:
        return {}
    best = min(points, key=lambda r: r["ppl"])
    vs_best, tied = {}, []
    for r in points:
        if r is best:
            continue
        lo, hi = bootstrap_ratio(r, best, level=level)
        vs_best[r["method"]] = [lo, hi]
        if lo <= 1.0:
            tied.append(r["method"])
    return {"best": best["method"], "tied_with_best": tied, "ratio_to_best_ci": vs_best, "level": level}


# ---------------------------------------------------------------- PPL-p% sparsity
def _bisect(evaluate, lo: float, hi: float, limit: float, steps: int, log: list, bar=None):
    """Largest x in [lo, hi] with evaluate(x) <= limit, assuming monotone growth (``lo`` is
    assumed to pass). ``steps`` evaluations; the result is within (hi - lo) / 2**steps of the
    crossing. ``bar``: a tqdm bar advanced per step."""
    best = lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        ppl = evaluate(mid)
        log.append({"x": mid, "ppl": ppl})
        if ppl <= limit:
            best, lo = mid, mid
        else:
            hi = mid
        if bar is not None:
            bar.set_postfix_str(f"x={mid:.4f} PPL {ppl:.3f} (limit {limit:.3f}), best {best:.4f}")
            bar.update(1)
    return best


def ppl_p_search(model: nn.Module, make_config, stats: dict, windows, dense_ppl: float, *, p: float = 1.0,
                 lo: float = 0.0, hi: float = 0.9, steps: int = 7, progress: bool = False,
                 desc: str = "PPL-p% bisection", sparse_protocol: str = "all") -> dict:
    """Binary-search the knob ``x`` of ``make_config(x)`` (a uniform sparsity, or the CETT value
    shared by all layers) so that perplexity on ``windows`` rises by at most ``p`` percent.

    Returns the knob, its perplexity, the reached sparsity per site kind (on ``windows``), the
    fraction of block linear weight bytes skipped, and the search log. Each knob value is
    evaluated once (the winner's figures come from its bisection step; ``lo`` is evaluated only
    if no step passed). ``progress`` shows a bar over the bisection steps labelled ``desc``;
    ``sparse_protocol`` as in :func:`perplexity` (``dense_ppl`` must come from the same one)."""
    from tqdm.auto import tqdm

    from actsparse.sparsify.api import desparsify_, sparsify_

    limit = dense_ppl * (1 + p / 100)
    log: list = []
    seen: dict[float, PerplexityResult] = {}

    def run(x):
        if x not in seen:
            sparsify_(model, make_config(x), stats=stats)
            try:
                seen[x] = perplexity(model, windows, sparse_protocol=sparse_protocol)
            finally:
                desparsify_(model)
        return seen[x]

    with tqdm(total=steps, desc=desc, unit="step", disable=not progress) as bar:
        best = _bisect(lambda x: run(x).ppl, lo, hi, limit, steps, log, bar)
    res = run(best)
    for entry in log:
        r = seen[entry["x"]]
        entry.update({"bytes_skipped": r.bytes_skipped, "reached_sparsity": r.reached_sparsity})
    return {"p": p, "knob": best, "ppl": res.ppl, "dense_ppl": dense_ppl, "ratio": res.ppl / dense_ppl,
            "reached_sparsity": res.reached_sparsity, "bytes_skipped": res.bytes_skipped, "search": log,
            "protocol": {"windows": res.windows, "window": res.window, "tokens": res.tokens, "steps": steps,
                         "sparse_protocol": sparse_protocol,
                         "range": [lo, hi], "resolution": (hi - lo) / 2 ** steps}}
