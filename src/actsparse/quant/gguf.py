"""Load a GGUF file's quantised tensors (Q8_0, Q4_0, Q4_1) straight into int8 / q4 QuantLinears.

    model, tok = asp.load("smollm2-135m")                      # the dense model of that file
    load_gguf_quantized_(model, embedded_gguf("smollm2-135m"))  # its 210 Q4_1 linears, as q4
    save_quantized(model, "q4/")

The three GGUF types store blocks of 32 along the input dimension (GGUF's ne0), which is
actsparse's ``rows`` layout, so the conversion is lossless: the fp16 scales / mins are kept as
they are, Q8_0 (``w = d * q``) becomes int8, Q4_1 (``w = d * q + m``) q4, Q4_0 (``w = d * (q - 8)``)
q4 with ``min = -8 d`` (exact in fp16: a power-of-two multiple). The nibble order
of Q4_0 / Q4_1 is q4's. llama.cpp's converter permutes the rows of LLaMA q / k projections
(pairs of rotary dimensions interleaved per head); the same row permutation, undone, moves
whole rows of codes, scales and mins.

Tensors are read through :class:`gguf.GGUFReader`'s memory map one at a time (never the whole
model in fp32). A linear that a plan reads input-sparsely needs the transposed layout (blocks
along the output), which the file does not have: it is requantised transposed (RTN) from the
file's dequantised values, one tensor at a time, with a warning, because that re-rounds (on
SmolLM2, down transposed costs +7.6% perplexity; see README).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from actsparse.errors import DataError, ModelNotFoundError, UnsupportedError
from actsparse.kernels.quant_formats import BLOCK, INT8, Q4, ROWS, TRANSPOSED, QuantWeight, quantize_weight

log = logging.getLogger(__name__)

# GGUF type name -> (actsparse format, bytes per block of 32)
LOADABLE = {"Q8_0": (INT8, 2 + BLOCK), "Q4_0": (Q4, 2 + BLOCK // 2), "Q4_1": (Q4, 4 + BLOCK // 2)}
# a weight whose file values are further than this (relative Frobenius error) from the dense
# model's is not a quantisation of it (4-bit rounding is ~0.1; other weights ~1.4)
MAX_RELATIVE_ERROR = 0.3
CHECK_ROWS = 64
# GGUF architectures whose converter permutes the q / k rows (transformers undoes it for these)
PERMUTED_QK_ARCHS = ("llama",)
# GGUF architecture -> transformers model types it loads as, where the names differ
ARCH_MODEL_TYPES = {"llama": ("llama", "mistral"), "gemma3": ("gemma3", "gemma3_text")}


def gguf_to_quant_weight(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> QuantWeight:
    """The rows-layout QuantWeight of one GGUF tensor: ``raw`` its bytes (out rows x
    bytes per row, e.g. ``ReaderTensor.data``), ``shape`` the logical (out, in)."""
    if type_name not in LOADABLE:
        raise UnsupportedError(f"GGUF type {type_name} is not loadable; loadable: {', '.join(LOADABLE)}")
    fmt, block_bytes = LOADABLE[type_name]
    out_f, in_f = shape
    if in_f % BLOCK:
        raise UnsupportedError(f"a {type_name} tensor of shape {shape}: in_features is not a multiple of {BLOCK}")
    nb = in_f // BLOCK
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(out_f, nb, block_bytes)

    def half(lo):  # an fp16 field of every block (the formats store fp16 too)
        return torch.from_numpy(np.ascontiguousarray(blocks[..., lo:lo + 2]).view(np.float16)[..., 0].copy())

    scales = half(0)
    if type_name == "Q8_0":
        codes = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(out_f, in_f))
        return QuantWeight(INT8, ROWS, (out_f, in_f), codes, scales)
    if type_name == "Q4_1":
        mins, start = half(2), 4
    else:  # Q4_0: d * (q - 8) = q * d + (-8 d)
        mins, start = (-8.0 * scales.float()).to(torch.float16), 2
        if not bool(torch.isfinite(mins).all()):
            raise UnsupportedError(f"a Q4_0 tensor of shape {shape} has a block scale whose min -8 d overflows fp16")
    codes = torch.from_numpy(np.ascontiguousarray(blocks[..., start:]).reshape(out_f, in_f // 2))
    return QuantWeight(Q4, ROWS, (out_f, in_f), codes, scales, mins)


def unpermute_qk_rows(out_features: int, n_head: int) -> torch.Tensor:
    """Row order undoing llama.cpp's q / k permutation: HF row i is GGUF row ``order[i]``.
    Per head, GGUF stores the rotary halves interleaved (row 2d + a holds HF row a * half + d)."""
    if out_features % (2 * n_head):
        raise UnsupportedError(f"a q/k projection of {out_features} rows does not split into {n_head} heads of "
                               "two rotary halves")
    half = out_features // n_head // 2
    h, a, d = torch.meshgrid(torch.arange(n_head), torch.arange(2), torch.arange(half), indexing="ij")
    return (h * 2 * half + d * 2 + a).reshape(-1)


def _take_rows(qw: QuantWeight, order: torch.Tensor) -> QuantWeight:
    """The rows ``order`` of a rows-layout weight (a permutation, or a sample)."""
    return replace(qw, shape=(int(order.numel()), qw.shape[1]), codes=qw.codes[order].contiguous(),
                   scales=qw.scales[order].contiguous(), mins=None if qw.mins is None else qw.mins[order].contiguous())


def _relative_error(qw: QuantWeight, dense: torch.Tensor) -> float:
    """||file - dense|| / ||dense|| on up to CHECK_ROWS evenly spaced rows (enough to tell another
    model's weights, or a wrong row order, from a quantisation of these)."""
    idx = torch.linspace(0, qw.shape[0] - 1, min(CHECK_ROWS, qw.shape[0])).round().long().unique()
    w = _take_rows(qw, idx).dequantize()
    d = dense[idx].detach().to(torch.float32)
    return float((w - d).norm() / d.norm().clamp_min(1e-30))


# ---------------------------------------------------------------- the file
def _open(path: Path):
    """One GGUFReader over ``path`` (a memory map), after the checks asp.load makes: the GGUF
    magic, a readable header, and tensors that end inside the file."""
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelNotFoundError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as err:
        raise ModelNotFoundError(f"{path} is truncated or corrupt: its GGUF header or tensor table cannot be read "
                                 f"({type(err).__name__}: {err}); download or copy the file again") from None
    if end > path.stat().st_size:
        raise ModelNotFoundError(f"{path} is truncated: its tensors need {end} bytes, the file has "
                                 f"{path.stat().st_size}; download or copy the file again")
    return reader


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _source_file(model: nn.Module) -> Path | None:
    """The GGUF file ``asp.load`` converted ``model`` from, when its name says so."""
    from actsparse.models.loading import EMBEDDED, embedded_gguf

    name = getattr(model, "actsparse_name", None)
    if not isinstance(name, str):
        return None
    if name in EMBEDDED:
        return embedded_gguf(name)
    return Path(os.path.expanduser(name)) if name.endswith(".gguf") else None


def _check_model(model: nn.Module, reader, path: Path, smap) -> str:
    """Refuse a file that is not this model's; returns the file's architecture."""
    source = _source_file(model)
    if source is not None and source.is_file() and not os.path.samefile(source, path):
        raise DataError(f"the model was converted from {source}, not from {path}; load the dense model of this file "
                        f"first (asp.load({str(path)!r}) / --model {path})")
    arch = _field(reader, "general.architecture")
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ARCH_MODEL_TYPES.get(arch, (arch,)):
        raise DataError(f"{path} holds a {arch!r} model, the model is {model_type!r}; load the dense model of this "
                        f"file (asp.load({str(path)!r}))")
    checks = {"block_count": smap.num_layers, "embedding_length": getattr(cfg, "hidden_size", None),
              "attention.head_count": getattr(cfg, "num_attention_heads", None),
              "attention.head_count_kv": getattr(cfg, "num_key_value_heads", None)}
    diff = []
    for key, want in checks.items():
        have = _field(reader, f"{arch}.{key}")
        if have is not None and want is not None and int(have) != int(want):
            diff.append(f"{key}: file {int(have)}, model {int(want)}")
    if diff:
        raise DataError(f"{path} is another model than the one given ({'; '.join(diff)}); load the dense model of "
                        f"this file (asp.load({str(path)!r}))")
    return arch


def _gguf_names(reader, arch: str, targets: dict, n_layers: int) -> dict[str, str]:
    """module path -> GGUF tensor name, for every target (the tied LM head reads token_embd)."""
    import gguf

    arch_enum = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), None)
    if arch_enum is None:
        raise UnsupportedError(f"the gguf package does not know the architecture {arch!r}")
    names = gguf.get_tensor_name_map(arch_enum, n_layers)
    in_file = {t.name for t in reader.tensors}
    out = {}
    for path in targets:
        base = names.get_name(path, try_suffixes=(".weight",))
        name = None if base is None else f"{base}.weight"
        if name == "output.weight" and name not in in_file:
            name = "token_embd.weight"  # tied embedding and head
        if name not in in_file:
            raise DataError(f"the GGUF file has no tensor for {path} (looked for {name}); it is not this model's file")
        out[path] = name
    return out


def _check_types(tensors: dict, block_paths: list[str]) -> str:
    """The one actsparse format of the block linears, or a refusal naming the types."""
    found = Counter(tensors[p].tensor_type.name for p in block_paths)
    bad = sorted(t for t in found if t not in LOADABLE)
    if bad:
        raise UnsupportedError(
            f"the block linears of this GGUF file are {', '.join(f'{n} x {t}' for t, n in sorted(found.items()))}; "
            f"{', '.join(bad)} cannot be loaded as actsparse weights (loadable: {', '.join(LOADABLE)}). Load the "
            "dense model (asp.load) and quantise it with quantize_ / `actsparse quantize --format`, or requantise "
            "the file with llama.cpp to Q8_0, Q4_0 or Q4_1")
    fmts = {LOADABLE[t][0] for t in found}
    if len(fmts) > 1:
        raise UnsupportedError(
            f"the block linears of this GGUF file mix {', '.join(f'{n} x {t}' for t, n in sorted(found.items()))}, "
            "i.e. the int8 and q4 formats; FastDecoder decodes all block linears in one format, so load a file "
            "whose block linears are all Q8_0 (int8) or all Q4_0 / Q4_1 (q4)")
    return fmts.pop()


# ---------------------------------------------------------------- the entry point
@torch.no_grad()
def load_gguf_quantized_(model: nn.Module, gguf_path, *, lm_head: bool = False, plan=None,
                         transposed: tuple[str, ...] = (), progress: bool = False) -> dict:
    """Replace every block linear of ``model`` (the dense model ``asp.load`` gives for the same
    file) with a QuantLinear holding the file's own codes / scales / mins; in place. Returns the
    description :func:`~actsparse.quant.save_quantized` writes. ``lm_head``: load the output
    head too, in its own format (SmolLM2's Q8_0 head as int8 beside q4 block linears). ``plan`` / ``transposed``:
    the linears read input-sparsely are requantised transposed from the file's values (lossy,
    logged). Refuses another model's file, unsupported GGUF types and mixed formats."""
    from actsparse.models.loading import weights_identity
    from actsparse.models.sitemaps import LINEAR_ROLES
    from actsparse.models.swap import swap_module
    from actsparse.quant.api import FILE_FORMAT, FILE_VERSION, OWNER, _targets, plan_layouts, quantisable_site_map
    from actsparse.quant.config import CONFIGS
    from actsparse.quant.modules import STATE_ATTR, QuantLinear

    path = Path(os.path.expanduser(str(gguf_path)))
    smap = quantisable_site_map(model, "loading GGUF tensors")
    reader = _open(path)
    arch = _check_model(model, reader, path, smap)
    roles = set(transposed)
    if plan is not None:
        roles |= set(plan_layouts(model, plan))
    # the format is the file's: targets with a provisional config, then the real one
    probe = CONFIGS[Q4](lm_head=lm_head, transposed=tuple(sorted(roles)))
    targets = _targets(model, smap, probe)
    names = _gguf_names(reader, arch, targets, smap.num_layers)
    tensors = {t.name: t for t in reader.tensors}
    by_path = {p: tensors[n] for p, n in names.items()}
    head_path = None
    if lm_head:
        head = model.get_output_embeddings()
        head_path = next(p for p, m in model.named_modules() if m is head)
    block_paths = [p for p in targets if p != head_path]
    fmt = _check_types(by_path, block_paths)
    head_fmt = None
    if head_path is not None:
        t = by_path[head_path].tensor_type.name
        if t not in LOADABLE:
            raise UnsupportedError(f"lm_head=True but the file's LM head ({names[head_path]}) is {t}; loadable: "
                                   f"{', '.join(LOADABLE)}. Leave lm_head=False (the head stays the dense weight "
                                   "dequantised from the file)")
        head_fmt = LOADABLE[t][0]
    config = CONFIGS[fmt](lm_head=lm_head, head_format=head_fmt if head_fmt != fmt else None,
                          transposed=probe.transposed)
    identity = weights_identity(model)
    permute = arch in PERMUTED_QK_ARCHS
    cfg = model.config
    role_of = {smap.module_path(i, r): r for i in range(smap.num_layers) for r in LINEAR_ROLES if r in smap.roles}
    from tqdm.auto import tqdm

    built, requantised = {}, []
    for p, layout in tqdm(targets.items(), desc=f"load {fmt} from GGUF", unit="linear", disable=not progress):
        old = model.get_submodule(p)
        t = by_path[p]
        shape = (old.out_features, old.in_features)
        if tuple(int(x) for x in t.shape[::-1]) != shape:
            raise DataError(f"{names[p]} in {path} has shape {tuple(int(x) for x in t.shape[::-1])} (out, in), "
                            f"{p} has {shape}; the file is not this model's")
        qw = gguf_to_quant_weight(t.tensor_type.name, t.data, shape)
        if permute and role_of.get(p) in ("attn.q", "attn.k"):
            n = cfg.num_attention_heads if role_of[p] == "attn.q" else (cfg.num_key_value_heads
                                                                        or cfg.num_attention_heads)
            qw = _take_rows(qw, unpermute_qk_rows(shape[0], n))
        err = _relative_error(qw, old.weight)
        if not err <= MAX_RELATIVE_ERROR:
            raise DataError(f"{names[p]} in {path} is not a quantisation of {p} (relative error {err:.3g} > "
                            f"{MAX_RELATIVE_ERROR}): the file is not this model's; load the dense model of this "
                            f"file (asp.load({str(path)!r}))")
        if layout == TRANSPOSED:
            qw = quantize_weight(qw.dequantize(), qw.fmt, TRANSPOSED)  # other blocks: a re-rounding of the file's values
            requantised.append(p)
        q = QuantLinear(qw.fmt, layout, *shape, bias=old.bias is not None)
        q.codes, q.scales = qw.codes, qw.scales
        if qw.mins is not None:
            q.mins = qw.mins
        if old.bias is not None:
            q.bias.data = old.bias.detach().to(torch.float32).clone()
        built[p] = q
    if requantised:
        log.warning("%d linears are read input-sparsely and need the transposed layout, which the GGUF file does "
                    "not have: requantised them transposed (RTN, %s) from the file's values, which re-rounds them "
                    "(lossy; the rows-layout linears are the file's own codes)", len(requantised), fmt)
    for p, q in built.items():  # swap only once every tensor converted and checked
        swap_module(model, p, q, owner=OWNER)
    desc = {"format": FILE_FORMAT, "version": FILE_VERSION, "config": config.to_dict(), "model": identity,
            "linears": {p: {"format": built[p].fmt, "layout": lay,
                            "shape": [built[p].out_features, built[p].in_features]}
                        for p, lay in targets.items()},
            "awq": {}, "layouts_from_plan": None if plan is None else str(plan),
            "gguf": {"file": str(path), "types": dict(Counter(by_path[p].tensor_type.name for p in targets)),
                     "requantised_transposed": requantised}}
    object.__setattr__(model, STATE_ATTR, desc)
    return desc
