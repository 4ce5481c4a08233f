"""llama.cpp (``llama-cpp-python``, an optional install) as a baseline engine of the decode benchmark.

The same weights as actsparse's: the embedded model's own GGUF file, requantised by llama.cpp
itself (``llama_model_quantize`` with ``allow_requantize``) to F32 or BF16, the precision the
other engines run (actsparse dequantises the same file to fp32, and rounds to bf16 the same
way, to nearest even). Written once into the cache. Greedy decoding of the same prompt token
ids for the same number of new tokens; decode tokens/s from llama.cpp's own performance
counters (the tokens evaluated after the prompt, over their evaluation time).

With ``--weights int8`` / ``q4`` the same source file is requantised by llama.cpp to Q8_0 / Q4_0
(its own formats and its own recipe: with a Q4_0 ftype llama.cpp stores the output matrix, or
the tied embedding that serves as it, as Q6_K; :func:`gguf_bytes_per_token` reads what each
tensor really is from the file). The random-weight LLaMA shapes get a GGUF written from their own
tensors first (:mod:`actsparse.bench.llama_gguf`) and are requantised the same way.
"""
from __future__ import annotations

import os
from pathlib import Path

from actsparse.errors import ConfigError

# the format -> (llama_ftype, file tag): the float dtypes of the benchmark, and llama.cpp's formats
# closest to actsparse's int8 (Q8_0: int8 codes, one fp16 scale per block of 32) and q4 (Q4_0:
# 4-bit codes, one fp16 scale per block of 32, no min; actsparse's q4 is Q4_1-like, scale and min)
FTYPES = {"float32": ("LLAMA_FTYPE_ALL_F32", "F32"), "bfloat16": ("LLAMA_FTYPE_MOSTLY_BF16", "BF16"),
          "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0"), "q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_0")}
FOR_WEIGHTS = {"int8": "q8_0", "q4": "q4_0"}  # actsparse --weights format -> llama.cpp format
BLOCK_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
BUILD_HINT = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON '
              '-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF '
              '-DGGML_AMX_BF16=OFF" pip install llama-cpp-python==0.3.36')


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def requantised(name: str, dtype: str, source: Path | None = None) -> Path:
    """The embedded model ``name``'s GGUF (or ``source``, e.g. a random shape's F32 GGUF) in
    ``dtype`` (a key of FTYPES), made once into the cache by ``llama_model_quantize``."""
    from actsparse.models.loading import embedded_gguf

    if dtype not in FTYPES:
        raise ConfigError(f"llama.cpp baseline formats: {', '.join(FTYPES)}, not {dtype!r}")
    if source is None:
        source = embedded_gguf(name)
    if source is None:
        raise ConfigError(f"{name!r} has no GGUF file for llama.cpp; the baseline runs the embedded causal LMs "
                          "and the random LLaMA shapes")
    return quantise(source, dtype)


def quantise(source: Path, dtype: str) -> Path:
    """``source`` requantised by llama.cpp to ``dtype``, cached as ``<cache>/gguf/<stem>.<TAG>.gguf``
    (written to a hidden temporary name, then renamed: a killed run leaves no half file)."""
    import llama_cpp

    from actsparse.cache import cache_dir

    ftype, tag = FTYPES[dtype]
    if source.stem.endswith(f".{tag}"):  # already in that format (a random shape's F32 source)
        return source
    target = cache_dir() / "gguf" / f"{source.stem.removesuffix('.F32')}.{tag}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.allow_requantize = True
    try:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({source} -> {tag}) failed with code {rc}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def gguf_bytes_per_token(path: Path) -> dict:
    """The weight bytes llama.cpp reads per decoded token, from the file's own tensor sizes.

    Counted as actsparse counts its engines (``bytes_per_token``: block linears + lm_head):
    ``block_linears``, every ``blk.<i>.{attn_q,k,v,output, ffn_gate,up,down}`` tensor in full;
    ``lm_head``, ``output.weight`` in full, or, when the model has none (a tied embedding),
    ``token_embd.weight`` in full, since llama.cpp then multiplies by it as the output matrix
    (it is counted once, as the head). Listed beside but not in ``total``: ``embedding_row`` (the
    one row of ``token_embd`` looked up per token) and ``norms`` (the 1-D gains)."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    blocks = [t for n, t in tensors.items() if n.startswith("blk.") and n.split(".")[2] in BLOCK_LINEARS]
    embd = tensors["token_embd.weight"]
    tied = "output.weight" not in tensors
    head = embd if tied else tensors["output.weight"]
    types: dict[str, int] = {}
    for t in blocks + [head]:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_bytes)
    block_b, head_b = sum(int(t.n_bytes) for t in blocks), int(head.n_bytes)
    return {"total": float(block_b + head_b), "block_linears": float(block_b), "lm_head": float(head_b),
            "tied_embedding": tied, "lm_head_type": head.tensor_type.name,
            "block_linear_types": sorted({t.tensor_type.name for t in blocks}), "bytes_by_type": types,
            "embedding_row": float(embd.n_bytes) / int(embd.shape[-1]),
            "norms": float(sum(int(t.n_bytes) for t in tensors.values() if len(t.shape) == 1)),
            "counted": "block linears + output matrix (the tied token_embd once, as the head)"}


class LlamaCppEngine:
    """``engine(ids, new_tokens)`` -> decode tokens/s of greedy llama.cpp decoding."""

    def __init__(self, gguf: Path, threads: int, max_len: int):
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                                   n_ctx=max_len + 8, verbose=False)

    def __call__(self, ids, new_tokens: int) -> float:
        lib, llm = self._lib, self.llm
        tokens = [int(t) for t in ids]
        llm.reset()
        lib.llama_perf_context_reset(llm._ctx.ctx)
        n = 0
        for _ in llm.generate(tokens, top_k=1, temp=0.0, reset=True):
            n += 1
            if n >= new_tokens:
                break
        perf = lib.llama_perf_context(llm._ctx.ctx)
        if perf.n_eval < 1 or perf.t_eval_ms <= 0:
            raise RuntimeError(f"llama.cpp reported {perf.n_eval} decode evaluations in {perf.t_eval_ms} ms")
        return perf.n_eval / (perf.t_eval_ms / 1000)
