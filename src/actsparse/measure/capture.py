"""Owned activation capture: a context manager that hooks sites and reduces in the hook.

    with capture(model, sites="mlp.down:input") as cap:
        model(input_ids, attention_mask=mask)
    stats = cap.stats()          # {"model.layers.0.mlp.down_proj:input": SiteStats, ...}

The session removes exactly the hooks it added (on exit and on error), never touches
hooks it did not add, and nests. Raw activations are never kept: each hook call folds
its tensor into a :class:`SiteStats`. Padding is excluded through the ``attention_mask``
passed to the model's forward (picked up by a hook on the root module) or
:meth:`capture.set_mask`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from actsparse.errors import SiteError
from actsparse.measure.accumulators import DEFAULT_EPS, SiteStats
from actsparse.measure.hooks import SiteHooks, valid_tokens
from actsparse.models.sitemaps import Site, SiteMap, generic_activation_modules, generic_sites, site_map

SiteSpec = str | Site | Sequence[str | Site] | None

# site groups a user can name instead of roles or paths
GROUPS = {
    "default": ("mlp.act", "linear_inputs"),
    "mlp": ("mlp.act", "mlp.down:input"),
}


def resolve_sites(model: nn.Module, sites: SiteSpec = "default", smap: SiteMap | None = None) -> list[Site]:
    """Expand a site spec (roles, groups, module paths, ``act``) into concrete Sites.

    Accepted strings: a role (``mlp.act``, ``mlp.down:input``, ``attn.q:input``); the group
    ``linear_inputs`` (every linear input of every block) or ``default`` / ``mlp``; ``act``
    (every activation module); or a module path, optionally with ``:input`` / ``:output``
    (output when omitted).
    """
    if sites is None:
        sites = "default"
    if isinstance(sites, (str, Site)):
        sites = [sites]
    smap = smap or site_map(model, warn=False)
    modules = dict(model.named_modules())
    out: list[Site] = []
    for spec in sites:
        if isinstance(spec, Site):
            out.append(spec)
            continue
        spec = spec.strip()
        if spec in GROUPS:
            if smap.family == "generic":
                out += generic_sites(model)
            else:
                out += resolve_sites(model, list(GROUPS[spec]), smap)
            continue
        if spec == "linear_inputs":
            out += smap.linear_input_sites() if smap.family != "generic" else [
                s for s in generic_sites(model) if s.io == "input"]
            continue
        if spec == "act":
            if smap.family != "generic":
                out += smap.role_sites("mlp.act")
            else:
                out += [Site(p, "output") for p, _ in generic_activation_modules(model)]
            continue
        path, _, io = spec.rpartition(":") if ":" in spec else (spec, "", "")
        if path in modules and path:
            io = io or "output"
            if io not in ("input", "output"):
                raise SiteError(f"site io must be 'input' or 'output', got {io!r} in {spec!r}")
            out.append(Site(path, io))
            continue
        role = spec.split(":")[0]
        if smap.family != "generic" and role in smap.roles:
            out += smap.role_sites(spec)
            continue
        known_roles = ", ".join(sorted(smap.roles)) or "(none: generic fallback)"
        raise SiteError(
            f"unknown site {spec!r}: not a module path of {type(model).__name__} and not a role. "
            f"Roles: {known_roles}; groups: default, mlp, linear_inputs, act; "
            f"or a module path such as {next(iter(p for p in modules if p), 'layer')!r}[:input|:output]."
        )
    return _unique_sites(out)


def as_rows(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """View a site tensor as (rows, width) or (batch, time, width); returns (tensor, is_sequence).

    4-D and larger tensors are NCHW-style: the neuron axis is dim 1 (conv channels).
    """
    if t.ndim == 3:
        return t, True
    if t.ndim <= 1:
        return t.reshape(1, -1), False
    if t.ndim == 2:
        return t, False
    return t.movedim(1, -1).reshape(-1, t.shape[1]), False


@dataclass(frozen=True)
class Probe:
    """One statistic read at one site, stored under ``key``.

    ``stats``: ``"full"`` (every :class:`SiteStats` field, temporal ones for sequences),
    ``"light"`` (the |v| histogram, counts and |v| sums: all a threshold needs, cheaper), or
    ``"rows"`` (up to ``rows`` raw token rows, spread evenly over the run's ``total_tokens``).
    ``scale``: light statistics of ``|v| * scale`` (one factor per channel) instead of ``|v|``.
    """

    key: str
    site: Site
    stats: str = "full"
    scale: torch.Tensor | None = field(default=None, compare=False)
    rows: int = 0

    def __post_init__(self):
        if self.stats not in ("full", "light", "rows"):
            raise ValueError(f"probe stats must be 'full', 'light' or 'rows', got {self.stats!r}")
        if self.stats == "rows" and self.rows < 1:
            raise ValueError("a 'rows' probe needs rows >= 1")


class capture:
    """Context manager that captures streaming statistics at ``sites`` of ``model``.

    Args:
        model: any ``nn.Module``; transformers models get role-based sites from their site map.
        sites: roles, groups, module paths (see :func:`resolve_sites`): full statistics at each.
        probes: instead of ``sites``, explicit :class:`Probe` objects (calibration uses light
            statistics, scaled scores and row samples; several probes may share a site).
        eps: thresholds for the ``|v| <= eps`` counts (threshold sparsity, dead neurons).
        temporal: also accumulate consecutive-token statistics (deltas, activation runs).
        flow_threshold: a neuron is "active" for activation flow when ``|v| > flow_threshold``.
        total_tokens: the run's token count, which row-sampling probes spread their rows over.
        prior_tokens: real tokens of each forward that ran *before* this session's first one, in
            another process of a data-parallel run: row-sampling probes then keep the rows a
            single process would keep from this point on (see :mod:`actsparse.measure.distributed`).
    """

    def __init__(self, model: nn.Module, sites: SiteSpec = "default", *, probes: Sequence[Probe] | None = None,
                 eps: Iterable[float] = DEFAULT_EPS, temporal: bool = True, flow_threshold: float = 0.0,
                 smap: SiteMap | None = None, total_tokens: int | None = None,
                 prior_tokens: Sequence[int] | None = None):
        self.model = model
        self.prior_tokens = list(prior_tokens or [])
        self._prior_kept: dict[int, int] = {}
        if probes is None:
            probes = [Probe(s.name, s) for s in resolve_sites(model, sites, smap)]
        self.probes = list(probes)
        if not self.probes:
            raise ValueError(f"no sites to capture in {type(model).__name__} for spec {sites!r}")
        self.sites = _unique_sites(p.site for p in self.probes)
        self.eps = tuple(sorted(float(e) for e in eps))
        self.temporal = temporal
        self.flow_threshold = float(flow_threshold)
        self.total_tokens = total_tokens
        self._stats: dict[str, SiteStats] = {}
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._hooks = SiteHooks(model, [(p.site, self._reducer(p)) for p in self.probes])

    @property
    def calls(self) -> int:
        return self._hooks.tracker.forwards

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> "capture":
        self._hooks.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._hooks.remove()

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Use ``mask`` (batch, time; 1 = real token) for the next forwards instead of the
        ``attention_mask`` seen by the model. ``None`` goes back to automatic."""
        self._hooks.set_mask(mask)

    def _reducer(self, probe: Probe):
        if probe.stats == "full":
            return lambda t: self._reduce_full(probe.key, t)
        if probe.stats == "light":
            return lambda t: self._reduce_light(probe, t)
        return lambda t: self._sample_rows(probe, t)

    @torch.no_grad()
    def _reduce_full(self, key: str, t: torch.Tensor) -> None:
        values, is_seq = as_rows(t.detach())
        st = self._stats.get(key)
        if st is None:
            st = self._stats[key] = SiteStats(values.shape[-1], self.eps)
        if is_seq:
            valid = self._hooks.tracker.valid_rows(values)
            if self.temporal:
                st.update_sequence(values, valid, flow_threshold=self.flow_threshold)
            else:
                st.update(valid_tokens(values, valid))
        else:
            st.update(values)

    @torch.no_grad()
    def _reduce_light(self, probe: Probe, t: torch.Tensor) -> None:
        values, is_seq = as_rows(t.detach())
        st = self._stats.get(probe.key)
        if st is None:
            st = self._stats[probe.key] = SiteStats(values.shape[-1], self.eps)
        valid = self._hooks.tracker.valid_rows(values) if is_seq else None
        st.update_light(values, valid, scale=probe.scale)

    @torch.no_grad()
    def _sample_rows(self, probe: Probe, t: torch.Tensor) -> None:
        """Keep ``take`` of this call's real tokens, evenly spaced (only those rows are copied)."""
        values, is_seq = as_rows(t.detach())
        valid = self._hooks.tracker.valid_rows(values) if is_seq else None
        flat = values.reshape(-1, values.shape[-1])
        rows = valid.reshape(-1).nonzero().squeeze(1) if valid is not None else None
        n = flat.shape[0] if rows is None else rows.numel()
        total = self.total_tokens or n
        quota = math.ceil(n * min(1.0, probe.rows / max(total, 1)))
        have = self._kept_before(probe.rows) + sum(x.shape[0] for x in self._rows.get(probe.key, []))
        take = min(quota, probe.rows - have, n)
        if take <= 0:  # reached, nothing to keep: an empty sample (a data-parallel rank after the quota)
            self._rows.setdefault(probe.key, []).append(flat[:0].to(torch.float32).cpu())
        else:
            idx = torch.linspace(0, n - 1, take).round().long()
            pick = idx if rows is None else rows[idx]
            self._rows.setdefault(probe.key, []).append(flat[pick.to(flat.device)].to(torch.float32).cpu())

    def _kept_before(self, rows: int) -> int:
        if not self.prior_tokens:
            return 0
        if rows not in self._prior_kept:
            from actsparse.measure.distributed import rows_kept_before

            self._prior_kept[rows] = rows_kept_before(self.prior_tokens, rows, self.total_tokens or 0)
        return self._prior_kept[rows]

    # ---------------------------------------------------------------- results
    def stats(self) -> dict:
        """Results per probe key, in probe order (probes never reached are omitted):
        :class:`SiteStats` for statistics probes, a (rows, width) fp32 tensor for row samples."""
        out = {}
        for p in self.probes:
            if p.key in self._stats:
                out[p.key] = self._stats[p.key]
            elif p.key in self._rows:
                out[p.key] = torch.cat(self._rows[p.key])
        return out

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)


def _unique_sites(sites) -> list[Site]:
    seen, out = set(), []
    for s in sites:
        if s.name not in seen:
            seen.add(s.name)
            out.append(s)
    return out


@torch.no_grad()
def run(model: nn.Module, batches, *, progress: bool = True, desc: str = "forward", total: int | None = None) -> int:
    """Feed token batches through ``model`` (for use inside a capture). Returns tokens seen.

    ``batches`` yields dicts with ``input_ids`` and ``attention_mask`` (see
    :func:`actsparse.data.text.batches`), or tensors of input ids.
    """
    from tqdm.auto import tqdm

    import inspect

    params = inspect.signature(model.forward).parameters
    extra = {"use_cache": False} if "use_cache" in params else {}
    if "logits_to_keep" in params and not _head_is_watched(model):
        extra["logits_to_keep"] = 1  # statistics need the activations, not B x T x vocab logits
    tokens = 0
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, total=total):
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
        tokens += int(batch["attention_mask"].sum())
    return tokens


def _head_is_watched(model: nn.Module) -> bool:
    """True if a hook reads the LM head (then every position's logits must be computed)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and bool(head._forward_hooks or head._forward_pre_hooks)
