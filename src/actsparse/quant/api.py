"""``quantize_`` / ``save_quantized`` / ``load_quantized``: block-quantised weights for a model.

    quantize_(model, Q4Config(awq=True), calibration=windows)   # in place
    save_quantized(model, "out/")                               # model.safetensors + quant.json
    model = load_quantized(asp.load("smollm2-135m").model, "out/")

Every block linear (and ``lm_head`` with ``lm_head=True``) becomes a
:class:`~actsparse.quant.modules.QuantLinear`. AWQ changes the fp model first (its folds
divide norm gains / producer rows: exact, see :mod:`actsparse.quant.awq`), so a quantised model
cannot be turned back into the dense one: load the dense model again. The saved directory holds
one safetensors file (every tensor of the quantised model, no pickle) and ``quant.json``
(versioned: the config, the model identity it was made from, each quantised linear's format,
layout and shape, the AWQ record per group); loading checks the identity and refuses another model.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from actsparse.errors import ConfigError, DataError, StateError, UnsupportedError
from actsparse.io import read_json, write_json, write_safetensors
from actsparse.kernels.quant_formats import ROWS, SCALE_DTYPE, TRANSPOSED
from actsparse.models.swap import has, swap_module
from actsparse.quant.awq import calibration_keys, search_and_fold
from actsparse.quant.config import QuantConfig, config_from_dict
from actsparse.quant.modules import STATE_ATTR, QuantLinear

OWNER = "quantize"
FILE_FORMAT = "actsparse-quantized"
FILE_VERSION = 2  # 2: fp16 scales and mins (version 1 stored fp32 ones)
WEIGHTS_FILE = "model.safetensors"
DESCRIPTION_FILE = "quant.json"


def _targets(model: nn.Module, smap, cfg: QuantConfig) -> dict[str, str]:
    """module path -> layout, for every linear the config quantises."""
    from actsparse.models.sitemaps import LINEAR_ROLES

    out = {}
    for layer in range(smap.num_layers):
        for role in LINEAR_ROLES:
            if role in smap.roles:
                out[smap.module_path(layer, role)] = TRANSPOSED if role in cfg.transposed else ROWS
    if cfg.lm_head:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        path = next((p for p, m in model.named_modules() if m is head), None)
        if path is None:
            raise UnsupportedError("lm_head=True but the model has no output embedding (get_output_embeddings)")
        out[path] = ROWS
    for path in out:
        m = model.get_submodule(path)
        if type(m) is not nn.Linear:
            raise UnsupportedError(f"{path} is a {type(m).__name__}, not a plain nn.Linear; quantise a dense model "
                                   "(desparsify_ / undo accelerate_ first)")
    return out


def quantisable_site_map(model: nn.Module, what: str):
    """The site map of a dense, not yet quantised ``model`` (which linears are block linears), or
    the refusal that names the problem; ``what`` names the caller in the message."""
    from actsparse.models.sitemaps import site_map

    if has(model, OWNER) or STATE_ATTR in model.__dict__:
        raise StateError("the model is already quantised; load the dense model again to quantise it differently")
    smap = site_map(model, warn=False)
    if smap.family == "generic":
        raise UnsupportedError(f"{what} needs an architecture site map (which linears are block linears); "
                               "this model has none: add its family to models/sitemaps.py")
    return smap


def calibration_rows(model: nn.Module, windows, sample_rows: int, smap=None) -> dict:
    """The AWQ inputs: up to ``sample_rows`` token rows at each linear group's input, every layer."""
    from actsparse.models.sitemaps import site_map
    from actsparse.sparsify.calibration import Request, collect

    smap = smap or site_map(model)
    reqs = [Request(key, path, "input", sample_rows=sample_rows) for key, path in calibration_keys(smap)]
    return collect(model, windows, reqs)


def plan_layouts(model: nn.Module, plan) -> tuple[str, ...]:
    """The roles a saved plan reads input-sparsely (its masked linears, and down after a
    thresholded MLP activation): the ones to pack in the transposed layout so that the
    quantised model is stored once in the layouts FastDecoder reads. Refuses a plan made for
    another model (architecture, shapes or weights)."""
    from actsparse.models.loading import weights_identity
    from actsparse.models.sitemaps import LINEAR_ROLES, site_map
    from actsparse.sparsify.plan import check_identity, read_plan

    _config, identity, assignments, _doc = read_plan(plan)
    check_identity(identity, weights_identity(model), f"plan {plan}")
    smap = site_map(model, warn=False)
    role_of = {smap.module_path(layer, r): r for layer in range(smap.num_layers) for r in LINEAR_ROLES
               if r in smap.roles}
    roles = set()
    for a in assignments:
        if a.module == "act":
            roles.add("mlp.down")
        elif a.path in role_of:
            roles.add(role_of[a.path])
        else:
            raise ConfigError(f"plan {plan} masks {a.path}, which is not a block linear of this model")
    return tuple(sorted(roles))


@torch.no_grad()
def quantize_(model: nn.Module, config: QuantConfig, calibration=None, *, plan=None, progress: bool = False) -> dict:
    """Quantise ``model`` in place; returns the description that :func:`save_quantized` writes.
    ``calibration``: token :class:`~actsparse.data.text.Windows` or the dict of rows from
    :func:`calibration_rows` (needed for AWQ only). ``plan``: a saved plan directory; the linears
    it reads input-sparsely are packed in the transposed layout (one copy, in the layout
    FastDecoder reads; load the plan into the quantised model afterwards: with AWQ, load_plan
    divides the thresholds of each scaled linear's input by its scale, so that the plan keeps
    the channels it keeps on the dense model)."""
    from actsparse.models.loading import weights_identity

    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be an Int8Config or Q4Config, got {type(config).__name__}")
    smap = quantisable_site_map(model, "quantize_")
    identity = weights_identity(model)
    if plan is not None:
        roles = plan_layouts(model, plan)
        config = replace(config, transposed=tuple(sorted(set(config.transposed) | set(roles))))
    targets = _targets(model, smap, config)
    records, input_scales = {}, {}
    if config.awq:
        if calibration is None:
            raise DataError("AWQ needs calibration data: pass calibration=windows (token Windows) or the rows of "
                            "calibration_rows(model, windows, sample_rows)")
        rows = calibration if isinstance(calibration, dict) else calibration_rows(model, calibration,
                                                                                  config.sample_rows, smap)
        missing = [k for k, _ in calibration_keys(smap) if k not in rows]
        if missing:
            raise DataError(f"the calibration rows lack {len(missing)} group inputs (e.g. {missing[0]}); "
                            "build them with calibration_rows(model, windows, sample_rows)")
        records = search_and_fold(model, smap, rows, config.fmt, targets, config.alpha_grid, input_scales)
    from tqdm.auto import tqdm

    head = model.get_output_embeddings() if config.lm_head else None
    fmt_of = {p: config.head_fmt if model.get_submodule(p) is head else config.fmt for p in targets}
    for path, layout in tqdm(targets.items(), desc=f"quantise {config.fmt}", unit="linear", disable=not progress):
        q = QuantLinear.from_linear(model.get_submodule(path), fmt_of[path], layout)
        q.set_input_scale(input_scales.get(path))
        swap_module(model, path, q, owner=OWNER)
    desc = {"format": FILE_FORMAT, "version": FILE_VERSION, "config": config.to_dict(), "model": identity,
            "linears": {p: {"format": fmt_of[p], "layout": lay, "shape": [model.get_submodule(p).out_features,
                                                                         model.get_submodule(p).in_features],
                            "input_scale": p in input_scales}
                        for p, lay in targets.items()},
            "awq": records, "layouts_from_plan": None if plan is None else str(plan)}
    object.__setattr__(model, STATE_ATTR, desc)
    return desc


def _unique_state(model: nn.Module) -> tuple[dict, dict]:
    """(name -> tensor with shared storage kept once, alias name -> kept name)."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, aliases


def save_quantized(model: nn.Module, out_dir) -> Path:
    """Write ``model.safetensors`` and ``quant.json`` to ``out_dir``; returns the directory."""
    desc = model.__dict__.get(STATE_ATTR)
    if desc is None:
        raise StateError("the model is not quantised; call quantize_(model, Int8Config() | Q4Config(...)) first")
    from actsparse.version import __version__

    out = Path(out_dir)
    tensors, aliases = _unique_state(model)
    write_safetensors(out / WEIGHTS_FILE, tensors, metadata={"format": FILE_FORMAT, "version": str(FILE_VERSION)})
    write_json(out / DESCRIPTION_FILE, {**desc, "aliases": aliases, "actsparse_version": __version__})
    return out


@torch.no_grad()
def load_quantized(model: nn.Module, in_dir) -> nn.Module:
    """Install the quantised weights of ``in_dir`` into ``model`` (the dense model they were made
    from, e.g. ``asp.load(name).model``), in place; refuses another model or file version."""
    from safetensors.torch import load_file

    from actsparse.models.loading import weights_identity

    d = Path(in_dir)
    if not (d / DESCRIPTION_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise DataError(f"{d} holds no quantised model ({DESCRIPTION_FILE} and {WEIGHTS_FILE}); write one with "
                        "save_quantized or `actsparse quantize`")
    desc = read_json(d / DESCRIPTION_FILE)
    if desc.get("format") != FILE_FORMAT:
        raise DataError(f"{d / DESCRIPTION_FILE} is not an actsparse quantised-model description")
    if desc.get("version") != FILE_VERSION:
        raise DataError(f"{d / DESCRIPTION_FILE} has version {desc.get('version')!r}; this actsparse reads version "
                        f"{FILE_VERSION} (re-quantise with this version)")
    if STATE_ATTR in model.__dict__ or has(model, OWNER):
        raise StateError("the model is already quantised; pass the dense model")
    from actsparse.sparsify.modules import iter_sparse_modules

    if next(iter_sparse_modules(model), None) is not None:
        raise StateError("the model carries a sparsity plan; load the quantised weights into the dense model first, "
                         "then the plan (load_plan checks it against the model the weights were quantised from)")
    ident = weights_identity(model)
    if ident != desc["model"]:
        diff = [k for k in ident if ident.get(k) != desc["model"].get(k)]
        raise DataError(f"{d} was quantised from another model (differs in {', '.join(diff)}): saved "
                        f"{desc['model']}, given {ident}; load the model it was made from")
    config = config_from_dict(desc["config"])
    for path, spec in desc["linears"].items():
        old = model.get_submodule(path)
        out_f, in_f = spec["shape"]
        q = QuantLinear(spec["format"], spec["layout"], out_f, in_f, bias=getattr(old, "bias", None) is not None)
        if spec.get("input_scale"):
            q.set_input_scale(torch.zeros(in_f))  # filled by load_state_dict below
        swap_module(model, path, q, owner=OWNER)
    state = load_file(str(d / WEIGHTS_FILE))
    for alias, kept in desc.get("aliases", {}).items():
        state[alias] = state[kept]
    for path in desc["linears"]:
        for name in ("scales", "mins"):
            t = state.get(f"{path}.{name}")
            if t is not None and t.dtype != SCALE_DTYPE:  # load_state_dict would cast it silently
                raise DataError(f"{d / WEIGHTS_FILE}: {path}.{name} is {t.dtype}, the format stores {SCALE_DTYPE}; "
                                "the file is corrupt or not written by save_quantized")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f"{d / WEIGHTS_FILE} does not fit the model: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}")
    object.__setattr__(model, STATE_ATTR, {k: v for k, v in desc.items() if k not in ("aliases", "actsparse_version")})
    assert config.fmt  # parsed: a bad config in the file raises above
    return model
