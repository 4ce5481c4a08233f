"""Saved sparsity plans: a directory with ``plan.json`` (method, config, actsparse version,
model identity, one entry per sparse module) and ``plan.safetensors`` (per-channel
thresholds, compensation vectors, R-Sparse's low-rank factors). No pickle. Loading is strict and refuses a plan made for another model.

    save_plan(model, "plan/")          # model sparsified with sparsify_
    load_plan(other_model, "plan/")    # same weights layout: installs the same modules
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from actsparse.errors import ConfigError
from actsparse.quant.modules import quant_description

FORMAT = "actsparse.plan/1"
_TOP_KEYS = {"format", "actsparse", "method", "config", "model", "modules", "created", "meta"}
_MODULE_KEYS = {"path", "module", "site_kind", "mode", "threshold", "k", "skips", "width", "target", "centre",
                "offset", "factor_u", "factor_v"}
_VECTORS = ("centre", "offset", "factor_u", "factor_v")  # optional per-module tensors (compensation, low rank)
_REQUIRED_MODULE_KEYS = ("path", "module")


def save_plan(model: nn.Module, path: str | Path, *, meta: dict | None = None) -> Path:
    """Write the plan of a sparsified ``model`` to directory ``path``."""
    from actsparse.sparsify.api import sparsity_state

    state = sparsity_state(model)
    return write_plan(path, state.config, state.identity, state.assignments, meta=meta)


def write_plan(path: str | Path, config, identity: dict, assignments, *, meta: dict | None = None) -> Path:
    """Write a plan from its parts: the method ``config``, the model ``identity``
    (``weights_identity``) and the ``assignments`` (what :func:`save_plan` writes for a
    sparsified model; layer-by-layer calibration has no model in memory to sparsify)."""
    from actsparse.io import write_safetensors, write_text
    from actsparse.version import __version__

    directory = Path(path)
    tensors, modules = {}, []
    for a in assignments:
        thr = a.threshold
        if isinstance(thr, torch.Tensor):
            key = f"{a.path}.threshold"
            tensors[key] = thr.detach().to(torch.float32).cpu().contiguous()
            thr = {"tensor": key}
        entry = {"path": a.path, "module": a.module, "site_kind": a.site_kind, "mode": a.mode,
                 "threshold": thr, "k": a.k, "skips": list(a.skips), "width": a.width, "target": a.target}
        for name in _VECTORS:
            v = getattr(a, name)
            if v is not None:
                key = f"{a.path}.{name}"
                tensors[key] = v.detach().to(torch.float32).cpu().contiguous()
                entry[name] = {"tensor": key}
        modules.append(entry)
    doc = {
        "format": FORMAT, "actsparse": __version__, "method": config.METHOD,
        "config": config.to_dict(), "model": identity, "modules": modules,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "meta": meta or {},
    }
    write_safetensors(directory / "plan.safetensors", tensors, metadata={"format": FORMAT})
    # json.dumps writes floats with repr(): they read back bit-exactly
    write_text(directory / "plan.json", json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return directory


def read_plan(path: str | Path):
    """Read and validate a plan: ``(config, identity, assignments, doc)``."""
    from actsparse.sparsify.registry import Assignment, config_from_dict

    directory = Path(path)
    jf, tf = directory / "plan.json", directory / "plan.safetensors"
    if not jf.is_file():
        raise ConfigError(f"{jf} is missing: {directory} is not a saved plan directory")
    try:
        doc = json.loads(jf.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{jf} is not valid JSON: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{jf} has format {doc.get('format') if isinstance(doc, dict) else None!r}, expected {FORMAT!r}")
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{jf} has unknown key(s): {', '.join(sorted(unknown))}")
    missing = {"config", "model", "modules"} - set(doc)
    if missing:
        raise ConfigError(f"{jf} lacks key(s): {', '.join(sorted(missing))}")
    config = config_from_dict(doc["config"])
    tensors = _read_tensors(tf)
    if not isinstance(doc["modules"], list):
        raise ConfigError(f"{jf}: 'modules' must be a list of module entries")
    assignments = []
    for i, m in enumerate(doc["modules"]):
        if not isinstance(m, dict):
            raise ConfigError(f"{jf}: every module entry must be an object (entry {i} is not)")
        bad = set(m) - _MODULE_KEYS
        if bad:
            raise ConfigError(f"{jf}: module entry {m.get('path')!r} has unknown key(s): {', '.join(sorted(bad))}")
        for key in _REQUIRED_MODULE_KEYS:
            if not isinstance(m.get(key), str) or not m[key]:
                raise ConfigError(f"{jf}: module entry {i} ({m.get('path', 'no path')!r}) lacks the string field "
                                  f"{key!r}; the plan file is damaged: write it again with `actsparse calibrate`")
        thr = m.get("threshold")
        if isinstance(thr, dict):
            key = thr.get("tensor")
            if key not in tensors:
                raise ConfigError(f"{tf} lacks the tensor {key!r} named by {jf}")
            thr = tensors[key]
            if torch.isnan(thr).any():
                raise ConfigError(f"plan threshold {key} holds NaN values")
        elif thr is not None:
            if not isinstance(thr, (int, float)) or isinstance(thr, bool) or math.isnan(float(thr)):
                raise ConfigError(f"plan threshold of {m.get('path')} is not a number: {thr!r}")
            thr = float(thr)
        vectors = {}
        for name in _VECTORS:
            ref = m.get(name)
            if ref is None:
                continue
            key = ref.get("tensor") if isinstance(ref, dict) else None
            if key not in tensors:
                raise ConfigError(f"{tf} lacks the {name} tensor {key!r} named by {jf} for {m['path']}")
            vectors[name] = tensors[key]
        assignments.append(Assignment(m["path"], m["module"], m.get("site_kind", ""), threshold=thr,
                                      mode=m.get("mode", "threshold"), k=m.get("k"), skips=tuple(m.get("skips", ())),
                                      width=m.get("width"), target=m.get("target"), **vectors))
    return config, doc["model"], assignments, doc


def _read_tensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return {}
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"{path} is truncated or corrupt ({err}); write the plan again with "
                          "`actsparse calibrate` (or copy the plan directory again)") from None


def check_identity(expected: dict, actual: dict, where: str = "the plan", *, check_weights: bool = True) -> None:
    """Refuse a plan (or profile) made for another model: another architecture or shapes, or,
    with ``check_weights``, other weight values of the same shapes (older plans carry no
    fingerprint and are matched by shape only)."""
    diffs = [f"{k}: plan {expected.get(k)!r} vs model {actual.get(k)!r}"
             for k in ("class", "model_type", "shape_hash", "num_parameters")
             if k in expected and expected.get(k) != actual.get(k)]
    if diffs:
        raise ConfigError(f"{where} was made for another model ({'; '.join(diffs)})")
    fp, fa = expected.get("weights_fingerprint"), actual.get("weights_fingerprint")
    if check_weights and fp and fa and fp != fa:
        raise ConfigError(
            f"{where} was calibrated on other weights of the same architecture (weights fingerprint "
            f"{fp} vs this model's {fa}): its thresholds would not give the planned sparsity. Calibrate "
            "a plan on this model, or load it anyway with check_weights=False (CLI: --ignore-plan-weights)")


def load_plan(model: nn.Module, path: str | Path, *, check_weights: bool = True) -> None:
    """Apply the plan in ``path`` to ``model`` in place (desparsifying it first if needed).
    ``check_weights=False`` loads a plan made on other weights of the same shapes."""
    from actsparse.models.loading import weights_identity
    from actsparse.sparsify.api import desparsify_, install, is_sparsified

    config, identity, assignments, _doc = read_plan(path)
    if is_sparsified(model):
        desparsify_(model)
    actual = weights_identity(model)
    quant = quant_description(model)
    if quant is None:
        check_identity(identity, actual, f"plan {path}", check_weights=check_weights)
    else:  # a quantised model: the plan must be the dense model's it was quantised from
        check_identity(identity, quant["model"], f"plan {path} (on the model this one was quantised from)",
                       check_weights=check_weights)
        assignments = awq_adjusted(model, assignments, f"plan {path}")
    install(model, config, assignments, identity=actual)


def awq_adjusted(model: nn.Module, assignments, what: str) -> list:
    """The assignments in the input space of an AWQ-quantised model: a linear whose inputs were
    divided by s (``QuantLinear.input_scale``) reads x' = x / s, so a test ``|x - c| > t`` made on
    the dense model becomes ``|x' - c / s| > t / s`` (per channel; s > 0): the same channels kept,
    the same outputs; R-Sparse's ``S V^T`` (rank x in) reads x' with its columns times s. A top-k
    test is not scale-equivariant and is refused."""
    from dataclasses import replace

    out = []
    for a in assignments:
        s = getattr(model.get_submodule(a.path), "input_scale", None) if a.module == "linear" else None
        if s is None:
            out.append(a)
            continue
        if a.mode != "threshold":
            raise ConfigError(f"{what}: {a.path} keeps the top-k of its inputs, which AWQ's per-channel scales "
                              "reorder; load the plan into an RTN-quantised model (no --awq), or calibrate it on the "
                              "AWQ model")
        thr = torch.as_tensor(a.threshold, dtype=torch.float32).to(s.device)
        out.append(replace(a, threshold=thr / s,
                           centre=None if a.centre is None else a.centre.to(s) / s,
                           factor_v=None if a.factor_v is None else a.factor_v.to(s) * s))
    return out
