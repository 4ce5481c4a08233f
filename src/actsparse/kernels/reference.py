"""Pure-torch reference implementations: the specification of every kernel.

Each function is the dense forward on the masked input, computed in fp32 (or in a
caller-chosen ``compute_dtype``, e.g. float64 in the tests) and cast to the dtype
of ``x`` (or to ``out_dtype``). They are also the fallback when numba is missing or disabled, or the
dtype is one the numba kernels do not handle (fp16, ...). They are written for
clarity, not speed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "ACT_CODES",
    "activation",
    "input_mask",
    "sparse_input_gemv_ref",
    "sparse_output_gemv_ref",
    "gated_mlp_step_ref",
    "expert_mlp_step_ref",
]

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")
# the activation codes the numba kernels branch on
ACT_CODES = {"relu": 0, "silu": 1, "gelu_tanh": 2, "gelu": 3}


def activation(g: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(g)
    if act == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    if act == "gelu":
        return F.gelu(g)
    if act == "relu":
        return F.relu(g)
    raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")


def _threshold_tensor(threshold, n: int, device) -> torch.Tensor:
    """A python float, a 0-d tensor or a length-n tensor -> fp32 tensor (1 or n)."""
    if isinstance(threshold, torch.Tensor):
        t = threshold.detach().to(device=device, dtype=torch.float32)
        if t.dim() == 0:
            return t.reshape(1)
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(
                f"per-channel threshold must be 1-D of length {n}, got shape {tuple(t.shape)}"
            )
        return t
    t = float(threshold)
    if math.isnan(t):
        raise ValueError("threshold is NaN")
    return torch.tensor([t], dtype=torch.float32, device=device)


def input_mask(x: torch.Tensor, threshold) -> torch.Tensor:
    """Boolean mask |x_i| > t_i, compared in fp32 (the kernels compare the same way)."""
    t = _threshold_tensor(threshold, x.shape[-1], x.device)
    return x.float().abs() > t


def sparse_input_gemv_ref(x, wt, threshold, out=None, *, compute_dtype=torch.float32, out_dtype=None):
    """y = F.linear(x * (|x| > t), W) with ``wt`` = W^T (in x out); y has x's dtype."""
    mask = input_mask(x, threshold)
    xm = x.to(compute_dtype) * mask
    y = F.linear(xm, wt.to(compute_dtype).t())
    return _finish(y, out_dtype or x.dtype, out)


def _active_rows(active: torch.Tensor, m: int):
    """(bool mask of active rows, per-row scale or None) from a mask/index/value tensor."""
    if active.dtype == torch.bool:
        if active.shape != (m,):
            raise ValueError(f"active mask must have shape ({m},), got {tuple(active.shape)}")
        return active, None
    if not active.is_floating_point():
        idx = active.reshape(-1).long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= m):
            raise ValueError(f"active indices must be in [0, {m})")
        mask = torch.zeros(m, dtype=torch.bool, device=active.device)
        mask[idx] = True
        return mask, None
    if active.shape != (m,):
        raise ValueError(f"active values must have shape ({m},), got {tuple(active.shape)}")
    return active != 0, active.float()


def sparse_output_gemv_ref(x, w, active, out=None, *, compute_dtype=torch.float32, out_dtype=None):
    """Rows i of y = W x where active (others exactly 0).

    ``active``: a bool mask (out_features,), an integer tensor of row indices, or
    a float tensor of values v: rows with v_i != 0 are computed and multiplied by
    v_i (h = a * (W_up x) after a CATS gate)."""
    mask, scale = _active_rows(active, w.shape[0])
    y = F.linear(x.to(compute_dtype), w.to(compute_dtype))
    if scale is not None:
        y = y * scale.to(compute_dtype)
    y = torch.where(mask, y, torch.zeros((), dtype=compute_dtype))
    return _finish(y, out_dtype or x.dtype, out)


def gated_mlp_step_ref(
    x,
    w_gate,
    w_up,
    wt_down,
    threshold,
    act: str = "silu",
    out=None,
    *,
    return_active: bool = False,
    compute_dtype=torch.float32,
    out_dtype=None,
):
    """CATS/CHESS gated MLP for one token, dense on the masked activations:
    a = act(W_gate x); keep |a_i| > t_i; h = a * (W_up x) * keep; y = W_down h."""
    xc = x.to(compute_dtype)
    a = activation(F.linear(xc, w_gate.to(compute_dtype)), act)
    keep = input_mask(a, threshold)
    h = a * F.linear(xc, w_up.to(compute_dtype)) * keep
    y = F.linear(h, wt_down.to(compute_dtype).t())
    y = _finish(y, out_dtype or x.dtype, out)
    if return_active:
        return y, int(keep.sum())
    return y


def expert_mlp_step_ref(x, w_gate, w_up, wt_down, router_weight, router_bias, top_k: int, act: str = "silu",
                        out=None, *, return_chosen: bool = False, compute_dtype=torch.float32):
    """Expert-block gated MLP for one token, dense on the masked neurons: the top_k experts
    by ``router_weight x + router_bias``; expert e owns neurons [e*m, (e+1)*m), m = F / E;
    h = act(W_gate x) * (W_up x), zero outside the chosen experts; y = W_down h."""
    E = router_weight.shape[0]
    m = w_gate.shape[0] // E
    xc = x.to(compute_dtype)
    scores = F.linear(xc, router_weight.to(compute_dtype)) + router_bias.to(compute_dtype)
    chosen = torch.sort(scores.topk(top_k, dim=-1).indices, dim=-1).values
    keep = torch.zeros_like(scores).scatter_(-1, chosen, 1.0)
    h = activation(F.linear(xc, w_gate.to(compute_dtype)), act) * F.linear(xc, w_up.to(compute_dtype))
    h = h * keep.repeat_interleave(m, dim=-1)
    y = _finish(F.linear(h, wt_down.to(compute_dtype).t()), x.dtype, out)
    return (y, chosen) if return_chosen else y


def _finish(y, dtype, out):
    if out is None:
        return y.to(dtype)
    out.copy_(y)
    return out
