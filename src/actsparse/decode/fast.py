"""FastDecoder: batch-1 greedy / sampled decoding of a LLaMA-style model on the CPU kernels.

    model, tok = actsparse.load("smollm2-135m", dtype="bfloat16")
    actsparse.load_plan(model, "plan")                # or sparsify_(...), or nothing (dense)
    dec = FastDecoder(model)
    result = dec.generate(tok("The capital", return_tensors="pt").input_ids[0], 64)

The prompt goes through the model's own forward (batched, masked dense when sparsified)
and its KV cache is copied; every new token then runs in one compiled call
(:mod:`actsparse.decode._numba_step`). Sparse sites come from the model's sparse modules:
a :class:`MaskedLinear` becomes an input-sparse GEMV on a transposed copy of its weight, a
:class:`ThresholdedActivation` in the MLP reads only the kept rows of up and down. Dense
linears use the model's own weight memory (no copy). ``dense=True`` ignores the sparse
modules: the dense baseline on the same engine. A ReLU MLP skips its exact zeros
(``skip_zeros``, on by default: the result is the same, only faster). Top-k sites keep the
entries above the (k+1)-th largest |x|: with exact ties at that boundary all tied entries are
dropped (torch.topk would keep an arbitrary subset).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from actsparse.errors import ConfigError
from actsparse.kernels.dispatch import kernel_threads, numba_enabled, numpy_view
from actsparse.sparsify.modules import MaskedLinear, ThresholdedActivation, activation_name

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
ROLE_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
_ROLE_PATHS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


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


def _check_model(model: nn.Module):
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        raise ConfigError(
            f"FastDecoder supports LLaMA-style models ({', '.join(SUPPORTED_TYPES)}), not {mtype!r}; "
            "use accelerate_(model) and model.generate for other architectures")
    if getattr(model, "device", torch.device("cpu")).type != "cpu":
        raise ConfigError("FastDecoder runs on the CPU; move the model with model.to('cpu')")
    dtype = model.get_input_embeddings().weight.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"FastDecoder needs fp32 or bf16 weights, the model has {dtype}; "
                          "load it with dtype='float32' or 'bfloat16'")
    return cfg, dtype


class FastDecoder:
    """Compiled batch-1 decoder over a (possibly sparsified) LLaMA-style HF model.

    ``max_len``: prompt + new tokens (the KV cache is allocated once). ``dense``: ignore
    sparse modules. ``skip_zeros``: for a ReLU MLP without an activation threshold, read
    only the rows of up/down whose activation is non-zero (default: on for ReLU).
    The model is not modified; keep it alive while the decoder is used (dense linears share
    its weight memory).
    """

    def __init__(self, model: nn.Module, *, max_len: int = 1024, dense: bool = False, skip_zeros: bool | None = None):
        from numba.typed import List

        from actsparse.decode import _numba_step as nk
        from actsparse.decode._numba_step import MODE_FUSED

        if not numba_enabled():
            raise ConfigError("FastDecoder needs numba (it is disabled or missing); use model.generate instead")
        cfg, dtype = _check_model(model)
        self.model = model
        self.dtype = dtype
        self.dense = dense
        self.max_len = int(max_len)
        if self.max_len < 2:
            raise ConfigError("max_len must be at least 2")
        base = model.get_submodule("model")
        layers = base.layers
        L = len(layers)
        self.num_layers = L
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.hidden = cfg.hidden_size
        self.eps = float(cfg.rms_norm_eps)
        self.scale = float(getattr(layers[0].self_attn, "scaling", self.head_dim ** -0.5))
        wdt = np.uint16 if dtype == torch.bfloat16 else np.float32
        empty_w = np.empty((0, 0), wdt)
        empty_f = np.empty(0, np.float32)

        self._keep = []  # tensors whose memory the numba lists point to
        modes = np.zeros((L, 7), np.int64)
        tss = np.zeros((L, 7), np.int64)
        ks = np.zeros((L, 7), np.int64)
        a_modes = np.zeros(L, np.int64)
        a_tss = np.zeros(L, np.int64)
        a_ks = np.zeros(L, np.int64)
        ws, wts, thrs, biases, a_thrs = List(), List(), List(), List(), List()
        self.copy_bytes = 0
        act_names = set()
        for li, layer in enumerate(layers):
            act = layer.mlp.act_fn
            act_names.add(act.act_name if isinstance(act, ThresholdedActivation) else activation_name(act))
            a_mode, a_thr, a_ts, a_k = self._act_test(act, act_names, dense, skip_zeros)
            a_modes[li], a_tss[li], a_ks[li] = a_mode, a_ts, a_k
            a_thrs.append(a_thr)
            roles = self._role_tests(li, layer, a_mode, dense)
            fused = set()
            if _same_test(roles[0:3]):
                fused |= {1, 2}
            if a_mode == 0 and _same_test(roles[4:6]):
                fused.add(5)
            for r, (mode, thr, ts, k, lin) in enumerate(roles):
                group = {0: (0, 1, 2), 4: (4, 5)}.get(r, (r,))
                group = tuple(g for g in group if g == r or g in fused)
                lins = [roles[g][4] for g in group]
                if r in fused:
                    ws.append(empty_w)
                    wts.append(empty_w)
                    modes[li, r] = MODE_FUSED
                elif mode == 0:
                    w = lin.weight.detach()
                    if not w.is_contiguous():
                        raise ConfigError(f"layer {li} {_ROLE_PATHS[r]}: weight is not contiguous")
                    self._keep.append(w)
                    ws.append(numpy_view(w))
                    wts.append(empty_w)
                else:
                    wt = torch.cat([m.weight.detach() for m in lins]).t().contiguous()
                    self._keep.append(wt)
                    self.copy_bytes += wt.numel() * wt.element_size()
                    ws.append(numpy_view(lin.weight) if r == 5 else empty_w)  # up rows for the kept neurons
                    wts.append(numpy_view(wt))
                if r not in fused:
                    modes[li, r], tss[li, r], ks[li, r] = mode, ts, k
                self._keep.append(thr)
                thrs.append(thr)
                biases.append(_bias(lins) if r not in fused else empty_f)
        if len(act_names) != 1 or next(iter(act_names)) not in ("relu", "silu", "gelu_tanh", "gelu"):
            raise ConfigError(f"unsupported MLP activation {sorted(act_names)} (relu, silu, gelu, gelu_tanh)")
        from actsparse.kernels.numba_cpu import ACT_CODES

        self.act = next(iter(act_names))
        self._act_code = ACT_CODES[self.act]
        self._modes, self._tss, self._ks = modes, tss, ks
        self._ws, self._wts, self._thrs, self._biases = ws, wts, thrs, biases
        self._a = (a_modes, a_thrs, a_tss, a_ks)
        self._norm1 = np.stack([l.input_layernorm.weight.detach().float().numpy() for l in layers])
        self._norm2 = np.stack([l.post_attention_layernorm.weight.detach().float().numpy() for l in layers])
        self._final_norm = base.norm.weight.detach().float().contiguous().numpy()
        emb = model.get_input_embeddings().weight.detach()
        head = model.get_output_embeddings().weight.detach()
        self._keep += [emb, head]
        self._embed, self._head = numpy_view(emb), numpy_view(head)
        with torch.no_grad():
            pos = torch.arange(self.max_len)[None]
            probe = torch.zeros(1, 1, self.head_dim, dtype=torch.float32)
            cos, sin = base.rotary_emb(probe, pos)
        self._cos = cos[0].float().contiguous().numpy()
        self._sin = sin[0].float().contiguous().numpy()
        self._k_cache = np.zeros((L, self.n_kv, self.max_len, self.head_dim), np.float32)
        self._v_cache = np.zeros_like(self._k_cache)
        self._h = np.empty(self.hidden, np.float32)
        self.vocab = self._head.shape[0]
        self._logits = np.empty(self.vocab, np.float32)
        self.counts = np.zeros((L, 8), np.int64)
        self.steps = 0
        self.pos = 0
        self._step = nk.decode_token
        self._widths = self._role_widths()

    # ------------------------------------------------------------------
    @classmethod
    def _act_test(cls, act, act_names, dense: bool, skip_zeros) -> tuple[int, np.ndarray, int, int]:
        """The MLP activation site's test: its threshold / top-k, a ReLU's exact zeros, or none."""
        relu = act_names == {"relu"}
        zero_skip = (skip_zeros if skip_zeros is not None else relu) and not dense
        if isinstance(act, ThresholdedActivation) and not dense:
            return cls._site_test(act)
        if zero_skip and not relu:
            raise ConfigError("skip_zeros needs a ReLU MLP (its exact zeros); this model's activation is "
                              f"{', '.join(sorted(act_names))}")
        if zero_skip:
            return 1, np.zeros(1, np.float32), 0, 0
        return 0, np.empty(0, np.float32), 0, 0

    @classmethod
    def _role_tests(cls, li: int, layer, a_mode: int, dense: bool) -> list:
        """(mode, thresholds, stride, k, nn.Linear) of each linear of one layer."""
        roles = []
        for r, rel in enumerate(_ROLE_PATHS):
            mod = layer.get_submodule(rel)
            lin = mod.linear if isinstance(mod, MaskedLinear) else mod
            if not isinstance(lin, nn.Linear):
                raise ConfigError(f"layer {li} {rel} is a {type(lin).__name__}, expected nn.Linear")
            if isinstance(mod, MaskedLinear) and not dense:
                roles.append((*cls._site_test(mod), lin))
            elif r == 6 and a_mode != 0:
                roles.append((1, np.zeros(1, np.float32), 0, 0, lin))  # skip the masked neurons' rows
            else:
                roles.append((0, np.empty(0, np.float32), 0, 0, lin))
        return roles

    @staticmethod
    def _site_test(m) -> tuple[int, np.ndarray, int, int]:
        """(mode, thresholds, stride, k) of a sparse module."""
        if m.mode == "topk":
            return 2, np.empty(0, np.float32), 0, int(m.k)
        if m.per_channel:
            return 1, m.threshold.detach().float().contiguous().numpy(), 1, 0
        return 1, np.array([m.threshold], np.float32), 0, 0

    def _role_widths(self) -> np.ndarray:
        layer = self.model.get_submodule("model").layers[0]
        widths = [layer.get_submodule(p).in_features for p in _ROLE_PATHS]
        return np.array(widths + [layer.get_submodule("mlp.down_proj").in_features], np.int64)

    @property
    def sparse_roles(self) -> dict[str, int]:
        """Number of layers in which each linear reads a sparse input (and the MLP site)."""
        out = {n: int((self._modes[:, i] != 0).sum()) for i, n in enumerate(ROLE_NAMES)}
        out["mlp.act"] = int((self._a[0] != 0).sum())
        return out

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
        ffn = self._widths[6]
        tot[7] = self.counts[:, 7].sum() / (self.steps * self.num_layers * ffn)
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
            raise ConfigError(f"the KV cache is full ({self.max_len} positions); make a FastDecoder with a "
                              "larger max_len")
        a_modes, a_thrs, a_tss, a_ks = self._a
        self._step(int(token), self.pos, self._embed, self._h,
                   self._modes, self._ws, self._wts, self._thrs, self._tss, self._ks, self._biases,
                   self._norm1, self._norm2, self._final_norm, self.eps,
                   self._act_code, a_modes, a_thrs, a_tss, a_ks,
                   self._k_cache, self._v_cache, self._cos, self._sin, self.n_heads, self.n_kv, self.head_dim,
                   np.float32(self.scale), self._head, self._logits, self.counts, kernel_threads())
        self.pos += 1
        self.steps += 1
        return self._logits

    def prefill(self, input_ids, *, use_model: bool = True) -> np.ndarray:
        """Reset and run the prompt; returns the last position's logits.

        ``use_model``: one batched forward of the model (masked dense) whose KV cache is
        copied; otherwise token by token through the compiled step."""
        ids = torch.as_tensor(input_ids).reshape(-1)
        n = int(ids.numel())
        if n == 0:
            raise ConfigError("the prompt is empty")
        if n >= self.max_len:
            raise ConfigError(f"the prompt has {n} tokens; max_len is {self.max_len}")
        self.reset()
        if not use_model:
            for t in ids.tolist():
                logits = self.step(t)
            self.counts[:] = 0
            self.steps = 0
            return logits
        with torch.no_grad():
            out = self.model(input_ids=ids[None], use_cache=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        for li in range(self.num_layers):
            k, v = _cache_layer(cache, li)
            self._k_cache[li, :, :n] = k[0].float().numpy()
            self._v_cache[li, :, :n] = v[0].float().numpy()
        self.pos = n
        return out.logits[0, -1].float().numpy()

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
        n_prompt = int(torch.as_tensor(input_ids).numel())
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
        """Bytes of the model's weights and of the transposed copies the decoder added."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        cache = self._k_cache.nbytes + self._v_cache.nbytes
        return {"model_weight_bytes": weights, "transposed_copy_bytes": self.copy_bytes,
                "copy_overhead": self.copy_bytes / weights if weights else math.nan, "kv_cache_bytes": cache}


def _same_test(roles) -> bool:
    """True if these linears (sharing one input) are all sparse with the same test, so one
    GEMV over their concatenated transposed weights serves them all."""
    mode, thr, ts, k, lin = roles[0]
    if mode not in (1, 2):
        return False
    has_bias = lin.bias is not None
    return all(m == mode and t2 == ts and k2 == k and np.array_equal(th, thr) and (l2.bias is not None) == has_bias
               for m, th, t2, k2, l2 in roles[1:])


def _bias(linears) -> np.ndarray:
    if linears[0].bias is None:
        return np.empty(0, np.float32)
    return torch.cat([m.bias.detach().float() for m in linears]).contiguous().numpy()


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
