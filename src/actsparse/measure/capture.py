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

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from actsparse.measure.accumulators import DEFAULT_EPS, SiteStats
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
                raise KeyError(f"site io must be 'input' or 'output', got {io!r} in {spec!r}")
            out.append(Site(path, io))
            continue
        role = spec.split(":")[0]
        if smap.family != "generic" and role in smap.roles:
            out += smap.role_sites(spec)
            continue
        known_roles = ", ".join(sorted(smap.roles)) or "(none: generic fallback)"
        raise KeyError(
            f"unknown site {spec!r}: not a module path of {type(model).__name__} and not a role. "
            f"Roles: {known_roles}; groups: default, mlp, linear_inputs, act; "
            f"or a module path such as {next(iter(p for p in modules if p), 'layer')!r}[:input|:output]."
        )
    seen, unique = set(), []
    for s in out:
        if s.name not in seen:
            seen.add(s.name)
            unique.append(s)
    return unique


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


def attach_site_hooks(model: nn.Module, sites: list[Site], root_pre_hook, make_input_hook, make_output_hook) -> list:
    """Register a root pre-hook (sees the forward's kwargs, e.g. ``attention_mask``) and one
    hook per site; returns the handles. On any error, removes what it added and re-raises."""
    handles = []
    try:
        handles.append(model.register_forward_pre_hook(root_pre_hook, with_kwargs=True))
        for site in sites:
            module = model.get_submodule(site.module_path)
            if site.io == "input":
                handles.append(module.register_forward_pre_hook(make_input_hook(site.name)))
            else:
                handles.append(module.register_forward_hook(make_output_hook(site.name)))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles


class capture:
    """Context manager that captures streaming statistics at ``sites`` of ``model``.

    Args:
        model: any ``nn.Module``; transformers models get role-based sites from their site map.
        sites: roles, groups, module paths (see :func:`resolve_sites`).
        eps: thresholds for the ``|v| <= eps`` counts (threshold sparsity, dead neurons).
        temporal: also accumulate consecutive-token statistics (deltas, activation runs).
        flow_threshold: a neuron is "active" for activation flow when ``|v| > flow_threshold``.
    """

    def __init__(self, model: nn.Module, sites: SiteSpec = "default", *, eps: Iterable[float] = DEFAULT_EPS,
                 temporal: bool = True, flow_threshold: float = 0.0, smap: SiteMap | None = None):
        self.model = model
        self.sites = resolve_sites(model, sites, smap)
        if not self.sites:
            raise ValueError(f"no sites to capture in {type(model).__name__} for spec {sites!r}")
        self.eps = tuple(sorted(float(e) for e in eps))
        self.temporal = temporal
        self.flow_threshold = float(flow_threshold)
        self._stats: dict[str, SiteStats] = {}
        self._handles: list = []
        self._mask: torch.Tensor | None = None
        self._explicit_mask = False
        self.calls = 0

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> "capture":
        if self._handles:
            raise RuntimeError("this capture session is already active")
        self._handles = attach_site_hooks(self.model, self.sites, self._root_pre_hook,
                                          self._make_input_hook, self._make_output_hook)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._remove()

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _root_pre_hook(self, module, args, kwargs):
        if self._explicit_mask:
            return None
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) >= 2 and isinstance(args[1], torch.Tensor) and args[1].ndim == 2:
            mask = args[1]
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        self.calls += 1
        return None

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Use ``mask`` (batch, time; 1 = real token) for the next forwards instead of the
        ``attention_mask`` seen by the model. ``None`` goes back to automatic."""
        self._mask = mask
        self._explicit_mask = mask is not None

    def _make_input_hook(self, name: str):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                self._reduce(name, args[0])
        return hook

    def _make_output_hook(self, name: str):
        def hook(module, args, output):
            t = output[0] if isinstance(output, tuple) else output
            if isinstance(t, torch.Tensor):
                self._reduce(name, t)
        return hook

    @torch.no_grad()
    def _reduce(self, name: str, t: torch.Tensor) -> None:
        values, is_seq = as_rows(t.detach())
        st = self._stats.get(name)
        if st is None:
            st = self._stats[name] = SiteStats(values.shape[-1], self.eps)
        if is_seq:
            valid = None
            if self._mask is not None and tuple(self._mask.shape) == tuple(values.shape[:2]):
                valid = self._mask.to(values.device).bool()
            if self.temporal:
                st.update_sequence(values, valid, flow_threshold=self.flow_threshold)
            else:
                st.update(values[valid] if valid is not None else values.reshape(-1, values.shape[-1]))
        else:
            st.update(values)

    # ---------------------------------------------------------------- results
    def stats(self) -> dict[str, SiteStats]:
        """Statistics per site name, in site order (sites never reached are omitted)."""
        return {s.name: self._stats[s.name] for s in self.sites if s.name in self._stats}

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)


@torch.no_grad()
def run(model: nn.Module, batches, *, progress: bool = True, desc: str = "forward", total: int | None = None) -> int:
    """Feed token batches through ``model`` (for use inside a capture). Returns tokens seen.

    ``batches`` yields dicts with ``input_ids`` and ``attention_mask`` (see
    :func:`actsparse.data.text.batches`), or tensors of input ids.
    """
    from tqdm.auto import tqdm

    import inspect

    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    tokens = 0
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, total=total):
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
        tokens += int(batch["attention_mask"].sum())
    return tokens
