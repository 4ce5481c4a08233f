"""Calibration of models larger than memory: one decoder layer in memory at a time.

:func:`calibrate_layerwise` builds the model's skeleton on the ``meta`` device (no weight
memory), memory-maps its safetensors files, and then

1. turns every calibration batch into hidden states, reading the embedding table a block of
   rows at a time (the rows the windows' tokens use);
2. for each decoder layer: reads that layer's weights from the safetensors files (the file
   is opened for this layer only, so its mapped pages are released with it), runs every
   batch's hidden states through the layer with the capture probes of the requests in that
   layer attached, keeps the layer's outputs as the next layer's inputs, and frees the layer.

What stays in memory between layers: the hidden states of all calibration windows
(tokens x hidden x dtype bytes), the statistics, and the per-batch attention mask and rotary
embeddings. At most one layer's weights are resident, plus, while one tensor is being read,
that tensor's mapped file pages (the file is opened per tensor): under two layers plus the
activations at the peak.

Two-pass requests (a ``scale_from`` statistic, CHESS's E|u_i|) are exact without a second
sweep: the statistic they read lives in the same (or an earlier) layer, so once a layer's
first-pass statistics are complete its second-pass probes run the same hidden states
through the same layer again, before it is freed. The plan equals the in-memory plan: the
same batches go through the same modules in the same order (``tests/sparsify/test_layerwise.py``).

Supported: the LLaMA family's decoder (LLaMA, Mistral, Qwen2, SmolLM: ``model.layers``,
``model.rotary_emb``, one causal mask for every layer). Requests outside the decoder layers
(the final norm, the LM head) are refused: no calibration method asks for them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from actsparse.errors import ConfigError, ModelNotFoundError, UnsupportedError
from actsparse.measure.capture import capture
from actsparse.sparsify import calibration as calib
from actsparse.sparsify.targets import Target

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class SafetensorsWeights:
    """Which safetensors file of a model directory holds each tensor (a sharded model's index,
    or the keys of each file); tensors are read on demand, memory-mapped."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.directory / f for k, f in weight_map.items()}
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise ModelNotFoundError(f"{self.directory} holds no *.safetensors weights (layer-by-layer "
                                         "calibration reads safetensors only)")
            self.files = {}
            for f in files:
                with safe_open(str(f), framework="pt") as fh:
                    self.files.update({k: f for k in fh.keys()})

    def load(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix``, keyed by the rest of its name. The
        file is mapped for one tensor at a time, so its touched pages never add up to more
        than the tensor being copied."""
        from safetensors import safe_open

        out = {}
        for k in [k for k in self.files if k.startswith(prefix)]:
            with safe_open(str(self.files[k]), framework="pt") as fh:
                out[k[len(prefix):]] = fh.get_tensor(k).to(dtype)
        return out

    def embed(self, name: str, ids: torch.Tensor, dtype: torch.dtype, rows_per_read: int = 4096) -> torch.Tensor:
        """``embedding[ids]`` read ``rows_per_read`` rows at a time (the table is never whole in
        memory): the values ``nn.Embedding`` would return."""
        from safetensors import safe_open

        if name not in self.files:
            raise ModelNotFoundError(f"the safetensors files of {self.directory} lack {name!r}")
        out = None
        with safe_open(str(self.files[name]), framework="pt") as fh:
            n_rows = fh.get_slice(name).get_shape()[0]
        for lo in range(0, n_rows, rows_per_read):
            hit = (ids >= lo) & (ids < lo + rows_per_read)
            if not bool(hit.any()):
                continue
            with safe_open(str(self.files[name]), framework="pt") as fh:
                rows = fh.get_slice(name)[lo:lo + rows_per_read].to(dtype)
            if out is None:
                out = torch.empty(tuple(ids.shape) + (rows.shape[1],), dtype=dtype)
            out[hit] = rows[ids[hit] - lo]
            del rows
        if int(ids.min()) < 0 or int(ids.max()) >= n_rows:
            raise ConfigError(f"token ids reach {int(ids.max())}, beyond the embedding's {n_rows} rows")
        return out


def skeleton(directory: Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``directory``'s config on the meta device: structure, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory))
    if getattr(config, "model_type", None) not in SUPPORTED_TYPES:
        raise UnsupportedError(
            f"layer-by-layer calibration supports the LLaMA family ({', '.join(SUPPORTED_TYPES)}); "
            f"{directory} is a {getattr(config, 'model_type', None)!r} model. Calibrate it in memory "
            "(actsparse calibrate without --layerwise)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _materialise(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    missing = set(module.state_dict()) - set(tensors)
    if missing:
        raise ModelNotFoundError(f"the safetensors files lack {len(missing)} tensor(s) of {what}, e.g. "
                                 f"{sorted(missing)[0]!r}: the weights do not match the config")
    module.load_state_dict(tensors, strict=False, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise ModelNotFoundError(f"{what} still has no values for {left[0]!r} after loading its weights")


def _free(module: nn.Module) -> None:
    module.to("meta")  # drops the real storage (nothing else refers to it)


def _layer_of(path: str, prefix: str) -> int | None:
    m = re.match(re.escape(prefix) + r"(\d+)(\.|$)", path)
    return int(m.group(1)) if m else None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024


def fixed_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold at its default (128 KiB), so that every large block is mapped
    and returned to the system when freed.

    glibc raises the threshold to the size of each freed mapped block (up to 32 MiB); after the
    first layer is freed, the next layer's tensors and activations come from the heap, whose
    freed space is not returned. Measured here on the 1.1B LLaMA shape: the resident set then grew
    by about 50 MiB per layer (1.34 GiB above imports after 22 layers), against 0.38 GiB with the
    threshold pinned. Process-wide and harmless for the rest (the same as setting
    ``MALLOC_MMAP_THRESHOLD_`` in the environment). Returns False where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except OSError:
        return False


@torch.no_grad()
def calibrate_layerwise(model: str | Path, configs, calibration, *, batch_size: int = 4, dtype: str = "float32",
                        progress: bool = False) -> dict:
    """The calibration statistics ``configs`` need, computed one decoder layer at a time from the
    safetensors of ``model`` (an embedded name, a ``.gguf`` file or a local model directory): the
    same dict :func:`~actsparse.sparsify.api.calibrate` returns for the in-memory model. Peak
    memory: about two layers' weights plus the hidden states of the calibration windows."""
    from tqdm.auto import tqdm
    from transformers.masking_utils import create_causal_mask

    from actsparse.models.loading import weights_directory
    from actsparse.sparsify.api import required_stats

    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    torch_dtype = _DTYPES[dtype]
    fixed_mmap_threshold()
    directory = weights_directory(str(model))
    weights = SafetensorsWeights(directory)
    lm = skeleton(directory, torch_dtype)
    base = lm.model
    layers_prefix = "model.layers."
    n_layers = len(base.layers)
    requests = required_stats(lm, configs)  # on the skeleton: paths and kinds (scales come per layer)
    _refuse_sequences(requests)
    outside = [r.key for r in requests if _layer_of(r.module_path, layers_prefix) is None]
    if outside:
        raise UnsupportedError(f"layer-by-layer calibration reads decoder layers only; {outside[0]} is outside them")
    for r in requests:
        if r.scale_from is not None:
            src = next((q for q in requests if q.key == r.scale_from), None)
            if src is None or _layer_of(src.module_path, layers_prefix) > _layer_of(r.module_path, layers_prefix):
                raise UnsupportedError(f"{r.key} reads {r.scale_from}, which is not computed in its layer or an "
                                       "earlier one")

    # hidden states of every batch after the embedding (the embedding is freed again)
    batches = list(calibration.batches(batch_size))
    hidden = [weights.embed("model.embed_tokens.weight", b["input_ids"], torch_dtype) for b in batches]
    rotary = type(base.rotary_emb)(config=lm.config)  # its buffers are computed, not stored
    context = []
    for b, h in zip(batches, hidden):
        position_ids = torch.arange(h.shape[1]).unsqueeze(0)
        mask = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=b["attention_mask"],
                                  cache=None, position_ids=position_ids)
        context.append((mask, rotary(h, position_ids=position_ids), position_ids))

    out: dict = {}
    for i in tqdm(range(n_layers), desc="calibrate (layer by layer)", unit="layer", disable=not progress):
        layer = base.layers[i]
        _materialise(layer, weights.load(f"{layers_prefix}{i}.", torch_dtype), f"decoder layer {i}")
        mine = [r for r in required_stats(lm, configs) if _layer_of(r.module_path, layers_prefix) == i]
        phases = [[r for r in mine if r.scale_from is None], [r for r in mine if r.scale_from is not None]]
        nxt = None
        for phase_no, phase in enumerate(phases):
            if not phase and phase_no:
                continue
            probes = calib.probes_for(phase, out)
            results = []
            with capture(lm, probes=probes, total_tokens=calibration.tokens) if probes else _nothing() as cap:
                for b, h, (mask, pos_emb, position_ids) in zip(batches, hidden, context):
                    if cap is not None:
                        cap.set_mask(b["attention_mask"])
                    y = layer(h, attention_mask=mask, position_embeddings=pos_emb, position_ids=position_ids,
                              cache=None, use_cache=False)
                    if phase_no == 0:
                        results.append(y[0] if isinstance(y, tuple) else y)
            if cap is not None:
                out.update(cap.stats())
            if phase_no == 0:
                nxt = results
        hidden = nxt
        _free(layer)
    calib.check_enough(out, requests)
    order = [r for r in requests if r.scale_from is None] + [r for r in requests if r.scale_from is not None]
    return {r.key: out[r.key] for r in order if r.key in out}  # the in-memory order


def _refuse_sequences(requests) -> None:
    seq = next((r for r in requests if r.sample_sequences), None)
    if seq is not None:
        raise UnsupportedError(f"layer-by-layer calibration cannot give {seq.key}: TEAL's block-output greedy "
                               "error re-runs decoder layers on the whole model's hidden states. Use "
                               "TEAL(allocation='greedy', greedy_error='linear') with it, or calibrate in memory")


class _LayerTarget(Target):
    """A :class:`~actsparse.sparsify.targets.Target` whose ``layers`` is one layer at a time."""

    only: range = range(0)

    @property
    def layers(self) -> range:
        return self.only


@torch.no_grad()
def assign_layerwise(model: str | Path, config, stats: dict, *, dtype: str = "float32") -> list:
    """The sparse modules ``config`` assigns from ``stats`` (see :func:`calibrate_layerwise`),
    with one decoder layer's weights in memory at a time (WINA, CETT and TEAL's greedy
    allocation read the weights to set thresholds): what ``plan_assignments`` returns for the
    in-memory model."""
    from actsparse.models.loading import weights_directory
    from actsparse.sparsify.registry import handler_for

    directory = weights_directory(str(model))
    weights = SafetensorsWeights(directory)
    lm = skeleton(directory, _DTYPES[dtype])
    handler = handler_for(config)
    target = _LayerTarget(lm, config)
    _refuse_sequences(handler.requests(target))  # and the method's own refusals (a model it cannot apply to)
    out = []
    for i in range(len(lm.model.layers)):
        layer = lm.model.layers[i]
        _materialise(layer, weights.load(f"model.layers.{i}.", _DTYPES[dtype]), f"decoder layer {i}")
        target.only = range(i, i + 1)
        calib.check_enough(stats, [r for r in handler.requests(target)])
        for a in handler.assign(target, stats):
            if isinstance(a.threshold, torch.Tensor):
                a.threshold = a.threshold.detach().clone()
            out.append(a)
        _free(layer)
    target.check_overrides()
    return out


@torch.no_grad()
def identity_layerwise(model: str | Path, *, dtype: str = "float32") -> dict:
    """``weights_identity`` of the model in ``model``'s safetensors, one tensor in memory at a time."""
    import hashlib

    from actsparse.models.loading import FINGERPRINT_SAMPLES, weights_directory

    directory = weights_directory(str(model))
    weights = SafetensorsWeights(directory)
    lm = skeleton(directory, _DTYPES[dtype])
    shapes = hashlib.sha256()
    for name, p in lm.state_dict().items():
        shapes.update(f"{name}:{tuple(p.shape)};".encode())
    finger = hashlib.sha256()
    for name, p in lm.named_parameters():
        if p.numel() == 0:
            continue
        t = weights.load(name, _DTYPES[dtype]).get("")
        if t is None:
            raise ModelNotFoundError(f"the safetensors files of {directory} lack {name!r}")
        flat = t.reshape(-1)
        n = min(FINGERPRINT_SAMPLES, flat.numel())
        idx = torch.linspace(0, flat.numel() - 1, n, dtype=torch.float64).round().long()
        finger.update(name.encode() + flat[idx].to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        del t, flat
    return {"class": type(lm).__name__, "model_type": getattr(lm.config, "model_type", None),
            "shape_hash": shapes.hexdigest()[:16], "num_parameters": sum(p.numel() for p in lm.parameters()),
            "weights_fingerprint": finger.hexdigest()[:16]}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None
