"""llama.cpp (``llama-cpp-python``, an optional install) as a baseline engine of the decode benchmark.

The same weights as actsparse's: the embedded model's own GGUF file, requantised by llama.cpp
itself (``llama_model_quantize`` with ``allow_requantize``) to F32 or BF16, the precision the
other engines run (actsparse dequantises the same file to fp32, and rounds to bf16 the same
way, to nearest even). Written once into the cache. Greedy decoding of the same prompt token
ids for the same number of new tokens; decode tokens/s from llama.cpp's own performance
counters (the tokens evaluated after the prompt, over their evaluation time).
"""
from __future__ import annotations

import os
from pathlib import Path

from actsparse.errors import ConfigError

FTYPES = {"float32": ("LLAMA_FTYPE_ALL_F32", "F32"), "bfloat16": ("LLAMA_FTYPE_MOSTLY_BF16", "BF16")}
BUILD_HINT = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON '
              '-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF '
              '-DGGML_AMX_BF16=OFF" pip install llama-cpp-python==0.3.36')


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def requantised(name: str, dtype: str) -> Path:
    """The embedded model ``name``'s GGUF in ``dtype`` (F32 / BF16), made once into the cache."""
    import llama_cpp

    from actsparse.cache import cache_dir
    from actsparse.models.loading import embedded_gguf

    if dtype not in FTYPES:
        raise ConfigError(f"llama.cpp baseline dtypes: {', '.join(FTYPES)}, not {dtype!r}")
    source = embedded_gguf(name)
    if source is None:
        raise ConfigError(f"{name!r} has no GGUF file for llama.cpp; the baseline runs the embedded causal LMs")
    ftype, tag = FTYPES[dtype]
    target = cache_dir() / "gguf" / f"{source.stem}.{tag}.gguf"
    if not target.is_file():
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
