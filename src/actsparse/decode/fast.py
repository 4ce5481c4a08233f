"""FastDecoder: batch-1 greedy / sampled decoding of a LLaMA-style model on the CPU kernels.

    model, tok = actsparse.load("smollm2-135m", dtype="bfloat16")
    actsparse.load_plan(model, "plan")                # or sparsify_(...), or nothing (dense)
    dec = FastDecoder(model)
    result = dec.generate(tok("The capital", return_tensors="pt").input_ids[0], 64)

The prompt goes through the model's own forward (batched) and its KV cache is copied; every
new token then runs in one compiled call
(:mod:`actsparse.decode.step`). What each linear does comes from the model's
:class:`~actsparse.decode.plan.DecodePlan`: a :class:`MaskedLinear` becomes an input-sparse
GEMV on a transposed copy of its weight, a :class:`ThresholdedActivation` in the MLP reads
only the kept rows of up and down. Dense linears use the model's own weight memory (no copy).
``dense=True`` ignores the sparse modules: the dense baseline on the same engine, dense
everywhere (its prefill runs the model with every sparse module bypassed). A sparse decoder's
prefill computes what its plan does: through the model's forward while the model carries the
plan's sparse modules, else token by token through the compiled step; ``prefill="dense"``
prefills densely instead (TEAL's decode protocol: a dense prompt, sparse new tokens). A ReLU MLP
skips its exact zeros (``skip_zeros``, on by default: the result is the same, only faster).
Top-k sites keep the entries above the (k+1)-th largest |x|: with exact ties at that boundary
all tied entries are dropped (torch.topk would keep an arbitrary subset).

Quantised weights: a model whose block linears are QuantLinears is decoded on their own
packed buffers (no copy; input-sparse linears must be packed transposed: ``quantize_(model,
cfg, plan=...)``); ``weights="int8" | "q4"`` (or an Int8Config / Q4Config) makes the decoder
quantise its own RTN copy of a dense model, each linear in the layout its mode reads, and run
the prompt through the compiled step.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from actsparse.decode.codes import ROLE_NAMES, Mode
from actsparse.decode.plan import DecodePlan, unique_bytes
from actsparse.errors import ConfigError, StateError, UnsupportedError
from actsparse.kernels.dispatch import numba_enabled
from actsparse.numba_backend import kernel_threads
from actsparse.sparsify.modules import dense_forward

PREFILL_MODES = ("plan", "dense")


@dataclass
class GenerationResult:
    tokens: list[int]                     # the new tokens
    prompt_tokens: int
    prefill_s: float
    step_s: list[float] = field(default_factory=list)  # wall time of each decode step

    @property
    def decode_s(self) -> float:
        return float(sum(self.step_s))

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput (tokens after the first, which the prefill produced)."""
        return len(self.step_s) / self.decode_s if self.step_s else math.nan

    def to_dict(self) -> dict:
        return {"new_tokens": len(self.tokens), "prompt_tokens": self.prompt_tokens, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "tokens_per_s": self.tokens_per_s}


class FastDecoder:
    """Compiled batch-1 decoder over a (possibly sparsified) LLaMA-style HF model.

    ``max_len``: prompt + new tokens (the KV cache is allocated once). ``dense``: ignore
    sparse modules. ``skip_zeros``: for a ReLU MLP without an activation threshold, read
    only the rows of up/down whose activation is non-zero (default: on for ReLU).
    ``prefill``: "plan" (the prompt as the plan computes it) or "dense". ``weights``: None (the
    model's own: fp or QuantLinears), or "int8" / "q4" / a QuantConfig (the decoder's own copy).
    The model is not modified; keep it alive while the decoder is used (dense linears share
    its weight memory).
    """

    def __init__(self, model: nn.Module, *, max_len: int = 1024, dense: bool = False, skip_zeros: bool | None = None,
                 prefill: str = "plan", weights=None):
        from actsparse.decode import step
        from actsparse.decode.codes import KVCache

        if prefill not in PREFILL_MODES:
            raise ConfigError(f"prefill must be one of {', '.join(PREFILL_MODES)}, got {prefill!r}")
        self.prefill_mode = prefill
        if not numba_enabled():
            raise UnsupportedError("FastDecoder needs numba (it is disabled or missing); use model.generate instead")
        self.max_len = int(max_len)
        if self.max_len < 2:
            raise ConfigError("max_len must be at least 2")
        self.plan = DecodePlan.from_model(model, dense=dense, skip_zeros=skip_zeros, weights=weights)
        self.model = model
        self.dtype = model.get_input_embeddings().weight.dtype
        self.dense = dense
        self.num_layers = self.plan.num_layers
        self._args, self._keep, self.copy_bytes = self.plan.kernel_args(self.max_len)
        p = self.plan
        shape = (p.num_layers, p.n_kv, self.max_len, p.head_dim)
        self._kv = KVCache(np.zeros(shape, np.float32), np.zeros(shape, np.float32))
        self._h = np.empty(p.hidden, np.float32)
        head = self._args.emb.lm_head
        self.vocab = (head[1] if isinstance(head, tuple) else head).shape[0]  # a packed head: its scales' rows
        # the decoder's own quantised copy: the model's forward computes other weights, so the
        # prompt runs through the compiled step (a dense prefill: the same step with every test dense)
        self.own_weights = p.own_quant is not None
        self._dense_args = self._args._replace(tests=_all_dense(self._args.tests), act=_all_dense(self._args.act))
        self._logits = np.empty(self.vocab, np.float32)
        self.counts = np.zeros((p.num_layers, len(ROLE_NAMES) + 1), np.int64)
        self.steps = 0
        self.pos = 0
        self._step = step.decode_token
        self._entry = None  # the compiled step for these argument types, once known
        self._widths = p.widths()

    # ------------------------------------------------------------------
    @property
    def sparse_roles(self) -> dict[str, int]:
        """Number of layers in which each linear reads a sparse input (and the MLP site)."""
        return self.plan.sparse_roles()

    def reset(self) -> None:
        self.pos = 0
        self.counts[:] = 0
        self.steps = 0

    def decode_sparsity(self) -> dict[str, float]:
        """Fraction of inputs skipped per role over the decode steps since the last reset
        (``mlp.act``: neurons dropped at the activation site)."""
        if self.steps == 0:
            return {}
        names = ROLE_NAMES + ("mlp.act",)
        tot = self.counts.sum(axis=0) / (self.steps * self.num_layers * self._widths)
        return {n: float(1.0 - tot[i]) for i, n in enumerate(names)}

    def weight_skip(self) -> dict[str, float]:
        """Fraction of each linear's weight bytes not read per decoded token (since the last
        reset): input sparsity for the transposed rows, and for up after a thresholded
        activation the dropped neurons (only kept rows of up are read)."""
        sp = self.decode_sparsity()
        if not sp:
            return {}
        out = {r: sp[r] for r in ROLE_NAMES}
        out["up"] = max(out["up"], sp["mlp.act"])
        return out

    # ------------------------------------------------------------------
    def step(self, token: int) -> np.ndarray:
        """Decode one token at the current position; returns the fp32 logits (a view,
        overwritten by the next step)."""
        if self.pos >= self.max_len:
            raise StateError(f"the KV cache is full ({self.max_len} positions); make a FastDecoder with a "
                             "larger max_len")
        args = (int(token), self.pos, self._args, self._kv, self._h, self._logits, self.counts, kernel_threads())
        if self._entry is None:
            self._step(*args)  # compiles (or loads the cache) for these argument types
            # numba's dispatcher types every argument on every call: for the grouped arguments
            # (named tuples of typed lists) that costs ~0.2 ms per token, more than a small model's
            # whole step. The types of a decoder's arguments never change: call the compiled code.
            sig = tuple(self._step.typeof_pyval(a) for a in args)
            self._entry = self._step.overloads[sig].entry_point
        else:
            self._entry(*args)
        self.pos += 1
        self.steps += 1
        return self._logits

    def prefill(self, input_ids, *, use_model: bool = True) -> np.ndarray:
        """Reset and run the prompt; returns the last position's logits.

        ``use_model``: one batched forward of the model whose KV cache is copied, when that
        forward computes what the decoder does (see the class docstring); otherwise (or with
        ``use_model=False``) token by token through the compiled step."""
        ids = one_sequence(input_ids)
        n = int(ids.numel())
        if n == 0:
            raise ConfigError("the prompt is empty")
        if n >= self.max_len:
            raise ConfigError(f"the prompt has {n} tokens; max_len is {self.max_len}")
        self.reset()
        dense = self.dense or self.prefill_mode == "dense"
        if self.own_weights:
            return self._prefill_steps(ids, self._dense_args if dense else self._args)
        if not use_model or not (dense or self.plan.model_matches()):
            if dense:
                raise StateError("a dense prefill needs the model's forward (use_model=True)")
            for t in ids.tolist():
                logits = self.step(t)
            self.counts[:] = 0
            self.steps = 0
            return logits
        with torch.no_grad(), (dense_forward(self.model) if dense else nullcontext()):
            out = self.model(input_ids=ids[None], use_cache=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        for li in range(self.num_layers):
            k, v = _cache_layer(cache, li)
            self._kv.k[li, :, :n] = k[0].float().numpy()
            self._kv.v[li, :, :n] = v[0].float().numpy()
        self.pos = n
        return out.logits[0, -1].float().numpy()

    def _prefill_steps(self, ids: torch.Tensor, args) -> np.ndarray:
        """The prompt token by token through the compiled step with ``args``; counters reset after."""
        saved = self._args
        self._args = args  # same types: the compiled entry point is shared
        try:
            for t in ids.tolist():
                logits = self.step(t)
        finally:
            self._args = saved
        self.counts[:] = 0
        self.steps = 0
        return logits

    def generate(self, input_ids, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id: int | None = None, seed: int = 0, on_token=None,
                 prefill_with_model: bool = True) -> GenerationResult:
        """Greedy (temperature 0) or sampled decoding; ``on_token(token_id)`` is called as
        each token is produced (for streaming)."""
        if max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be >= 1")
        if temperature < 0 or not (0 < top_p <= 1):
            raise ConfigError("temperature must be >= 0 and top_p in (0, 1]")
        rng = np.random.default_rng(seed)
        n_prompt = int(one_sequence(input_ids).numel())
        if n_prompt + max_new_tokens > self.max_len:
            raise ConfigError(f"prompt ({n_prompt}) + max_new_tokens ({max_new_tokens}) exceed max_len "
                              f"({self.max_len})")
        t0 = time.perf_counter()
        logits = self.prefill(input_ids, use_model=prefill_with_model)
        res = GenerationResult([], n_prompt, time.perf_counter() - t0)
        for i in range(max_new_tokens):
            tok = _choose(logits, temperature, top_p, rng)
            res.tokens.append(tok)
            if on_token is not None:
                on_token(tok)
            if (eos_token_id is not None and tok == eos_token_id) or i == max_new_tokens - 1:
                break
            t1 = time.perf_counter()
            logits = self.step(tok)
            res.step_s.append(time.perf_counter() - t1)
        return res

    def memory_report(self) -> dict:
        """Weight bytes resident while decoding: the model's (parameters and buffers, shared
        storage once) and the copies the decoder added (transposed fp copies for input-sparse
        linears, or its own quantised weights), against the model stored once in the decoded
        format (``format_weight_bytes``; ``resident_ratio`` <= 1.05 is the one-copy target)."""
        weights = unique_bytes(list(self.model.parameters()) + list(self.model.buffers()))
        resident = weights + self.copy_bytes
        fmt_bytes = self.plan.format_weight_bytes()
        cache = self._kv.k.nbytes + self._kv.v.nbytes
        return {"weights": self.plan.weights, "model_weight_bytes": weights, "transposed_copy_bytes": self.copy_bytes,
                "copy_overhead": self.copy_bytes / weights if weights else math.nan,
                "resident_weight_bytes": resident, "format_weight_bytes": fmt_bytes,
                "resident_ratio": resident / fmt_bytes if fmt_bytes else math.nan, "kv_cache_bytes": cache}


def one_sequence(input_ids) -> torch.Tensor:
    """The prompt as a 1-D tensor of token ids; a batch of several sequences is refused."""
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise ConfigError(f"FastDecoder decodes one sequence at a time (batch 1); got input_ids of shape "
                          f"{tuple(ids.shape)}. For a batch, use accelerate_(model) and model.generate")
    return ids


def _all_dense(tests):
    """The same tests (Tests or ActTests) with every mode DENSE (a FUSED linear stays FUSED)."""
    mode = np.where(tests.mode == int(Mode.FUSED), tests.mode, int(Mode.DENSE)).astype(np.int64)
    return tests._replace(mode=mode)


def _cache_layer(cache, i):
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[i].keys, layers[i].values
    return cache[i][0], cache[i][1]


def _choose(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p)
        csum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(csum, top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(p.shape[0], p=p))
