"""Folded orthogonal rotations (LaRoSA-style) for LLaMA-family models: the rotated model is an
ordinary HF model computing the same function, whose linear inputs are in a PCA basis where
magnitude-based sparsifiers (TEAL, ...) lose less.

    rotation = rotate_(model, calibration=windows)      # in place; returns the Rotation
    save_rotation(model, "rot/"); load_rotation(other_copy_of_the_same_weights, "rot/")

What is folded (no extra matmul at decode):

* every RMSNorm gain into the linears that read its output (q/k/v, gate/up, lm_head), gains
  set to 1; tied embeddings are untied (the embedding and the head get different matrices);
* one global orthogonal ``Q`` of the residual stream (eigenvectors, descending eigenvalue, of
  the uncentred second moment of the RMS-normalised residual pooled over every attention and
  MLP input): ``E <- E Q``, readers ``W <- W Q``, writers (o_proj, down_proj) ``W <- Q^T W``.
  A gain-free RMSNorm commutes with an orthogonal ``Q``;
* per layer and KV head, ``R_g`` from the second moment of that head's value outputs:
  v_proj's rows of head g ``<- R_g^T W``, o_proj's columns of every query head reading g
  ``<- W R_g`` (attention mixes tokens with one scalar per head, so it commutes with R_g).

Not foldable: the down_proj input ``SiLU(gate) * up`` (an elementwise product of two
projections; no rotation passes through it). An explicit rotation there would cost an extra
``intermediate^2`` product per layer (SmolLM2: 1536^2 = 2.36M weights, +67% of the layer's
3.54M block-linear weights), so it is not offered. Per-layer residual rotations (LaRoSA's
own) need SliceGPT-style residual adapters, likewise not foldable.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from actsparse.errors import ConfigError, UnsupportedError

FORMAT = "actsparse-rotation/1"
SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass
class Rotation:
    """``q``: (d, d) residual rotation; ``heads``: (layers, kv_heads, head_dim, head_dim) or
    None; ``source``: weights_identity of the model before rotating; ``calibration``: a
    description of the data the rotations came from."""

    q: torch.Tensor
    heads: torch.Tensor | None
    source: dict
    calibration: dict = field(default_factory=dict)


def _layers(model):
    return model.model.layers


def check_supported(model: nn.Module) -> None:
    """Refuse anything but a LLaMA-style decoder (RMSNorm gain w, no bias on o/down)."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED:
        raise UnsupportedError(f"rotation supports model types {', '.join(SUPPORTED)} (RMSNorm with gain w, "
                               f"pre-norm blocks); got {mt!r}. Gemma's (1+w) norms, LayerNorm models and "
                               "others are not handled: use the model unrotated")
    if not hasattr(model, "lm_head") or not hasattr(getattr(model, "model", None), "layers"):
        raise UnsupportedError(f"rotation needs a causal LM with model.layers and lm_head; got {type(model).__name__}")
    for i, layer in enumerate(_layers(model)):
        for name, lin in (("self_attn.o_proj", layer.self_attn.o_proj), ("mlp.down_proj", layer.mlp.down_proj)):
            if lin.bias is not None:
                raise UnsupportedError(f"rotation: layers.{i}.{name} has a bias (it writes the residual stream and "
                                       "would need rotating too); not supported: use the model unrotated")
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if getattr(norm, "bias", None) is not None or getattr(norm, "weight", None) is None:
                raise UnsupportedError(f"rotation: layers.{i} norm {type(norm).__name__} is not an RMSNorm with a "
                                       "gain and no bias; not supported")
    if getattr(model.lm_head, "bias", None) is not None:
        raise UnsupportedError("rotation: lm_head has a bias; not supported")


def _head_geometry(model) -> tuple[int, int, int]:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, head_dim


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


@torch.no_grad()
def second_moments(model: nn.Module, calibration, *, heads: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(d, d) sum of n(h)^T n(h) over every attention / MLP input's RMS-normalised residual,
    and (layers, kv, hd, hd) sums over each KV head's value outputs; padding excluded."""
    d = model.config.hidden_size
    _, kv, hd = _head_geometry(model)
    layers = _layers(model)
    dev = next(model.parameters()).device
    cov = torch.zeros(d, d, dtype=torch.float64, device=dev)
    vcov = torch.zeros(len(layers), kv, hd, hd, dtype=torch.float64, device=dev) if heads else None
    state = {}

    def norm_hook(norm):
        def hook(_mod, args):
            h = args[0][state["mask"]].double()
            n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _eps(norm))
            cov.add_(n.T @ n)
        return hook

    def v_hook(i):
        def hook(_mod, _args, out):
            v = out[state["mask"]].double().reshape(-1, kv, hd).transpose(0, 1)  # (kv, n, hd)
            vcov[i].add_(v.transpose(1, 2) @ v)
        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                handles.append(norm.register_forward_pre_hook(norm_hook(norm)))
            if heads:
                handles.append(layer.self_attn.v_proj.register_forward_hook(v_hook(i)))
        for ids, mask in zip(calibration.input_ids, calibration.attention_mask):
            state["mask"] = mask[None].bool().to(dev)
            model(input_ids=ids[None].to(dev), attention_mask=mask[None].to(dev))
    finally:
        for h in handles:
            h.remove()
    return cov, vcov


def pca_basis(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric matrix as columns, descending eigenvalue (batched)."""
    _, vecs = torch.linalg.eigh(cov)
    return vecs.flip(-1)


def _set(lin_weight: nn.Parameter, value: torch.Tensor) -> None:
    lin_weight.data.copy_(value.to(lin_weight.dtype))


@torch.no_grad()
def fold_norms_(model: nn.Module) -> None:
    """Fold every RMSNorm gain into the linears reading it and set the gains to 1; untie."""
    if model.lm_head.weight is model.model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.config.tie_word_embeddings = False
    pairs = [(model.model.norm, [model.lm_head])]
    for layer in _layers(model):
        a, m = layer.self_attn, layer.mlp
        pairs += [(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]),
                  (layer.post_attention_layernorm, [m.gate_proj, m.up_proj])]
    for norm, readers in pairs:
        w = norm.weight.double()
        for lin in readers:
            _set(lin.weight, lin.weight.double() * w[None, :])
        norm.weight.data.fill_(1.0)


@torch.no_grad()
def apply_rotation_(model: nn.Module, q: torch.Tensor, heads: torch.Tensor | None) -> None:
    """Fold the norms, then ``q`` into the residual stream and ``heads`` into v/o (in place)."""
    check_supported(model)
    fold_norms_(model)
    q = q.double().to(model.lm_head.weight.device)
    emb = model.model.embed_tokens.weight
    _set(emb, emb.double() @ q)
    _set(model.lm_head.weight, model.lm_head.weight.double() @ q)
    n_heads, kv, hd = _head_geometry(model)
    group = n_heads // kv
    for i, layer in enumerate(_layers(model)):
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            _set(lin.weight, lin.weight.double() @ q)
        for lin in (a.o_proj, m.down_proj):
            _set(lin.weight, q.T @ lin.weight.double())
        if heads is not None:
            _rotate_heads(a, heads[i].double().to(q.device), kv, hd, group)


def _rotate_heads(attn, r: torch.Tensor, kv: int, hd: int, group: int) -> None:
    # v_g' = v_g R_g (row vectors): v rows of head g <- R_g^T W, bias <- b R_g; every query
    # head h of group g (h // group == g, as repeat_kv orders them) reads a_h R_g: o columns <- W R_g
    wv = attn.v_proj.weight.double().reshape(kv, hd, -1)
    _set(attn.v_proj.weight, (r.transpose(1, 2) @ wv).reshape(kv * hd, -1))
    if attn.v_proj.bias is not None:
        bv = attn.v_proj.bias.double().reshape(kv, 1, hd)
        _set(attn.v_proj.bias, (bv @ r).reshape(-1))
    wo = attn.o_proj.weight.double()
    out = wo.shape[0]
    wo = wo.reshape(out, kv, group, hd).permute(1, 2, 0, 3)  # (kv, group, out, hd)
    wo = wo @ r[:, None]
    _set(attn.o_proj.weight, wo.permute(2, 0, 1, 3).reshape(out, kv * group * hd))


def _describe(calibration) -> dict:
    return {"windows": len(calibration), "window": int(calibration.input_ids.shape[1]),
            "tokens": int(calibration.attention_mask.sum()), "sampling": getattr(calibration, "sampling", None)}


def rotate_(model: nn.Module, calibration, *, heads: bool = True, describe: dict | None = None) -> Rotation:
    """Rotate ``model`` in place from ``calibration`` (a Windows); the model's function is
    unchanged. ``heads=False``: the global residual rotation only. ``describe``: extra fields
    for the saved calibration description (e.g. the corpus and split)."""
    from actsparse.models.loading import weights_identity
    from actsparse.sparsify.api import is_sparsified

    check_supported(model)
    if is_sparsified(model):
        raise ConfigError("rotate_ a dense model: desparsify_ it first (thresholds are for the unrotated basis)")
    if getattr(model, "actsparse_rotation", None) is not None:
        raise ConfigError("this model is already rotated")
    source = weights_identity(model)
    cov, vcov = second_moments(model, calibration, heads=heads)
    # fp64 bases, saved as such: load_rotation folds exactly what rotate_ folded
    rot = Rotation(q=pca_basis(cov).cpu(), heads=None if vcov is None else pca_basis(vcov).cpu(),
                   source=source, calibration={**_describe(calibration), **(describe or {})})
    apply_rotation_(model, rot.q, rot.heads)
    model.actsparse_rotation = rot
    return rot


def save_rotation(model_or_rotation, directory) -> Path:
    """``rotation.json`` (format, source weights identity, calibration) and
    ``rotation.safetensors`` (q, heads); no pickle."""
    from actsparse.io import write_json, write_safetensors

    rot = getattr(model_or_rotation, "actsparse_rotation", model_or_rotation)
    if not isinstance(rot, Rotation):
        raise ConfigError("save_rotation: this model was not rotated with rotate_ / load_rotation")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"q": rot.q.contiguous()}
    if rot.heads is not None:
        tensors["heads"] = rot.heads.contiguous()
    write_safetensors(directory / "rotation.safetensors", tensors, metadata={"format": FORMAT})
    write_json(directory / "rotation.json", {"format": FORMAT, "source": rot.source, "calibration": rot.calibration,
                                             "heads": rot.heads is not None})
    return directory


def load_rotation(model: nn.Module, directory) -> Rotation:
    """Re-apply a saved rotation to ``model``, refusing a model whose weights are not those the
    rotation was made from."""
    from safetensors.torch import load_file

    from actsparse.models.loading import weights_identity

    directory = Path(directory)
    for name in ("rotation.json", "rotation.safetensors"):
        if not (directory / name).is_file():
            raise ConfigError(f"{directory}: no {name}; a rotation directory is written by save_rotation")
    meta = json.loads((directory / "rotation.json").read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{directory}: rotation format {meta.get('format')!r}, this version reads {FORMAT!r}")
    check_supported(model)
    if getattr(model, "actsparse_rotation", None) is not None:
        raise ConfigError("this model is already rotated")
    now = weights_identity(model)
    diffs = [k for k in meta["source"] if meta["source"][k] != now.get(k)]
    if diffs:
        raise ConfigError(f"{directory}: the rotation was made for other weights (differs: {', '.join(diffs)}); "
                          "rotate this model with rotate_ instead")
    t = load_file(str(directory / "rotation.safetensors"))
    rot = Rotation(q=t["q"], heads=t.get("heads"), source=meta["source"], calibration=meta["calibration"])
    _check_orthogonal(rot, model, directory)
    apply_rotation_(model, rot.q, rot.heads)
    model.actsparse_rotation = rot
    return rot


def _check_orthogonal(rot: Rotation, model: nn.Module, directory) -> None:
    """Refuse saved matrices of the wrong shape or that are not orthogonal (a damaged file):
    folding them would change the model's function silently."""
    d = model.config.hidden_size
    _, kv, hd = _head_geometry(model)
    expect = {"q": ((d, d), rot.q)}
    if rot.heads is not None:
        expect["heads"] = ((len(_layers(model)), kv, hd, hd), rot.heads)
    for name, (shape, t) in expect.items():
        if tuple(t.shape) != shape:
            raise ConfigError(f"{directory}: rotation {name} has shape {tuple(t.shape)}, this model needs {shape}")
        t = t.double()
        err = (t.transpose(-1, -2) @ t - torch.eye(shape[-1], dtype=torch.float64)).abs().max()
        if not bool(err < 1e-6):
            raise ConfigError(f"{directory}: rotation {name} is not orthogonal (max |R^T R - I| = {float(err):.2g}); "
                              "the file is damaged: rotate the model again with rotate_")
