"""Calibration statistics for the training-free methods, gathered as a capture session.

A :class:`Request` names one statistic a method needs: the light |v| histogram of a site
(thresholds are its quantiles), the histogram of a per-channel-scaled score ``|v_j| * c_j``,
a bounded sample of raw token rows (CETT and the greedy allocation re-evaluate errors on
them), or a few whole calibration sequences (their token ids: TEAL's greedy re-runs decoder
layers on them). :func:`collect` turns requests into :class:`~actsparse.measure.capture.Probe`
objects and runs one capture over the calibration windows; requests with ``scale_from`` are
filled in a second pass, once the statistic they read (e.g. E|u_i| for CHESS) is known;
sequence samples are cut from the windows themselves (no forward pass).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from actsparse.errors import DataError
from actsparse.measure.accumulators import SiteStats
from actsparse.measure.capture import Probe, capture, run
from actsparse.models.sitemaps import Site

# The histograms need this many tokens per site before a quantile means anything.
MIN_CALIBRATION_TOKENS = 256


@dataclass(frozen=True)
class Request:
    key: str  # where the result goes, e.g. "model.layers.0.mlp.act_fn:output"
    module_path: str
    io: str  # "input" or "output"
    scale: torch.Tensor | None = field(default=None, compare=False)  # per-channel factor: score = |v| * scale
    scale_from: str | None = None  # key of a SiteStats whose per-neuron E|v| is the scale (2nd pass)
    sample_rows: int = 0  # >0: keep up to this many raw rows (tokens) instead of a histogram
    sample_sequences: int = 0  # >0: keep the token ids of up to this many whole windows (no capture)
    sequence_tokens: int = 0  # ... each cut to its first this many tokens
    required: bool = True  # False: only a check of the activations (no threshold reads it), made when data is given

    def probe(self, scale: torch.Tensor | None) -> Probe:
        site = Site(self.module_path, self.io)
        if self.sample_rows:
            return Probe(self.key, site, "rows", rows=self.sample_rows)
        return Probe(self.key, site, "light", scale=scale)


def sequence_sample(windows, n: int, tokens: int) -> torch.Tensor:
    """Token ids ``(m, T)`` of ``m = min(n, full windows)`` calibration windows spread evenly
    over ``windows``, each cut to its first ``T = min(tokens, window)`` tokens; only windows
    without padding in those tokens are taken (a whole sequence, its causal context intact)."""
    from actsparse.data.text import spread_indices

    t = min(int(tokens), int(windows.input_ids.shape[1]))
    full = [i for i in range(len(windows)) if bool(windows.attention_mask[i, :t].all())]
    if not full:
        raise DataError(f"no calibration window has {t} unpadded tokens for a sequence sample; "
                        "pass more calibration tokens")
    pick = [full[i] for i in spread_indices(len(full), min(int(n), len(full)))]
    return windows.input_ids[pick, :t].clone()


def mean_abs(st: SiteStats) -> torch.Tensor:
    return (st.abs_sum / st.count.clamp_min(1)).to(torch.float32)


def quantile_threshold(st: SiteStats, sparsity: float) -> float:
    """The threshold that drops a fraction ``sparsity`` of the values: the s-quantile of the
    calibration histogram of |v| (or of a scaled score), 0 at s = 0."""
    return 0.0 if sparsity <= 0 else st.abs_quantile(sparsity)


def probes_for(requests: list[Request], have: dict) -> list[Probe]:
    """The capture probes of ``requests``; a ``scale_from`` request reads its per-channel scale,
    E|v|, from the statistics in ``have``."""
    probes = []
    for r in requests:
        scale = r.scale
        if r.scale_from is not None:
            src = have.get(r.scale_from)
            if not isinstance(src, SiteStats):
                raise KeyError(f"request {r.key} needs statistics {r.scale_from!r}")
            scale = mean_abs(src)
        probes.append(r.probe(scale))
    return probes


@torch.no_grad()
def collect(model: nn.Module, windows, requests: list[Request], *, batch_size: int = 4, progress: bool = False,
            have: dict | None = None, world=None, description: dict | None = None) -> dict:
    """Run ``model`` over ``windows`` (a :class:`~actsparse.data.text.Windows`) and fill every
    request not already in ``have``. Returns a new dict (``have`` merged with the results).

    ``world`` (a :class:`~actsparse.measure.distributed.World` of more than one rank): this
    rank runs its block of whole batches and the statistics of every phase are merged across
    ranks before the next phase reads them (the second pass's scale comes from the merged
    first pass), so every rank returns what one process would; ``description`` (config,
    model identity) must agree on every rank, checked before the first merge."""
    from actsparse.measure import distributed as dist

    world = world or dist.SINGLE
    out = dict(have or {})
    todo = [r for r in requests if r.key not in out]
    for r in todo:
        if r.sample_sequences:  # from the whole windows, so every rank of a world takes the same
            out[r.key] = sequence_sample(windows, r.sample_sequences, r.sequence_tokens)
    todo = [r for r in todo if not r.sample_sequences]
    first = [r for r in todo if r.scale_from is None]
    second = [r for r in todo if r.scale_from is not None]
    local, prior = windows, None
    if world.active:
        local, idx = dist.shard_batches(windows, batch_size, world)
        prior = dist.batch_tokens(windows, batch_size)[:idx.start]
        desc = {"requests": [[r.key, r.io, r.sample_rows, r.scale_from] for r in todo],
                "windows": [len(windows), int(windows.input_ids.shape[1]), windows.tokens, batch_size],
                "windows_sha1": _tensor_digest(windows.input_ids, windows.attention_mask), **(description or {})}
        dist.check_same(desc, world, what="calibration")
    for phase in (first, second):
        if not phase:
            continue
        probes = probes_for(phase, out)
        with capture(model, probes=probes, total_tokens=windows.tokens, prior_tokens=prior) as cap:
            run(model, local.batches(batch_size), progress=progress, desc="calibrate",
                total=local.num_batches(batch_size))
        out.update(dist.all_reduce_stats(cap.stats(), world))
    return out


def _tensor_digest(*tensors: torch.Tensor) -> str:
    import hashlib

    h = hashlib.sha1()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def check_enough(stats: dict, requests: list[Request], minimum: int = MIN_CALIBRATION_TOKENS) -> None:
    """Refuse statistics that cannot give thresholds: too few tokens at a site a threshold reads,
    or non-finite activations at any requested site (counted in histograms, found in samples)."""
    for r in requests:
        v = stats.get(r.key)
        if v is None:
            continue  # an optional check that had no data to run on
        if r.sample_sequences:
            continue  # token ids: no quantile reads them, and they hold no activations
        rows = v.rows if isinstance(v, SiteStats) else int(v.shape[0])
        if r.required and rows < minimum:
            raise DataError(
                f"too little calibration data: {rows} tokens reached {r.key}; the histograms need at least "
                f"{minimum} tokens per site (pass more calibration tokens)")
        bad = v.nonfinite if isinstance(v, SiteStats) else int((~torch.isfinite(v)).sum())
        if bad:
            raise DataError(f"the calibration activations at {r.key} hold {bad} NaN/inf values; thresholds "
                            f"would be meaningless (check the model's weights and its dtype: fp16/bf16 overflow?)")
