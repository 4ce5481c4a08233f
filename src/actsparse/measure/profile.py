"""Profile a model on text: capture every site, reduce to metrics, save and reload.

``profile(...)`` returns a :class:`Profile`; ``Profile.save(dir)`` writes ``profile.json``
(metadata and every scalar metric, what reports render) and ``stats.safetensors`` (the
raw per-neuron accumulators, so anything can be recomputed). ``Profile.load(dir)``
reads both back; nothing loaded executes code.
"""
from __future__ import annotations

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

FORMAT = "actsparse.profile/1"


@dataclass
class Profile:
    """Statistics of every captured site plus what produced them."""

    meta: dict
    sites: list[Site]
    stats: dict[str, SiteStats]
    summary: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.summary:
            self.summary = {name: metrics.site_summary(st) for name, st in self.stats.items()}

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
        """Per site kind: per-layer metrics and the pooled |v| histogram (JSON-ready)."""
        edges = hist_lower_edges()
        out = {}
        for kind, items in self.by_kind().items():
            pooled = SiteStats(items[0][1].width, items[0][1].eps)
            layers = []
            for site, st in items:
                pooled.merge(st)
                summ = self.summary[site.name]
                layers.append({
                    "layer": site.layer, "site": site.name,
                    "zero_sparsity": summ["zero_sparsity"],
                    "threshold_sparsity": summ["threshold_sparsity"],
                    "dormant_ratio_0.1": summ["dormant_ratio_0.1"],
                    "dormant_ratio_0.025": summ["dormant_ratio_0.025"],
                    "static_dead": summ["static_dead"],
                    "mean_abs": summ["mean_abs"],
                    "temporal_sparsity": summ.get("temporal_sparsity"),
                    "activation_flow": summ.get("activation_flow"),
                    "relu_balance": summ.get("relu_balance"),
                    "nonfinite": summ["nonfinite"],
                })
            nz = torch.nonzero(pooled.hist).flatten()
            lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
            out[kind] = {
                "layers": layers,
                "pooled": metrics.site_summary(pooled),
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
        if doc.get("format") != FORMAT:
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
