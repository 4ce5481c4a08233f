"""End-to-end batch-1 decode benchmark: tokens/s dense vs sparse, same dtype and threads.

Engines, timed in a random order in every repeat (same prompt, greedy, fixed length):

* ``hf-dense``     Hugging Face ``model.generate`` on the dense model;
* ``hf-sparse``    ``model.generate`` after :func:`accelerate_` (kernels per linear);
* ``fast-dense``   :class:`FastDecoder` with ``dense=True`` (one compiled call per token);
* ``fast-sparse``  :class:`FastDecoder` on the sparsified model;
* ``fast-dense-<f>`` / ``fast-sparse-<f>`` for each quantised format ``f`` of ``weights``
  (int8, q4): the same two decoders on their own RTN-quantised copy of the block linears
  (``FastDecoder(weights=f)``: dense rows-packed, sparse with the input-sparse linears packed
  transposed), their bytes per token the format's real bytes (codes + scales + mins);
* ``llama-cpp`` (llama.cpp on the same weights in the group's dtype, F32 / BF16) and, with
  ``weights`` int8 / q4, ``llama-cpp-q8_0`` / ``llama-cpp-q4_0``: the same source GGUF requantised
  by llama.cpp to its own nearest formats (:mod:`actsparse.bench.llamacpp`), their bytes per
  token read from each file's tensor sizes. The embedded models use their own GGUF file, the
  random LLaMA shapes one written from their own tensors (:mod:`actsparse.bench.llama_gguf`).

Decode throughput counts the tokens after the first (the prefill makes the first one).
Weights stream from DRAM on every token (the smallest case, SmolLM2 in bf16, reads
~270 MB per token against a 32 MiB L3), so no extra cache flush is needed. Reported per
(model, dtype, threads): medians and p10/p90 of tokens/s, the speedup of fast-sparse
over the best dense engine, the bytes read per token (block linears at the sparsity
reached during decoding, plus the dense lm_head), effective GB/s, and the fraction of
the Amdahl ceiling ``1 / ((1 - f) + f (1 - s))`` reached, f the share of weight bytes in
the sparsified matrices and s their reached sparsity. A plain read of 512 MiB is timed among
the engines (:mod:`actsparse.bench.bandwidth`; its best run is the roof, since a cold buffer's
read varies from run to run): each engine's GB/s as a fraction of it, and
the most any engine reading the dense bytes could gain over Hugging Face (``read_bound_vs_hf``).

Models: an embedded / HF model with a plan calibrated on the wiki calibration split, and
``llama-1.1b`` — a LLaMA-shaped model of 1.1B parameters (TinyLlama's shape) with random
weights, whose thresholds are calibrated the same way (token ids of real text modulo its
vocabulary) so that each site reaches the target sparsity.
"""
from __future__ import annotations

import gc
import random
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from actsparse.bench.bandwidth import ReadProbe
from actsparse.bench.llamacpp import FOR_WEIGHTS
from actsparse.bench.timing import GenerateClock, interleaved, spread
from actsparse.errors import ConfigError
from actsparse.provenance import git_hash, machine_info

# randomly initialised models of real shapes (model class name, config class name, config), for speed only:
# weights that do not fit in the cache, thresholds calibrated to give the target sparsity
SYNTHETIC = {
    "llama-1.1b": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # Gemma-3-1B's shape: 26 layers, 5 sliding-window (512) layers per global one, 262k vocabulary (tied)
    "gemma3-1b": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
        head_dim=256, vocab_size=262144, max_position_embeddings=32768, sliding_window=512,
        sliding_window_pattern=6, query_pre_attn_scalar=256, rope_local_base_freq=10000.0)),
    # for smoke tests of the benchmark's wiring only
    "llama-tiny": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1000, max_position_embeddings=256, tie_word_embeddings=True)),
}
ENGINES = ("hf-dense", "hf-sparse", "fast-dense", "fast-sparse")
QUANT_WEIGHTS = ("int8", "q4")
FP_WEIGHTS = {"fp32": "float32", "bf16": "bfloat16"}


def quant_engines(fmt: str) -> tuple[str, str]:
    return f"fast-dense-{fmt}", f"fast-sparse-{fmt}"
LLAMA_CPP = "llama-cpp"  # when llama-cpp-python is installed and the model has a GGUF file (bench/llamacpp.py)
READ = "read-bandwidth"  # timed with the engines: GB/s of a plain read of 512 MiB (bench/bandwidth.py)


def build_synthetic(name: str, seed: int = 0):
    """A randomly initialised model of a real shape (fp32) and the SmolLM2 tokenizer."""
    import transformers

    from actsparse.models.loading import load

    if name not in SYNTHETIC:
        raise ConfigError(f"unknown synthetic model {name!r}; choose from {', '.join(SYNTHETIC)}")
    model_cls, config_cls, kwargs = SYNTHETIC[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(cfg).eval()
    _, tok = load("smollm2-135m")
    return model, tok


def llama_engine(fmt: str) -> str:
    """The llama.cpp engine of actsparse's quantised format ``fmt`` (int8 -> llama-cpp-q8_0, q4 -> llama-cpp-q4_0)."""
    return f"{LLAMA_CPP}-{FOR_WEIGHTS[fmt]}"


def llama_source(name: str, model, seed: int = 0):
    """The GGUF file llama.cpp's engines are requantised from, for model ``name`` (None: none,
    e.g. a Hugging Face directory or the Gemma-3 random shape): the embedded model's own file, or
    for a random LLaMA shape an F32 file written from ``model``'s tensors (fp32, before any cast)."""
    from actsparse.models.loading import EMBEDDED, embedded_gguf

    if name in SYNTHETIC:
        if SYNTHETIC[name][0] != "LlamaForCausalLM":
            return None
        from actsparse.bench.llama_gguf import synthetic_gguf

        return synthetic_gguf(name, model, seed, SYNTHETIC[name][2])
    if name not in EMBEDDED or name == "minilm":
        return None
    return embedded_gguf(name)


def llama_gguf(name: str, dtype: str, source=None):
    """The llama.cpp baseline's GGUF for model ``name`` in ``dtype`` (float32 / bfloat16 / q8_0 /
    q4_0) from ``source`` (default: the embedded model's own file)."""
    from actsparse.bench.llamacpp import requantised

    return requantised(name, dtype, source)


def load_model(name: str, seed: int = 0):
    from actsparse.models.loading import load

    if name in SYNTHETIC:
        return build_synthetic(name, seed)
    return tuple(load(name))


def calibration_windows(model, tok, tokens: int, window: int = 256):
    from actsparse.data.text import text, token_windows

    win = token_windows(tok, text("wiki", "calibration"), window=window, max_tokens=tokens)
    vocab = model.get_input_embeddings().weight.shape[0]
    win.input_ids.remainder_(vocab)
    return win


def prompt_ids(tok, model, n: int) -> torch.Tensor:
    from actsparse.data.text import text

    ids = tok("\n".join(text("wiki", "test")[:4]), return_tensors="pt").input_ids[0][:n]
    return ids % model.get_input_embeddings().weight.shape[0]


def _hf_run(model, ids, n_new: int) -> float:
    clock = GenerateClock()
    with torch.no_grad():
        model.generate(ids[None], max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, streamer=clock,
                       pad_token_id=0)
    return clock.tokens_per_s


def _fast_run(dec, ids, n_new: int) -> float:
    return dec.generate(ids, n_new).tokens_per_s


def weight_bytes(model) -> dict:
    """Bytes per decoded token by part: block linears per role, and the lm_head."""
    from actsparse.decode.plan import DecodePlan

    return DecodePlan.from_model(model, dense=True).weight_bytes()


def bytes_per_token(wb: dict, skipped: dict | None) -> float:
    total = wb["lm_head"] + sum(wb["roles"].values())
    if skipped:
        total -= sum(wb["roles"][r] * max(0.0, skipped.get(r, 0.0)) for r in wb["roles"])
    return float(total)


def _summary(xs: list[float]) -> dict:
    sp = spread(xs)
    return {"median": sp["median"], "p10": sp["p10"], "p90": sp["p90"], "runs": [float(x) for x in xs]}


def bench_group(model, tok, *, dtype: str, threads: int, engines, new_tokens: int, prompt_tokens: int,
                repeats: int, rng: random.Random, sparsify, progress=None, llama_gguf=None, quant=(), quant_head="int8",
                llama_quant=None) -> dict:
    """Time every engine on ``model`` (sparsified by ``sparsify()`` when needed); with
    ``llama_gguf`` (the same weights as a GGUF file) llama.cpp too; with ``quant`` (int8, q4)
    the fast engines on each quantised format too, and with ``llama_quant`` (format -> GGUF file
    of llama.cpp's Q8_0 / Q4_0) llama.cpp on each of them."""
    from actsparse.decode import FastDecoder, accelerate_, deaccelerate_
    from actsparse.sparsify.api import desparsify_, is_sparsified

    torch.set_num_threads(threads)
    ids = prompt_ids(tok, model, prompt_tokens)
    max_len = prompt_tokens + new_tokens + 1
    if sparsify is None:  # natural sparsity (a ReLU model): FastDecoder skips the exact zeros
        sparsify = lambda: None  # noqa: E731
        engines = [e for e in engines if e != "hf-sparse"]
    elif not is_sparsified(model):
        sparsify()
    fast_sparse = FastDecoder(model, max_len=max_len)
    fast_dense = FastDecoder(model, max_len=max_len, dense=True)
    decoders = {"fast-dense": fast_dense, "fast-sparse": fast_sparse}
    for fmt in quant:
        qd, qs = quant_engines(fmt)
        cfg = quant_config(fmt, quant_head)
        decoders[qd] = FastDecoder(model, max_len=max_len, dense=True, weights=cfg)
        decoders[qs] = FastDecoder(model, max_len=max_len, weights=cfg)
    for d in decoders.values():  # compile / warm up
        d.generate(ids, 4)
    state = {"hf": None}

    def hf_mode(mode):
        if state["hf"] == mode:
            return
        deaccelerate_(model)
        if mode == "hf-dense":
            desparsify_(model)
        else:
            if not is_sparsified(model):
                sparsify()
            accelerate_(model)
        state["hf"] = mode
        _hf_run(model, ids, 3)  # warm

    def runner(engine):
        if engine.startswith("hf"):
            return lambda: (hf_mode(engine), _hf_run(model, ids, new_tokens))[1]
        return lambda dec=decoders[engine]: _fast_run(dec, ids, new_tokens)

    runners = {e: runner(e) for e in list(engines) + [e for f in quant for e in quant_engines(f)]}
    llama_files = {llama_engine(f): path for f, path in (llama_quant or {}).items()}  # engine -> GGUF file
    if llama_gguf is not None:
        llama_files[LLAMA_CPP] = llama_gguf
        engines = list(engines) + [LLAMA_CPP]
    if llama_files:
        from actsparse.bench.llamacpp import LlamaCppEngine

        for e, path in llama_files.items():
            llama = LlamaCppEngine(path, threads, max_len)
            llama(ids, 4)  # warm
            runners[e] = lambda llama=llama: llama(ids, new_tokens)
    runners[READ] = ReadProbe(threads)  # the machine's read bandwidth, under the same conditions
    runs = interleaved(runners, repeats, rng=rng,
                       after=(lambda e: e != READ and progress.update(1)) if progress is not None else None)
    read = _summary(runs.pop(READ))
    read["best"] = max(read["runs"])  # the roof: a cold buffer's read varies with reclaim and faults, the max not
    del runners
    deaccelerate_(model)
    if not is_sparsified(model):
        sparsify()
    skipped = fast_sparse.weight_skip()
    wb = weight_bytes(model)
    dense_b, sparse_b = bytes_per_token(wb, None), bytes_per_token(wb, skipped)
    stats = {e: _summary(v) for e, v in runs.items()}
    dense_engines = [e for e in engines if e.endswith("dense")]  # llama.cpp is compared separately below
    best_dense = max(dense_engines, key=lambda e: stats[e]["median"])
    out = {"dtype": dtype, "threads": threads, "engines": stats, "best_dense": best_dense,
           "decode_sparsity": fast_sparse.decode_sparsity(), "weight_skip": skipped, "sparse_roles": fast_sparse.sparse_roles,
           "bytes_per_token": {"dense": dense_b, "sparse": sparse_b, "lm_head": wb["lm_head"],
                               "block_linears": sum(wb["roles"].values())},
           "memory": fast_sparse.memory_report(), "new_tokens": new_tokens, "prompt_tokens": int(ids.numel())}
    ceiling = dense_b / sparse_b
    for e in engines:
        tps = stats[e]["median"]
        out.setdefault("effective_GBps", {})[e] = tps * (sparse_b if e.endswith("sparse") else dense_b) / 1e9
    if LLAMA_CPP in stats:
        out["llama_cpp"] = _llama_summary(LLAMA_CPP, llama_gguf, "fast-dense", "fast-sparse", stats, read["best"])
        out["effective_GBps"][LLAMA_CPP] = out["llama_cpp"]["effective_GBps"]  # its own file's bytes
    blocks = sum(wb["roles"].values())
    out["amdahl_ceiling_without_lm_head"] = blocks / (blocks - (dense_b - sparse_b))  # what the blocks alone allow
    out["read_GBps"] = read
    out["of_read_bandwidth"] = {e: gbps / read["best"] for e, gbps in out["effective_GBps"].items()}
    if "hf-dense" in stats:  # no engine reading the dense bytes can beat HF by more than this
        out["read_bound_vs_hf"] = read["best"] / out["effective_GBps"]["hf-dense"]
    if "fast-sparse" in stats:
        speedup = stats["fast-sparse"]["median"] / stats[best_dense]["median"]
        out.update(speedup=speedup, amdahl_ceiling=ceiling, fraction_of_ceiling=speedup / ceiling)
    if "hf-sparse" in stats and "hf-dense" in stats:
        out["hf_speedup"] = stats["hf-sparse"]["median"] / stats["hf-dense"]["median"]
    out["quantized"] = {fmt: _quant_summary(fmt, decoders, stats, read["best"]) | {"lm_head_format": quant_head_format(fmt, quant_head)}
                        for fmt in quant}
    for fmt in quant:
        e = llama_engine(fmt)
        if e in stats:
            q = out["quantized"][fmt]
            q["engines"][e] = stats[e]
            q["llama_cpp"] = _llama_summary(e, llama_files[e], *quant_engines(fmt), stats, read["best"])
    del decoders, fast_sparse, fast_dense
    gc.collect()
    return out


def _llama_summary(engine: str, gguf, dense: str, sparse: str, stats: dict, read_best: float) -> dict:
    """A llama.cpp engine's file, format, bytes per token (from its GGUF) and the fast engines' ratios to it."""
    from actsparse.bench.llamacpp import gguf_bytes_per_token

    b = gguf_bytes_per_token(gguf)
    tps = stats[engine]["median"]
    return {"engine": engine, "gguf": gguf.name, "format": gguf.stem.rsplit(".", 1)[-1], "bytes_per_token": b,
            "effective_GBps": tps * b["total"] / 1e9, "of_read_bandwidth": tps * b["total"] / 1e9 / read_best,
            "fast_dense_vs_llama_cpp": stats[dense]["median"] / tps,
            "fast_sparse_vs_llama_cpp": stats[sparse]["median"] / tps}


def _quant_summary(fmt: str, decoders: dict, stats: dict, read_best: float) -> dict:
    """tokens/s, bytes per token (the format's real bytes) and speedup of one quantised format."""
    qd, qs = quant_engines(fmt)
    wb = decoders[qs].plan.weight_bytes()
    dense_b = bytes_per_token(decoders[qd].plan.weight_bytes(), None)
    sparse_b = bytes_per_token(wb, decoders[qs].weight_skip())
    d, s = stats[qd]["median"], stats[qs]["median"]
    return {"engines": {qd: stats[qd], qs: stats[qs]}, "speedup": s / d, "amdahl_ceiling": dense_b / sparse_b,
            "fraction_of_ceiling": (s / d) / (dense_b / sparse_b),
            "bytes_per_token": {"dense": dense_b, "sparse": sparse_b, "lm_head": wb["lm_head"],
                                "block_linears": sum(wb["roles"].values())},
            "effective_GBps": {qd: d * dense_b / 1e9, qs: s * sparse_b / 1e9},
            "of_read_bandwidth": {qd: d * dense_b / 1e9 / read_best, qs: s * sparse_b / 1e9 / read_best},
            "decode_sparsity": decoders[qs].decode_sparsity(), "memory": decoders[qs].memory_report(),
            "note": "each decoder quantises its own copy (RTN): the dense one in the rows layout, the sparse one "
                    "with its input-sparse linears transposed (other blocks, so slightly other values)"}


QUANT_HEADS = ("int8", "same", "dense")


def quant_head_format(fmt: str, quant_head: str) -> str | None:
    """The lm_head's format of the ``fmt`` engines: int8 (as llama.cpp's Q8_0 and SmolLM2 Q4_0 files
    keep it), the blocks' own format, or None (the dtype's dense head)."""
    if quant_head not in QUANT_HEADS:
        raise ConfigError(f"--quant-head must be one of {', '.join(QUANT_HEADS)}, not {quant_head!r}")
    return {"int8": "int8", "same": fmt, "dense": None}[quant_head]


def quant_config(fmt: str, quant_head: str):
    """The own-copy config of the ``fmt`` engines (RTN) with the lm_head as ``quant_head`` says."""
    from actsparse.quant.config import CONFIGS

    head = quant_head_format(fmt, quant_head)
    return CONFIGS[fmt](lm_head=head is not None, head_format=head)


def parse_weights(weights, dtypes) -> tuple[str, ...]:
    """The quantised formats of ``--weights`` (bf16 / fp32 name the --dtypes engines, which always run)."""
    quant = []
    for w in weights:
        if w in FP_WEIGHTS:
            if FP_WEIGHTS[w] not in dtypes:
                raise ConfigError(f"--weights {w} is the {FP_WEIGHTS[w]} model's own weights: add {FP_WEIGHTS[w]} "
                                  "to --dtypes")
        elif w in QUANT_WEIGHTS:
            quant.append(w)
        else:
            raise ConfigError(f"unknown weight format {w!r}; choose from {', '.join(list(FP_WEIGHTS) + list(QUANT_WEIGHTS))}")
    return tuple(dict.fromkeys(quant))


def run(models, *, method: str = "teal", sparsity: float = 0.5, dtypes=("bfloat16", "float32"), threads=(1, 2),
        new_tokens: int = 64, prompt_tokens: int = 32, repeats: int = 5, calib_tokens: int = 1024,
        hf_max_params: float = 3e8, seed: int = 0, progress: bool = True, llama_cpp: bool | None = None,
        weights=(), quant_head: str = "int8") -> dict:
    """The decode benchmark over ``models`` (names: embedded, HF, or ``llama-1.1b``). ``method``
    "none": no plan, the natural sparsity of a ReLU model (its exact zeros) against dense.
    ``llama_cpp``: time llama.cpp on the embedded models too (None: when llama-cpp-python is
    installed; True refuses to run without it). ``weights``: formats (bf16, fp32 name the dtypes'
    own engines; int8, q4 add the fast engines on each quantised format, in the same runs)."""
    from actsparse.bench import llamacpp

    quant = parse_weights(weights, dtypes)
    quant_head_format("int8", quant_head)  # refuse a bad value before any work
    if quant and method == "none":
        raise ConfigError("--weights int8/q4 compare dense and sparse decoders on a plan; give --method")

    if llama_cpp is None:
        llama_cpp = llamacpp.available()
    elif llama_cpp and not llamacpp.available():
        raise ConfigError(f"the llama.cpp baseline needs llama-cpp-python; on this kind of CPU build it with "
                          f"{llamacpp.BUILD_HINT}")
    from actsparse.sparsify.api import calibrate, desparsify_, sparsify_
    from actsparse.sparsify.registry import make_config

    config = None if method == "none" else make_config(method, sparsity)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    groups = []
    bar = None
    for name in models:
        model, tok = load_model(name, seed)
        n_params = sum(p.numel() for p in model.parameters())
        engines = [e for e in ENGINES if not (e.startswith("hf") and n_params > hf_max_params)]
        torch.set_num_threads(max(threads))
        do_sparsify = stats = None
        source = llama_source(name, model, seed) if llama_cpp else None  # from the fp32 tensors, before any cast
        if config is not None:
            cal = calibration_windows(model, tok, calib_tokens)
            stats = calibrate(model, [config], cal, progress=progress)

            def do_sparsify(model=model, stats=stats):
                sparsify_(model, config, stats=stats)

        if bar is None and progress:
            total = len(models) * len(dtypes) * len(threads) * repeats * (len(ENGINES) + (3 if llama_cpp else 2) * len(quant))
            bar = tqdm(total=total, desc="decode runs", unit="run")
        for dt in dtypes:
            desparsify_(model)  # thresholds stay fp32; the plan is re-applied after the cast
            model.to(getattr(torch, dt))
            gguf = llama_gguf(name, dt, source) if source is not None else None
            llama_quant = {f: llama_gguf(name, FOR_WEIGHTS[f], source) for f in quant} if source is not None else None
            for th in threads:
                g = bench_group(model, tok, dtype=dt, threads=th, engines=engines, new_tokens=new_tokens,
                                prompt_tokens=prompt_tokens, repeats=repeats, rng=rng, sparsify=do_sparsify,
                                progress=bar, llama_gguf=gguf, quant=quant, llama_quant=llama_quant,
                                quant_head=quant_head)
                g.update(model=name, parameters=n_params)
                groups.append(g)
        del model, stats
        gc.collect()
    if bar is not None:
        bar.close()
    return {"benchmark": "decode", "machine": machine_info(), "git": git_hash(),
            "config": {"models": list(models), "method": method, "sparsity": sparsity, "plan": config.to_dict() if config else None,
                       "dtypes": list(dtypes), "threads": list(threads), "new_tokens": new_tokens,
                       "prompt_tokens": prompt_tokens, "repeats": repeats, "calibration_tokens": calib_tokens,
                       "calibration_data": "wiki calibration split (ids modulo the vocabulary)",
                       "hf_engines_up_to_params": hf_max_params, "seed": seed, "llama_cpp": llama_cpp,
                       "quantized_weights": list(quant), "quantized_lm_head": quant_head},
            "wall_s": time.perf_counter() - t0, "groups": groups}


def measure_plans(model, tok, plans: dict, *, new_tokens: int = 32, repeats: int = 7, warmup: int = 1,
                  prompt: str = "The history of the city of Paris", seed: int = 0, progress: bool = False) -> dict:
    """tokens/s of FastDecoder on ``model`` dense and under each plan (name -> callable that
    sparsifies the model in place).

    Every decoder first runs ``warmup`` untimed full-length generations (numba dispatch, the
    kernel cache, the KV cache pages); then ``repeats`` rounds, each running every engine once
    in a fresh random order. Per plan: median tokens/s with p10-p90, the speedup over dense
    (median and p10-p90 of the per-round ratios), the bytes read per token dense and at the
    sparsity reached while decoding, and the Amdahl ceiling they allow; a median speedup above
    its ceiling cannot come from the skipped bytes and is flagged (``above_ceiling``)."""
    from actsparse.decode import FastDecoder
    from actsparse.sparsify.api import desparsify_

    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    ids = tok(prompt, return_tensors="pt").input_ids[0]
    max_len = ids.numel() + new_tokens + 1
    decoders = {"dense": FastDecoder(model, max_len=max_len, dense=True)}
    for name, apply in plans.items():
        apply(model)
        decoders[name] = FastDecoder(model, max_len=max_len)  # keeps its thresholds after desparsify_
        desparsify_(model)
    samples, skipped = {}, {}

    def runner(name):
        def run():
            r = decoders[name].generate(ids, new_tokens)
            samples[name] = tok.decode(r.tokens)
            skipped[name] = decoders[name].weight_skip()
            return r.tokens_per_s
        return run

    runners = {n: runner(n) for n in decoders}
    rng = random.Random(seed)
    bar = tqdm(total=(warmup + repeats) * len(runners), desc="decode runs", unit="run", disable=not progress)
    interleaved(runners, warmup, rng=rng, after=lambda _n: bar.update(1))
    runs = interleaved(runners, repeats, rng=rng, after=lambda _n: bar.update(1))
    bar.close()
    wb = weight_bytes(model)
    dense_b = bytes_per_token(wb, None)
    rows = []
    for n, xs in runs.items():
        sparse_b = bytes_per_token(wb, skipped[n] if n != "dense" else None)
        ratios = [x / d for x, d in zip(xs, runs["dense"])]  # round by round: the same conditions
        speedup = spread(ratios)
        ceiling = dense_b / sparse_b
        rows.append({"engine": n, "tokens_per_s": _summary(xs), "speedup": {k: speedup[k] for k in ("median", "p10", "p90")},
                     "bytes_per_token": sparse_b, "amdahl_ceiling": ceiling,
                     "above_ceiling": n != "dense" and speedup["median"] > ceiling,
                     "decode_sparsity": decoders[n].decode_sparsity() if n != "dense" else {},
                     "weight_skip": skipped[n] if n != "dense" else {}, "sample": samples[n]})
    return {"dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "new_tokens": new_tokens, "prompt": prompt, "prompt_tokens": int(ids.numel()), "warmup": warmup,
            "repeats": repeats, "bytes_per_token": {"dense": dense_b, "lm_head": wb["lm_head"],
                                                   "block_linears": sum(wb["roles"].values())},
            "rows": rows}


def plot(result: dict, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = result["groups"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    colors = {"hf-dense": "#bbbbbb", "hf-sparse": "#88aadd", "fast-dense": "#666666", "fast-sparse": "#2266cc",
              LLAMA_CPP: "#dd8844"}
    quant = tuple(e for f in QUANT_WEIGHTS for e in quant_engines(f) + (llama_engine(f),))
    colors.update({"fast-dense-int8": "#99bb99", "fast-sparse-int8": "#339933", "fast-dense-q4": "#cc99cc",
                   "fast-sparse-q4": "#993399", "llama-cpp-q8_0": "#eeaa66", "llama-cpp-q4_0": "#bb6622"})
    shown = [e for e in ENGINES + (LLAMA_CPP,) + quant if any(e in g["engines"] for g in groups)]
    width = 0.8 / len(shown)
    for i, e in enumerate(shown):
        xs, ys, errs = [], [], []
        for j, g in enumerate(groups):
            if e in g["engines"]:
                s = g["engines"][e]
                xs.append(j + (i - (len(shown) - 1) / 2) * width)
                ys.append(s["median"])
                errs.append([[s["median"] - s["p10"]], [s["p90"] - s["median"]]])
        if xs:
            err = np.array(errs).reshape(len(xs), 2).T if errs else None
            ax.bar(xs, ys, width, label=e, color=colors[e], yerr=err, capsize=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g['model']}\n{g['dtype'].replace('float32', 'fp32').replace('bfloat16', 'bf16')}, "
                        f"{g['threads']}t" for g in groups], fontsize=8)
    ax.set_ylabel("decode tokens/s (median, p10-p90)")
    cfg = result["config"]
    what = "natural sparsity (no plan)" if cfg["method"] == "none" else f"{cfg['method']} {cfg['sparsity']:.0%}"
    ax.set_title(f"batch-1 decode, {what}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
