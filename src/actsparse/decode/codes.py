"""What the host and the compiled decode step share: the role and mode codes, and the named
tuples that group the step's arguments (numba takes named tuples of arrays and typed lists).
"""
from __future__ import annotations

from collections import namedtuple
from enum import IntEnum


class Role(IntEnum):
    """The linears of a block, in the kernel's order (index into the per-layer tables)."""

    Q = 0
    K = 1
    V = 2
    O = 3  # noqa: E741
    GATE = 4
    UP = 5
    DOWN = 6


SITE_ROLE = {Role.Q: "attn.q", Role.K: "attn.k", Role.V: "attn.v", Role.O: "attn.o", Role.GATE: "mlp.gate",
             Role.UP: "mlp.up", Role.DOWN: "mlp.down"}
ROLE_NAMES = ("q", "k", "v", "o", "gate", "up", "down")  # short names in reports (Role order)
FUSED_GROUPS = {Role.Q: (Role.Q, Role.K, Role.V), Role.GATE: (Role.GATE, Role.UP)}


class Mode(IntEnum):
    """How a linear (or the activation site) reads its input; kernel-visible codes."""

    DENSE = 0  # every input (activation site: no test)
    THRESHOLD = 1  # inputs with |x_i| > t_i (activation site: kept neurons)
    TOPK = 2  # the k largest |x_i|
    FUSED = 3  # computed by the first linear of its group, on the concatenated weights


# grouped arguments of decode_token (numba takes named tuples of arrays and typed lists)
Weights = namedtuple("Weights", "fmt w wt bias")  # fmt (L, 7) int64; w, wt, bias: typed lists (layer * 7 + role)
Tests = namedtuple("Tests", "mode thr stride k")  # per-linear input tests: mode/stride/k (L, 7) int64; thr list
ActTests = namedtuple("ActTests", "code mode thr stride k")  # MLP activation code; its per-layer test
# RMSNorm gains (offset + weight): (L, D) before attention / the MLP, after them (sandwich norms;
# (0, 0) when absent), (L, head_dim) per query / key head ((0, 0) when absent); final (D,); eps
Norms = namedtuple("Norms", "attn mlp attn_out mlp_out q k final eps")
# softcap: tanh soft-capping of the scaled scores (0: none); window: (L,) sliding window (0: none)
AttentionShape = namedtuple("AttentionShape", "n_heads n_kv head_dim scale softcap window")
Rope = namedtuple("Rope", "cos sin index")  # (tables, positions, rotary dims); index: (L,) table per layer
Embeddings = namedtuple("Embeddings", "embed lm_head scale softcap")  # embedding scale; final-logit softcap
StepArgs = namedtuple("StepArgs", "weights tests act norms attn rope emb")
KVCache = namedtuple("KVCache", "k v")  # (L, n_kv, max_len, head_dim) fp32 each
