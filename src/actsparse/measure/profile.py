"""Profile a model on text: capture every site, reduce to metrics, save and reload.

``profile(...)`` returns a :class:`Profile`; ``Profile.save(dir)`` writes ``profile.json``
(metadata and every scalar metric, what reports render) and ``stats.safetensors`` (the
raw per-neuron accumulators, so anything can be recomputed). ``Profile.load(dir)``
reads both back; nothing loaded executes code.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from actsparse.errors import DataError
from actsparse.io import read_json, write_json, write_safetensors
from actsparse.measure import metrics
from actsparse.measure.accumulators import DEFAULT_EPS, HIST_BINS, SiteStats, hist_lower_edges
from actsparse.measure.capture import capture, run
from actsparse.models.sitemaps import Site, site_map
from actsparse.provenance import environment

FORMAT = "actsparse.profile/2"
# /1 summarised a site kind on per-neuron sums pooled across layers (wrong for dormant ratio and
# activation flow); its statistics are the same, so it still loads (and re-saves as /2)
READABLE_FORMATS = ("actsparse.profile/1", FORMAT)

# How each metric of a site kind is aggregated over its layers; every metric is first computed
# per layer (neuron i of layer 0 and neuron i of layer 5 are different neurons). All layers of a
# kind have the same width and see the same tokens, so the weighted means equal plain means over
# layers unless some layer had non-finite values; layers without any finite value are left out.
ENTRIES = "mean over layers, weighted by finite entries"
PAIRS = "mean over layers, weighted by token pairs x width"
NEURONS = "mean over layers, weighted by width (= flagged neurons / all neurons of the kind)"
LAYER_MEAN = "mean over layers"
SUM = "sum over layers"
AGGREGATION = {
    "zero_sparsity": ENTRIES, "nonzero_per_token": ENTRIES, "threshold_sparsity": ENTRIES, "mean_abs": ENTRIES,
    "temporal_sparsity": PAIRS, "temporal_sparsity_eps": PAIRS,
    "dormant_ratio_0.1": NEURONS, "dormant_ratio_0.025": NEURONS,
    "static_dead": SUM, "static_dead_eps": SUM, "nonfinite": SUM, "neurons": SUM,
    "activation_flow.shared_frac": NEURONS, "activation_flow.specialised_frac": NEURONS,
    "activation_flow.never_active_frac": NEURONS, "activation_flow.mean_run_length": LAYER_MEAN,
    "activation_flow.persistence": LAYER_MEAN,
    "relu_balance.active_frac": ENTRIES, "relu_balance.r_mean": LAYER_MEAN, "relu_balance.r_var": LAYER_MEAN,
    "dormant_ratio_0.1_max": "largest per-layer value, with its layer",
}


@dataclass
class Profile:
    """Statistics of every captured site plus what produced them."""

    meta: dict
    sites: list[Site]
    stats: dict[str, SiteStats]
    summary: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.summary:
            self.summary = {name: site_summary(st) for name, st in self.stats.items()}

    # ------------------------------------------------------------- views
    def kinds(self) -> list[str]:
        seen = []
        for s in self.sites:
            if s.kind not in seen and s.name in self.stats:
                seen.append(s.kind)
        return seen

    def by_kind(self) -> dict[str, list[tuple[Site, SiteStats]]]:
        out: dict[str, list] = {}
        for s in self.sites:
            if s.name in self.stats:
                out.setdefault(s.kind, []).append((s, self.stats[s.name]))
        return out

    def kind_tables(self) -> dict:
        """Per site kind: per-layer metrics, their aggregate over the layers (each metric
        computed per layer, then aggregated as :data:`AGGREGATION` says) and the |v| histogram
        pooled over all values of the kind (JSON-ready)."""
        edges = hist_lower_edges()
        out = {}
        for kind, items in self.by_kind().items():
            pooled = SiteStats(items[0][1].width, items[0][1].eps)
            layers = []
            for site, st in items:
                pooled.merge(st)
                layers.append(_layer_row(site, self.summary[site.name], st))
            nz = torch.nonzero(pooled.hist).flatten()
            lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
            out[kind] = {
                "layers": layers,
                "over_layers": aggregate_layers(layers),
                "aggregation": AGGREGATION,
                "layers_without_finite_values": [r["layer"] for r in layers if r["finite_entries"] == 0],
                "quantiles": {str(q): pooled.abs_quantile(q) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
                if int(pooled.hist.sum()) else {},
                "abs_hist": {"first_bin": lo, "lower_edges": edges[lo:hi + 1 if hi < HIST_BINS else hi].tolist(),
                             "counts": pooled.hist[lo:hi].tolist()},
            }
        return out

    def merge(self, other: "Profile") -> "Profile":
        """Combine two profiles of the same model and sites (e.g. from two processes that
        each saw part of the data): a new Profile whose statistics are the exact sums."""
        if [s.name for s in self.sites] != [s.name for s in other.sites]:
            raise ValueError("cannot merge profiles captured at different sites")
        if self.meta.get("identity") != other.meta.get("identity"):
            raise ValueError(f"cannot merge profiles of different models: {self.meta.get('identity')} "
                             f"vs {other.meta.get('identity')}")
        stats = {name: st.copy().merge(other.stats[name]) for name, st in self.stats.items()}
        meta = dict(self.meta)
        meta["data"] = dict(meta["data"], tokens=self.meta["data"]["tokens"] + other.meta["data"]["tokens"],
                            merged_from=[self.meta["data"], other.meta["data"]])
        meta["seconds"] = self.meta["seconds"] + other.meta["seconds"]
        return Profile(meta, self.sites, stats)

    # ------------------------------------------------------------- persistence
    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "meta": self.meta,
            "sites": [{"name": s.name, "module": s.module_path, "io": s.io, "role": s.role, "layer": s.layer}
                      for s in self.sites if s.name in self.stats],
            "kinds": self.kind_tables(),
            "summary": self.summary,
        }

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        tensors = {}
        for name, st in self.stats.items():
            tensors.update(st.to_tensors(prefix=f"{name}/"))
        write_safetensors(directory / "stats.safetensors", tensors, metadata={"format": FORMAT})
        write_json(directory / "profile.json", self.to_json())
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Profile":
        from safetensors.torch import load_file

        directory = Path(directory)
        for f in ("profile.json", "stats.safetensors"):
            if not (directory / f).is_file():
                raise FileNotFoundError(f"{directory / f} is missing: not a saved profile directory")
        doc = read_json(directory / "profile.json")
        if doc.get("format") not in READABLE_FORMATS:
            raise ValueError(f"{directory / 'profile.json'} has format {doc.get('format')!r}, expected {FORMAT!r}")
        tensors = load_file(str(directory / "stats.safetensors"))
        sites = [Site(d["module"], d["io"], d["role"], d["layer"]) for d in doc["sites"]]
        stats = {s.name: SiteStats.from_tensors(tensors, prefix=f"{s.name}/") for s in sites}
        return cls(doc["meta"], sites, stats, doc["summary"])


def profile(model: nn.Module, tokenizer=None, data="wiki", *, split: str = "calibration", tokens: int = 4096,
            window: int = 512, batch_size: int = 4, sites="default", eps=DEFAULT_EPS,
            flow_threshold: float = 0.1, progress: bool = True, model_name: str | None = None,
            sampling: str = "spread", text_field: str = "text", encoding: str = "utf-8",
            doc_separator: str | None = None) -> Profile:
    """Run ``model`` over ``tokens`` tokens of ``data`` and capture statistics at ``sites``.

    ``data`` is an embedded corpus name (wiki, news), a path (read with ``text_field``,
    ``encoding``, ``doc_separator``), a list of documents, or a
    :class:`~actsparse.data.text.Windows`; ``sampling`` (spread, prefix) says which windows of
    the split ``tokens`` takes. Padding never enters a statistic.
    """
    from actsparse.data.text import Windows, text, token_windows
    from actsparse.models.loading import check_window

    check_window(model, data.input_ids.shape[1] if isinstance(data, Windows) else window)
    if isinstance(data, Windows):
        windows, source = data, "windows"
    else:
        if tokenizer is None:
            raise ValueError("profile needs the tokenizer to tokenise text data")
        docs = (text(data, split, text_field=text_field, encoding=encoding, doc_separator=doc_separator)
                if isinstance(data, str) else list(data))
        source = data if isinstance(data, str) else "documents"
        if tokens < window:
            raise DataError(f"--tokens {tokens} is fewer than one window of {window}; use at least {window}")
        windows = token_windows(tokenizer, docs, window=window, max_tokens=tokens, sampling=sampling)
    smap = site_map(model)
    start = time.perf_counter()
    with capture(model, sites, eps=eps, flow_threshold=flow_threshold, smap=smap) as cap:
        seen = run(model, windows.batches(batch_size), progress=progress, desc="profile",
                   total=windows.num_batches(batch_size))
    seconds = time.perf_counter() - start
    stats = cap.stats()
    from actsparse.models.loading import weights_identity

    meta = {
        "model": model_name or getattr(model, "actsparse_name", type(model).__name__),
        "identity": weights_identity(model),
        "family": smap.family,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "data": {"source": source, "split": split, "tokens": seen, "window": window,
                 "windows": len(windows), "batch_size": batch_size, "sampling": windows.sampling,
                 "windows_available": windows.available},
        "eps": list(cap.eps), "flow_threshold": flow_threshold,
        "seconds": seconds, "tokens_per_s": seen / seconds if seconds else None,
        "environment": environment(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    nonfinite = sum(st.nonfinite for st in stats.values())
    if nonfinite:
        meta["nonfinite_values"] = nonfinite
    return Profile(meta, cap.sites, stats)


# ------------------------------------------------------------- per-layer rows and their aggregate
LAYER_METRICS = ("zero_sparsity", "nonzero_per_token", "threshold_sparsity", "dormant_ratio_0.1",
                 "dormant_ratio_0.025", "static_dead", "static_dead_eps", "mean_abs", "temporal_sparsity",
                 "temporal_sparsity_eps", "activation_flow", "relu_balance")


def site_summary(st: SiteStats) -> dict:
    """:func:`metrics.site_summary`, with every metric None at a site that saw no finite value
    (all its values were NaN / inf: a ratio over nothing would read as 0% or 100%)."""
    summ = metrics.site_summary(st)
    if int(st.count.sum()) == 0:
        summ.update({k: None for k in summ if k not in ("width", "tokens", "nonfinite")})
    return summ


def _layer_row(site: Site, summ: dict, st: SiteStats) -> dict:
    row = {"layer": site.layer, "site": site.name, "width": st.width, "finite_entries": int(st.count.sum()),
           "token_pairs": st.pairs, "nonfinite": st.nonfinite}
    row.update({k: summ.get(k) for k in LAYER_METRICS})
    return row


def _weighted_mean(values, weights):
    pairs = [(float(v), w) for v, w in zip(values, weights) if v is not None and w > 0 and math.isfinite(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def _mean(values):
    return _weighted_mean(values, [1] * len(values))


def _nested(rows, key: str, sub: str | None = None):
    """Per-layer values of ``key`` (or of ``key[sub]``; None where a layer lacks it)."""
    out = []
    for r in rows:
        v = r.get(key)
        out.append(v.get(sub) if sub is not None and isinstance(v, dict) else (None if sub else v))
    return out


def aggregate_layers(rows: list[dict]) -> dict:
    """The summary of one site kind from its per-layer rows (see :data:`AGGREGATION`)."""
    ok = [r for r in rows if r["finite_entries"] > 0]
    entries = [r["finite_entries"] for r in ok]
    widths = [r["width"] for r in ok]
    pairs = [r["token_pairs"] * r["width"] for r in ok]

    def by_eps(key, weights):
        keys = next((r[key] for r in ok if r.get(key)), {})
        return {e: _weighted_mean(_nested(ok, key, e), weights) for e in keys}

    out = {
        "layers": len(rows), "layers_with_finite_values": len(ok), "width": rows[0]["width"],
        "neurons": sum(r["width"] for r in rows), "nonfinite": sum(r["nonfinite"] for r in rows),
        "zero_sparsity": _weighted_mean(_nested(ok, "zero_sparsity"), entries),
        "nonzero_per_token": _weighted_mean(_nested(ok, "nonzero_per_token"), entries),
        "threshold_sparsity": by_eps("threshold_sparsity", entries),
        "mean_abs": _weighted_mean(_nested(ok, "mean_abs"), entries),
        "dormant_ratio_0.1": _weighted_mean(_nested(ok, "dormant_ratio_0.1"), widths),
        "dormant_ratio_0.025": _weighted_mean(_nested(ok, "dormant_ratio_0.025"), widths),
        "static_dead": sum(r["static_dead"] for r in ok),
        "static_dead_eps": {e: sum(r["static_dead_eps"][e] for r in ok) for e in (ok[0]["static_dead_eps"] if ok else {})},
    }
    dormant = [(r["dormant_ratio_0.1"], r["layer"]) for r in ok if r["dormant_ratio_0.1"] is not None]
    if dormant:
        value, layer = max(dormant, key=lambda d: d[0])
        out["dormant_ratio_0.1_max"] = {"value": value, "layer": layer}
    if any(r.get("temporal_sparsity") is not None for r in ok):
        out["temporal_sparsity"] = _weighted_mean(_nested(ok, "temporal_sparsity"), pairs)
        out["temporal_sparsity_eps"] = by_eps("temporal_sparsity_eps", pairs)
    if any(r.get("activation_flow") for r in ok):
        out["activation_flow"] = {
            **{k: _weighted_mean(_nested(ok, "activation_flow", k), widths)
               for k in ("shared_frac", "specialised_frac", "never_active_frac")},
            **{k: _mean(_nested(ok, "activation_flow", k)) for k in ("mean_run_length", "persistence")}}
    if any(r.get("relu_balance") for r in ok):
        out["relu_balance"] = {"active_frac": _weighted_mean(_nested(ok, "relu_balance", "active_frac"), entries),
                               **{k: _mean(_nested(ok, "relu_balance", k)) for k in ("r_mean", "r_var")}}
    return out
