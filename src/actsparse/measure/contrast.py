"""fTRI contrast: which neurons (or experts) separate two prompt sets A and B.

    res = contrast(model, tok, docs_a, docs_b)            # every MLP neuron of every layer
    res.top(10)                                           # [(layer, neuron), ...] most A-specific
    res.save("out/contrast")                              # contrast.json + contrast.safetensors

Each prompt (a document, cut to its first ``max_tokens`` tokens) runs through the model once;
hooks fold every token into per-prompt, per-unit sums (never per-token tensors), so memory is
prompts x units whatever the prompt length. The per-prompt means then go through the permutation
test of :mod:`actsparse.measure.permutation` (labels shuffled between whole prompts).

Units: for a dense model, the neurons of the MLP site ``site`` (default ``mlp.down:input``: the
coefficient each neuron puts on its column of the down projection, i.e. exactly what switching
it off removes; ``act(gate) * up`` in a gated MLP); for an MoE model (Mixtral, Qwen2/3-MoE,
OLMoE), the routed experts of every router. Per-prompt values of a unit:

* neurons: ``mean |v|`` over the prompt's tokens (the ``standardized`` statistic uses it) and
  the firing rate ``P(|v| > threshold)`` (the ``rate`` statistic);
* experts: the gate mass (mean routing weight, 0 where not selected; ``standardized``) and the
  selection frequency (fraction of tokens that route to it; ``rate``, MoTE's fTRI).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from actsparse.errors import ConfigError, DataError, UnsupportedError
from actsparse.measure.hooks import MaskTracker
from actsparse.measure.permutation import benjamini_hochberg, permutation_test
from actsparse.models.routers import routers, supported_routers
from actsparse.models.sitemaps import Site, site_map

FORMAT = "actsparse.contrast/1"
STATISTICS = {"standardized": ("mean_abs", "standardized"), "rate": ("rate", "difference")}
NEURON_SITES = ("mlp.down:input", "mlp.act")
# per-prompt sums kept for every unit
_SUMS = ("sum_v", "sum_abs", "fired", "sum_v_fired")


class PromptSums:
    """Per-prompt, per-unit sums of one layer: value, |value|, firing count and the value where
    it fires; plus each prompt's token count."""

    def __init__(self, prompts: int, width: int):
        self.tokens = torch.zeros(prompts, dtype=torch.float64)
        self.sums = {k: torch.zeros(prompts, width, dtype=torch.float64) for k in _SUMS}

    def add(self, prompt_ids: torch.Tensor, v: torch.Tensor, fired: torch.Tensor, valid: torch.Tensor) -> None:
        """Fold (rows, time, width) values ``v`` (0 at padding), the bool ``fired`` and the
        (rows, time) ``valid`` mask into the prompts ``prompt_ids`` (one per row)."""
        v = v.double()
        f = fired.double()
        self.tokens.index_add_(0, prompt_ids, valid.double().sum(1))
        self.sums["sum_v"].index_add_(0, prompt_ids, v.sum(1))
        self.sums["sum_abs"].index_add_(0, prompt_ids, v.abs().sum(1))
        self.sums["fired"].index_add_(0, prompt_ids, f.sum(1))
        self.sums["sum_v_fired"].index_add_(0, prompt_ids, (v * f).sum(1))

    def means(self) -> dict[str, np.ndarray]:
        """Per-prompt means: ``mean`` (signed), ``mean_abs``, ``rate`` (firing rate) and
        ``fired_mean`` (signed mean over the tokens where the unit fires, 0 where it never does)."""
        n = self.tokens.clamp_min(1)[:, None]
        fired = self.sums["fired"]
        return {"mean": (self.sums["sum_v"] / n).numpy(), "mean_abs": (self.sums["sum_abs"] / n).numpy(),
                "rate": (fired / n).numpy(),
                "fired_mean": torch.where(fired > 0, self.sums["sum_v_fired"] / fired.clamp_min(1), 0.0).numpy()}


class _Collector:
    """Owned hooks that fold each forward into :class:`PromptSums` per layer; ``rows`` (the
    prompt of each batch row) is set before every forward. Removed on exit and on error."""

    def __init__(self, model: nn.Module, units: str, site: str, threshold: float, prompts: int):
        self.model = model
        self.threshold = threshold
        self.prompts = prompts
        self.rows: torch.Tensor | None = None
        self.sums: dict[int, PromptSums] = {}
        self.tracker = MaskTracker()
        self._handles: list = []
        if units == "experts":
            self.targets = [(r.path, r.layer, False, self._router_hook(r)) for r in routers(model)]
        else:
            self.targets = [(s.module_path, s.layer, s.io == "input", self._site_hook(s))
                            for s in site_map(model, warn=False).role_sites(site)]
        self.layers = [t[1] for t in self.targets]

    def __enter__(self) -> "_Collector":
        try:
            self._handles.append(self.tracker.attach(self.model))
            for path, _, pre, hook in self.targets:
                module = self.model.get_submodule(path)
                if pre:
                    self._handles.append(module.register_forward_pre_hook(hook))
                else:
                    self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        while self._handles:
            self._handles.pop().remove()

    @torch.no_grad()
    def _fold(self, layer: int, v: torch.Tensor, fired: torch.Tensor, valid: torch.Tensor) -> None:
        v = v * valid[..., None]
        fired = fired & valid[..., None]
        if layer not in self.sums:
            self.sums[layer] = PromptSums(self.prompts, v.shape[-1])
        self.sums[layer].add(self.rows, v.cpu(), fired.cpu(), valid.cpu())

    def _site_hook(self, s: Site):
        def fold(t: torch.Tensor) -> None:
            t = t.detach().float()
            valid = self.tracker.valid_rows(t)
            if valid is None:
                raise DataError(f"{s.name}: expected a (batch, time, width) tensor under the attention mask, got "
                                f"shape {tuple(t.shape)}")
            self._fold(s.layer, t, t.abs() > self.threshold, valid)

        if s.io == "input":
            def pre_hook(module, args):
                fold(args[0])
            return pre_hook

        def hook(module, args, output):
            fold(output[0] if isinstance(output, tuple) else output)
        return hook

    def _router_hook(self, router):
        @torch.no_grad()
        def hook(module, args, output):
            _, weights, idx = output
            mask = self.tracker.mask
            if mask is None or mask.numel() != idx.shape[0]:
                raise DataError(f"{router.path}: expert contrast needs the attention mask of each forward")
            w = torch.zeros(idx.shape[0], router.num_experts, dtype=torch.float32, device=idx.device)
            w.scatter_(1, idx, weights.detach().float())
            sel = torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True)
            shape = (*mask.shape, router.num_experts)
            self._fold(router.layer, w.reshape(shape), sel.reshape(shape), mask.bool().to(w.device))
        return hook


def prompt_ids(tokenizer, docs: list[str], max_tokens: int) -> list[list[int]]:
    """Each document's tokens (BOS first when the tokenizer has one), cut to ``max_tokens``."""
    bos = tokenizer.bos_token_id
    out = []
    for i, ids in enumerate(tokenizer(list(docs), add_special_tokens=False)["input_ids"]):
        ids = ([bos] if bos is not None else []) + list(ids)
        if not ids:
            raise DataError(f"prompt {i} tokenises to nothing; remove empty prompts")
        out.append(ids[:max_tokens])
    return out


def resolve_units(model: nn.Module, units: str | None, site: str) -> str:
    """``neurons`` or ``experts`` (``None``: experts when the model has routers)."""
    has_routers = bool(routers(model))
    units = units or ("experts" if has_routers else "neurons")
    if units == "experts":
        if not has_routers:
            raise UnsupportedError(f"{type(model).__name__} has no expert routers actsparse knows "
                                   f"({supported_routers()}); contrast its MLP neurons (units='neurons')")
        return units
    if units != "neurons":
        raise ConfigError(f"units must be 'neurons' or 'experts', got {units!r}")
    if site not in NEURON_SITES:
        raise ConfigError(f"neuron contrast site must be one of {', '.join(NEURON_SITES)}, got {site!r}")
    smap = site_map(model, warn=False)
    if smap.family == "generic" or site.split(":")[0] not in smap.roles:
        raise UnsupportedError(f"{type(model).__name__} has no {site} site in actsparse's site maps (family "
                               f"{smap.family}); the contrast needs a mapped MLP (see models/sitemaps.py FAMILIES)")
    return units


@torch.no_grad()
def collect(model: nn.Module, tokenizer, docs: list[str], *, units: str = "neurons", site: str = "mlp.down:input",
            threshold: float = 0.1, max_tokens: int = 256, batch_size: int = 8, progress: bool = False,
            desc: str = "contrast") -> tuple[list[int], dict[int, dict[str, np.ndarray]], np.ndarray]:
    """Run every prompt once; returns ``(layers, {layer: per-prompt means}, tokens per prompt)``."""
    import inspect

    from tqdm.auto import tqdm

    from actsparse.models.loading import check_window

    seqs = prompt_ids(tokenizer, docs, max_tokens)
    check_window(model, max(len(s) for s in seqs), option="a prompt of")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    params = inspect.signature(model.forward).parameters
    extra = {"use_cache": False} if "use_cache" in params else {}
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
    col = _Collector(model, units, site, threshold, len(seqs))
    with col:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
            idx = order[start:start + batch_size]
            width = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, :len(seqs[i])] = 1
            col.rows = torch.tensor(idx)
            model(input_ids=ids, attention_mask=mask, **extra)
    if not col.sums:
        raise DataError("no unit was reached during the forwards (the hooked modules never ran)")
    tokens = col.sums[col.layers[0]].tokens.numpy().copy()
    return col.layers, {layer: col.sums[layer].means() for layer in col.layers}, tokens


@dataclass
class ContrastResult:
    """Per-unit contrast of A against B, as (layers, units) arrays: ``statistic`` (positive: more
    active on A), ``p`` (two-sided permutation p-value), ``q`` (Benjamini-Hochberg over all units of
    all layers), ``a_value`` / ``b_value`` (the statistic's per-prompt value averaged over each
    set), ``a_mean`` (signed mean over A prompts) and ``a_fired_mean`` (signed mean on A where the
    unit fires: the value a force-on sets)."""

    units: str
    site: str | None
    statistic_kind: str
    threshold: float
    layers: list[int]
    arrays: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.arrays["statistic"].shape[1])

    def top(self, n: int, *, max_q: float | None = None) -> list[tuple[int, int]]:
        """The ``n`` units most specific to A (largest statistic; ties: smaller p, then layer and
        index), as ``(layer, index)``; ``max_q`` keeps only units with ``q <= max_q``."""
        stat = self.arrays["statistic"].numpy().reshape(-1)
        p = self.arrays["p"].numpy().reshape(-1)
        keep = stat > 0
        if max_q is not None:
            keep &= self.arrays["q"].numpy().reshape(-1) <= max_q
        cand = np.nonzero(keep)[0]
        order = cand[np.lexsort((cand, p[cand], -stat[cand]))]
        if n > order.size:
            raise DataError(f"only {order.size} units are more active on A"
                            f"{f' with q <= {max_q}' if max_q is not None else ''}; asked for the top {n}")
        w = self.width
        return [(self.layers[i // w], int(i % w)) for i in order[:n]]

    def save(self, path: str | Path) -> Path:
        from actsparse.io import write_json, write_safetensors
        from actsparse.version import __version__

        directory = Path(path)
        write_safetensors(directory / "contrast.safetensors",
                          {k: v.to(torch.float32).contiguous() for k, v in self.arrays.items()},
                          metadata={"format": FORMAT})
        doc = {"format": FORMAT, "actsparse": __version__, "units": self.units, "site": self.site,
               "statistic": self.statistic_kind, "threshold": self.threshold, "layers": self.layers,
               "width": self.width, "meta": self.meta}
        write_json(directory / "contrast.json", doc)
        return directory

    @classmethod
    def load(cls, path: str | Path, *, model: nn.Module | None = None, check_weights: bool = True) -> "ContrastResult":
        """Read a saved contrast; with ``model``, refuse one made for another model."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(path)
        jf, tf = directory / "contrast.json", directory / "contrast.safetensors"
        if not jf.is_file() or not tf.is_file():
            raise ConfigError(f"{directory} is not a saved contrast (needs contrast.json and contrast.safetensors; "
                              "write one with `actsparse contrast`)")
        try:
            doc = json.loads(jf.read_text())
            arrays = load_file(str(tf))
        except (json.JSONDecodeError, SafetensorError, OSError, ValueError) as err:
            raise ConfigError(f"{directory} holds a corrupt contrast ({err}); run `actsparse contrast` again") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ConfigError(f"{jf} has format {doc.get('format') if isinstance(doc, dict) else None!r}, "
                              f"expected {FORMAT!r}")
        shape = (len(doc["layers"]), doc["width"])
        bad = [k for k, v in arrays.items() if tuple(v.shape) != shape]
        if bad or "statistic" not in arrays:
            raise ConfigError(f"{tf} does not match {jf} (arrays {bad or ['statistic missing']}, expected {shape})")
        res = cls(doc["units"], doc["site"], doc["statistic"], doc["threshold"], list(doc["layers"]), arrays,
                  doc.get("meta", {}))
        if model is not None:
            from actsparse.models.units import check_model

            check_model(model, res.meta.get("model", {}), f"contrast {directory}", check_weights=check_weights)
        return res


def contrast(model: nn.Module, tokenizer, a: list[str], b: list[str], *, statistic: str = "standardized",
             units: str | None = None, site: str = "mlp.down:input", threshold: float = 0.1,
             max_tokens: int = 256, permutations: int = 1000, seed: int = 0, batch_size: int = 8,
             progress: bool = False, describe: dict | None = None) -> ContrastResult:
    """Contrast prompt set ``a`` against ``b`` (lists of documents) at every unit of ``model``.

    ``statistic``: ``"standardized"`` (Cohen's d of the per-prompt mean |v|; experts: gate mass)
    or ``"rate"`` (difference of per-prompt firing rates, ``|v| > threshold``; experts:
    selection frequency). ``permutations``: label shuffles of the test (all assignments when
    there are at most this many: an exact test). ``describe``: what A and B are, kept in meta."""
    from actsparse.models.units import model_shape

    if statistic not in STATISTICS:
        raise ConfigError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    if permutations < 1 or max_tokens < 1 or batch_size < 1:
        raise ConfigError("permutations, max_tokens and batch_size must be positive")
    if threshold < 0:
        raise ConfigError(f"threshold must be >= 0, got {threshold}")
    units = resolve_units(model, units, site)
    a, b = list(a), list(b)
    least = 2 if statistic == "standardized" else 1
    if len(a) < least or len(b) < least:
        raise DataError(f"the {statistic} contrast needs at least {least} prompts in each set; got {len(a)} in A and "
                        f"{len(b)} in B")
    start = time.perf_counter()
    layers, means, tokens = collect(model, tokenizer, a + b, units=units, site=site, threshold=threshold,
                                    max_tokens=max_tokens, batch_size=batch_size, progress=progress)
    in_a = np.zeros(len(a) + len(b), bool)
    in_a[:len(a)] = True
    value, kind = STATISTICS[statistic]
    x = np.concatenate([means[layer][value] for layer in layers], axis=1)  # prompts x (layers * width)
    test = permutation_test(x, in_a, kind=kind, permutations=permutations, seed=seed)
    shape = (len(layers), -1)

    def t(arr):
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)).reshape(shape)

    arrays = {"statistic": t(test["statistic"]), "p": t(test["p"]), "q": t(benjamini_hochberg(test["p"])),
              "a_value": t(x[in_a].mean(0)), "b_value": t(x[~in_a].mean(0)),
              "a_mean": t(np.concatenate([means[la]["mean"][in_a].mean(0) for la in layers])),
              "a_fired_mean": t(np.concatenate([_fired_mean(means[la], in_a) for la in layers]))}
    meta = {"model": model_shape(model, units, site), "prompts": {"a": len(a), "b": len(b)},
            "tokens": {"a": int(tokens[in_a].sum()), "b": int(tokens[~in_a].sum())}, "max_tokens": max_tokens,
            "permutations": test["assignments"], "exact": test["exact"], "seed": seed,
            "seconds": time.perf_counter() - start, **({"sets": describe} if describe else {})}
    q = arrays["q"]
    meta["significant"] = {str(alpha): int((q <= alpha).sum()) for alpha in (0.01, 0.05, 0.1)}
    return ContrastResult(units, site if units == "neurons" else None, statistic, threshold, layers,
                          {k: v.float() for k, v in arrays.items()}, meta)


def _fired_mean(m: dict[str, np.ndarray], in_a: np.ndarray) -> np.ndarray:
    """The signed mean value on A's prompts where the unit fires (prompts weighted by their
    firing rate, i.e. by the tokens where it fired, in proportion)."""
    rate = m["rate"][in_a]
    w = rate.sum(0)
    return np.where(w > 0, (m["fired_mean"][in_a] * rate).sum(0) / np.where(w > 0, w, 1), 0.0)
