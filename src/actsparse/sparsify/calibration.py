"""Calibration statistics for the training-free methods: streaming histograms of |v| (or of
a per-channel-scaled score ``|v_j| * c_j``) at chosen sites, plus bounded token samples
where a method needs to re-evaluate an error (CETT).

A :class:`Request` names one statistic; :func:`collect` runs the model over calibration
windows and returns ``{key: SiteStats or Tensor}``. Requests with ``scale_from`` are filled
in a second pass, once the statistic they read (e.g. E|u_i| for CHESS) is known.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from actsparse.errors import DataError
from actsparse.measure.accumulators import SiteStats

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


def mean_abs(st: SiteStats) -> torch.Tensor:
    return (st.abs_sum / st.count.clamp_min(1)).to(torch.float32)


@torch.no_grad()
def collect(model: nn.Module, windows, requests: list[Request], *, batch_size: int = 4, progress: bool = False,
            have: dict | None = None) -> dict:
    """Run ``model`` over ``windows`` (a :class:`~actsparse.data.text.Windows`) and fill every
    request not already in ``have``. Returns a new dict (``have`` merged with the results)."""
    from actsparse.measure.capture import run

    out = dict(have or {})
    todo = [r for r in requests if r.key not in out]
    first = [r for r in todo if r.scale_from is None]
    second = [r for r in todo if r.scale_from is not None]
    for phase in (first, second):
        if not phase:
            continue
        resolved = []
        for r in phase:
            scale = r.scale
            if r.scale_from is not None:
                src = out.get(r.scale_from)
                if not isinstance(src, SiteStats):
                    raise KeyError(f"request {r.key} needs statistics {r.scale_from!r}")
                scale = mean_abs(src)
            resolved.append((r, scale))
        n_batches = windows.num_batches(batch_size)
        results = _run_phase(model, windows, resolved, batch_size, n_batches, progress, run)
        out.update(results)
    return out


def _run_phase(model, windows, resolved, batch_size, n_batches, progress, run):
    mask_box = [None]
    total_tokens = windows.tokens
    results: dict = {}
    samples: dict[str, list] = {}
    handles = []

    def root_hook(module, args, kwargs):
        m = kwargs.get("attention_mask")
        mask_box[0] = m if isinstance(m, torch.Tensor) and m.ndim == 2 else None

    def reduce(req: Request, scale, t: torch.Tensor):
        v = t.detach()
        if v.ndim == 3:
            m = mask_box[0]
            if m is not None and tuple(m.shape) == tuple(v.shape[:2]):
                v = v[m.bool()]
            else:
                v = v.reshape(-1, v.shape[-1])
        elif v.ndim != 2:
            v = v.reshape(-1, v.shape[-1])
        v = v.to(torch.float32)
        if req.sample_rows:
            quota = math.ceil(v.shape[0] * min(1.0, req.sample_rows / max(total_tokens, 1)))
            have = sum(x.shape[0] for x in samples.get(req.key, []))
            take = min(quota, req.sample_rows - have, v.shape[0])
            if take > 0:
                idx = torch.linspace(0, v.shape[0] - 1, take).round().long()
                samples.setdefault(req.key, []).append(v[idx].clone())
            return
        if scale is not None:
            v = v.abs() * scale.to(v.device)
        st = results.get(req.key)
        if st is None:
            st = results[req.key] = SiteStats(v.shape[-1])
        light_update(st, v.cpu())

    def make_hook(req, scale):
        if req.io == "input":
            return lambda module, args: reduce(req, scale, args[0])
        return lambda module, args, output: reduce(req, scale, output[0] if isinstance(output, tuple) else output)

    try:
        handles.append(model.register_forward_pre_hook(root_hook, with_kwargs=True))
        for req, scale in resolved:
            module = model.get_submodule(req.module_path)
            hook = make_hook(req, scale)
            if req.io == "input":
                handles.append(module.register_forward_pre_hook(hook))
            else:
                handles.append(module.register_forward_hook(hook))
        run(model, windows.batches(batch_size), progress=progress, desc="calibrate", total=n_batches)
    finally:
        for h in handles:
            h.remove()
    for key, parts in samples.items():
        results[key] = torch.cat(parts)
    return results


def light_update(st: SiteStats, v: torch.Tensor) -> None:
    """Fold rows ``v`` (rows, width) into the fields a threshold needs: the |v| histogram,
    per-neuron counts, nonzeros and |v| sums (the other SiteStats fields stay zero)."""
    from actsparse.measure.accumulators import HIST_BINS, hist_bin_index

    bad = ~torch.isfinite(v)
    n_bad = int(bad.sum())
    absv = v.abs()
    if n_bad:
        st.nonfinite += n_bad
        absv = absv.masked_fill(bad, 0.0)
    st.rows += v.shape[0]
    valid = v.shape[0] - (bad.sum(0) if n_bad else 0)
    st.count += valid
    st.nonzero += (absv != 0).sum(0)
    st.abs_sum += absv.sum(0, dtype=torch.float64)
    hist = torch.bincount(hist_bin_index(absv).reshape(-1), minlength=HIST_BINS)
    if n_bad:
        hist[0] -= n_bad
    st.hist += hist


def check_enough(stats: dict, keys, minimum: int = MIN_CALIBRATION_TOKENS) -> None:
    for key in keys:
        v = stats[key]
        rows = v.rows if isinstance(v, SiteStats) else int(v.shape[0])
        if rows < minimum:
            raise DataError(
                f"too little calibration data: {rows} tokens reached {key}; the histograms need at least "
                f"{minimum} tokens per site (pass more calibration tokens)")
        if isinstance(v, SiteStats) and v.nonfinite:
            raise DataError(f"calibration statistics at {key} hold {v.nonfinite} NaN/inf values; thresholds "
                            f"would be meaningless (check the model and its dtype)")
