"""AWQ (activation-aware weight quantisation) from calibration rows: scale search and exact folds.

For each group of linears that read one input (q/k/v; o; gate/up; down) the per-input-channel
scale is ``s = mean|x|^alpha`` (normalised so that sqrt(max(s) min(s)) = 1), with ``alpha`` on
a grid of [0, 1] chosen to minimise the summed output MSE ``|Q(W s)(x / s) - W x|^2`` on the
calibration rows x (``alpha = 0`` is plain rounding, so the search never does worse than RTN
on those rows). The scale is then folded so that the fp model is unchanged:

- ``W' = W diag(s)`` for every linear of the group (its input columns), and
- the producer of the input is divided by s: the preceding RMSNorm's gain (q/k/v after the
  attention norm, gate/up after the MLP norm; a gain ``offset + w`` as in Gemma becomes
  ``(offset + w) / s``), the rows of v_proj for o_proj (with grouped-query attention the scale
  is tied across the query heads that share a kv head: one scale per v channel), or the rows
  of up_proj for down_proj (h = act(gate) * up is linear in up).

A group packed in the ``transposed`` layout (an input-sparse plan's) is skipped: there a scale of
input channel k multiplies row k of W^T, whole blocks, and block rounding is equivariant to that
(Q(W s) / s = Q(W)), so AWQ cannot lower its error; and a fold into a producer packed
transposed (v for o, up for down) is skipped too, since dividing its output rows by s changes
its own rounding (measured on SmolLM2 q4 + TEAL 50% before this rule: PPL 42.1 with AWQ
against 36.6 with RTN). A fold is made only where it is exact; other groups (fused qkv / gate_up projections, an MLP
without a gate, attention whose v/o shapes do not match the head layout, norms with a bias)
are left unscaled and recorded with the reason. Groups are processed in data-flow order per
layer (q/k/v, o, gate/up, down): each search sees the weights as the earlier folds left them,
and the rows captured on the original model are still the group's input (a fold changes only
the group's own input, by 1/s, which the loss accounts for).
"""
from __future__ import annotations

import torch
from torch import nn

from actsparse.kernels.quant_formats import TRANSPOSED, quantize_weight

GROUPS = (("attn.qkv", ("attn.q", "attn.k", "attn.v")), ("attn.o", ("attn.o",)),
          ("mlp.gate_up", ("mlp.gate", "mlp.up")), ("mlp.down", ("mlp.down",)))


def input_key(smap, layer: int, roles) -> str:
    """The calibration key of a group's input rows (its first linear's input)."""
    return f"{smap.module_path(layer, roles[0])}:input"


def calibration_keys(smap) -> list[tuple[str, str]]:
    """(key, module path) of every group input the search needs, every layer."""
    out = []
    for layer in range(smap.num_layers):
        for _, roles in GROUPS:
            if all(r in smap.roles for r in roles):
                out.append((input_key(smap, layer, roles), smap.module_path(layer, roles[0])))
    return out


def _fake_quant(w: torch.Tensor, fmt: str, layout: str) -> torch.Tensor:
    return quantize_weight(w, fmt, layout).dequantize()


def _normalise(s: torch.Tensor) -> torch.Tensor:
    return s / torch.sqrt(s.max() * s.min())


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], layouts: list[str], x: torch.Tensor, fmt: str, grid: int,
                 tie=None) -> dict:
    """Best alpha for linears ``weights`` (out x in, fp32) reading rows ``x`` (n x in).
    ``tie``: (groups, width) when channels c = g * width + d of one kv head share a scale
    (the scale has groups * width entries per kv head replicated); returns the scale over the
    input channels and, with ``tie``, the per-kv-channel scale too."""
    x = x.to(torch.float32)
    mean = x.abs().mean(0).clamp_min(1e-4)
    y = [x @ w.t() for w in weights]
    norm = sum(float(t.pow(2).sum()) for t in y) or 1.0
    best = None
    for i in range(grid):
        alpha = i / (grid - 1)
        base = mean
        if tie is not None:
            kv, rep, hd = tie
            base = mean.view(kv, rep, hd).mean(1)  # one statistic per v channel
        s_small = _normalise(base.pow(alpha))
        s = s_small if tie is None else s_small.view(kv, 1, hd).expand(kv, rep, hd).reshape(-1)
        err = 0.0
        for w, lay, yr in zip(weights, layouts, y):
            wq = _fake_quant(w * s, fmt, lay) / s
            err += float((x @ wq.t() - yr).pow(2).sum())
        if i == 0:
            rtn = err
        if best is None or err < best[0]:
            best = (err, alpha, s, s_small)
    err, alpha, s, s_small = best
    rows = x.shape[0] * sum(w.shape[0] for w in weights)
    return {"alpha": alpha, "scale": s, "producer_scale": s_small.reshape(-1), "mse_rtn": rtn / rows, "mse": err / rows,
            "rel_err_rtn": rtn / norm, "rel_err": err / norm}


def _attention_tie(model, v: nn.Linear, o: nn.Linear):
    """(kv heads, query heads per kv head, head dim) when o's input is the per-head attention
    output of v's channels; None when the shapes do not say so."""
    cfg = getattr(model, "config", None)
    nh = getattr(cfg, "num_attention_heads", None)
    nkv = getattr(cfg, "num_key_value_heads", None) or nh
    if not nh or not nkv or nh % nkv:
        return None
    hd = getattr(cfg, "head_dim", None) or (o.in_features // nh)
    if o.in_features != nh * hd or v.out_features != nkv * hd:
        return None
    return nkv, nh // nkv, hd


def _fold_norm(norm: nn.Module, s: torch.Tensor, offset: float) -> str | None:
    """Divide a norm's gain by s in place; a reason string when that is not exact."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.shape != s.shape:
        return f"{type(norm).__name__} has no per-channel gain of width {s.numel()}"
    if getattr(norm, "bias", None) is not None:
        return f"{type(norm).__name__} has a bias"
    w.data = ((offset + w.data.float()) / s - offset).to(w.dtype)
    return None


@torch.no_grad()
def search_and_fold(model: nn.Module, smap, rows: dict, fmt: str, layouts: dict, grid: int,
                    input_scales: dict | None = None) -> dict:
    """Search every group's scale and fold it into the fp model (in place; the model computes
    the same function afterwards, up to fp rounding). ``rows``: calibration key -> (n, in) rows;
    ``layouts``: module path -> layout it will be packed in. Returns {group name: record};
    ``input_scales``, if given, is filled with module path -> s of each scaled linear (it reads
    x / s where the model before the folds read x)."""
    records = {}
    for layer in range(smap.num_layers):
        for group, roles in GROUPS:
            name = f"{smap.blocks_path}.{layer}.{group}"
            if not all(r in smap.roles for r in roles):
                if group == "attn.qkv" and "attn.qkv" in smap.roles or group == "mlp.gate_up" and "mlp.gate_up" in smap.roles:
                    records[name] = {"skipped": "fused projection: no exact fold implemented"}
                continue
            paths = [smap.module_path(layer, r) for r in roles]
            lins = [model.get_submodule(p) for p in paths]
            if not all(type(m) is nn.Linear for m in lins):
                records[name] = {"skipped": "not plain nn.Linear modules"}
                continue
            key = input_key(smap, layer, roles)
            x = rows.get(key)
            if x is None:
                records[name] = {"skipped": f"no calibration rows at {key}"}
                continue
            # the producer the scale folds into
            tie, producer, reason = None, None, None
            if group == "attn.qkv":
                producer = ("norm", smap.module_path(layer, "norm.attn")) if "norm.attn" in smap.norms else None
                reason = None if producer else "no norm before attention"
            elif group == "mlp.gate_up":
                producer = ("norm", smap.module_path(layer, "norm.mlp")) if "norm.mlp" in smap.norms else None
                reason = None if producer else "no norm before the MLP"
            elif group == "attn.o":
                v_path = smap.module_path(layer, "attn.v")
                tie = _attention_tie(model, model.get_submodule(v_path), lins[0])
                producer = ("rows", v_path) if tie else None
                reason = None if tie else "v/o shapes do not match the head layout"
            else:  # mlp.down
                if smap.gated and "mlp.up" in smap.roles:
                    producer = ("rows", smap.module_path(layer, "mlp.up"))
                else:
                    reason = "no linear gated product before down (the activation is not scale-equivariant)"
            if producer and producer[0] == "rows" and type(model.get_submodule(producer[1])) is not nn.Linear:
                producer, reason = None, f"{producer[1]} is not a plain nn.Linear"
            if producer and producer[0] == "norm":
                norm = model.get_submodule(producer[1])
                w = getattr(norm, "weight", None)
                if not isinstance(w, torch.Tensor) or w.numel() != lins[0].in_features or getattr(norm, "bias", None) is not None:
                    producer, reason = None, f"{producer[1]} is not a bias-free per-channel gain"
            if producer is None:
                records[name] = {"skipped": reason}
                continue
            transposed = [p for p in paths if layouts.get(p) == TRANSPOSED]
            if transposed:
                records[name] = {"skipped": f"{transposed[0]} is packed transposed: a per-input-channel scale "
                                            "multiplies whole blocks there, which rounding is equivariant to"}
                continue
            if producer[0] == "rows" and layouts.get(producer[1]) == TRANSPOSED:
                records[name] = {"skipped": f"the producer {producer[1]} is packed transposed: dividing its output "
                                            "rows by s would change its own rounding, which the search does not see"}
                continue
            ws = [m.weight.detach().float() for m in lins]
            r = search_scale(ws, [layouts[p] for p in paths], x, fmt, grid, tie=tie)
            s, s_small = r["scale"], r["producer_scale"]
            for path, m in zip(paths, lins):
                m.weight.data = (m.weight.data.float() * s).to(m.weight.dtype)
                if input_scales is not None:
                    input_scales[path] = s.clone()
            if producer[0] == "norm":
                _fold_norm(model.get_submodule(producer[1]), s, smap.norm_offset)
            else:
                p = model.get_submodule(producer[1])
                p.weight.data = (p.weight.data.float() / s_small[:, None]).to(p.weight.dtype)
                if p.bias is not None:
                    p.bias.data = (p.bias.data.float() / s_small).to(p.bias.dtype)
            records[name] = {"alpha": r["alpha"], "folded_into": producer[1], "linears": paths,
                             "mse_rtn": r["mse_rtn"], "mse": r["mse"], "rel_err_rtn": r["rel_err_rtn"],
                             "rel_err": r["rel_err"], "rows": int(x.shape[0])}
    return records
