"""The true block-output error of masked linear inputs, for TEAL's greedy allocation.

:class:`BlockInputs` runs the dense model once on a few whole calibration sequences (token
ids kept by calibration, see :func:`~actsparse.sparsify.calibration.sequence_sample`) and
records, for every decoder layer, its input hidden states, the keyword arguments the model
passed it (rotary position embeddings, the causal or sliding-window mask, position ids) and
its dense output. :class:`BlockOutputError` re-runs the model's own decoder layer module on
that input with forward pre-hooks masking its linears' inputs, ``v -> v * (|v| > t_kind)``,
and returns the relative squared error of the block output, mean over tokens::

    E = mean_t ||y_sparse[t] - y[t]||^2 / ||y[t]||^2

``y`` the dense block output (the residual stream after the block, residual included). No
layer is re-implemented: whatever the architecture's layer does (GQA, q/k norms, Gemma's
sandwich norms and local/global attention) is what runs.

Memory: the hidden states of every layer on the sequences, ``layers x tokens x hidden`` in
the model's dtype (a layer's output is the next layer's input, the same tensor); for
SmolLM2-135M fp32 with 2 x 128 tokens: 30 x 256 x 576 x 4 B = 18 MB (+0.6 MB for the last
layer's output). One set is cached at a time.
"""
from __future__ import annotations

import torch
from torch import nn

from actsparse.errors import ConfigError, StateError

FAMILIES = ("llama", "gemma")  # site maps whose decoder layers run from (hidden_states, **kwargs)


def sequence_key(sequences: int, tokens: int) -> str:
    """Stats key of the calibration sequence sample (token ids) the block error runs on."""
    return f"calibration-sequences/{sequences}x{tokens}"


def check_family(smap) -> None:
    if smap.family not in FAMILIES:
        raise ConfigError(f"the block-output greedy error re-runs decoder layers of the {', '.join(FAMILIES)} "
                          f"site maps; this model's map is {smap.family!r}. Use greedy_error='linear'")


def _is_cache(value) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - every supported transformers has it
        return False
    return isinstance(value, Cache)


class BlockInputs:
    """Dense inputs, keyword arguments and outputs of every decoder layer on ``ids`` (m, T)."""

    def __init__(self, model: nn.Module, smap, ids: torch.Tensor):
        from actsparse.sparsify.api import is_sparsified

        check_family(smap)
        if is_sparsified(model):
            raise StateError("the block-output greedy error needs the dense model's block outputs; "
                             "call desparsify_(model) first")
        self.model, self.ids = model, ids
        blocks = model.get_submodule(smap.blocks_path)
        self.layers: list[nn.Module] = list(blocks)
        self.inputs: list = [None] * len(self.layers)
        self.outputs: list = [None] * len(self.layers)
        handles = []

        def pre(i):
            def hook(module, args, kwargs):
                kw = {k: v for k, v in kwargs.items() if not _is_cache(v)}
                x = args[0] if args else kw.pop("hidden_states")
                if "use_cache" in kw:
                    kw["use_cache"] = False
                self.inputs[i] = (x.detach(), tuple(a for a in args[1:]), kw)
            return hook

        def post(i):
            def hook(module, args, kwargs, output):
                self.outputs[i] = (output[0] if isinstance(output, tuple) else output).detach()
            return hook

        try:
            for i, layer in enumerate(self.layers):
                handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
                handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
            device = next((p.device for p in model.parameters()), None)
            with torch.no_grad():
                model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), use_cache=False,
                      logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        if any(v is None for v in self.inputs) or any(v is None for v in self.outputs):
            raise ConfigError(f"the dense pass did not run every decoder layer of {smap.blocks_path}: "
                              "the block-output greedy error cannot re-run them; use greedy_error='linear'")

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())


_LATEST: list = []  # [(model, ids, BlockInputs)]: one set at a time bounds the memory


def block_inputs(model: nn.Module, smap, ids: torch.Tensor) -> BlockInputs:
    """The :class:`BlockInputs` of ``model`` on ``ids``, cached (the latest set only)."""
    if _LATEST and _LATEST[0][0] is model and _LATEST[0][1] is ids:
        return _LATEST[0][2]
    _LATEST.clear()
    got = BlockInputs(model, smap, ids)
    _LATEST.append((model, ids, got))
    return got


class _Replay(nn.Module):
    """Stands in for a sublayer whose output for the present call is already known."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


class BlockOutputError:
    """``err(thresholds)``: the block-output error of layer ``layer`` of ``inputs`` with the
    inputs of ``readers[kind]`` (the block-relative paths of the linears reading kind's input)
    masked at ``thresholds[kind]``. ``attention``: the block-relative path of the attention
    sublayer, whose output is replayed when only the MLP's thresholds changed (an exact
    shortcut: its output does not depend on them)."""

    ATTENTION_KINDS = ("attn.q", "attn.o")

    def __init__(self, inputs: BlockInputs, layer: int, readers: dict[str, tuple[str, ...]], attention: str):
        self.layer = inputs.layers[layer]
        self.x, self.args, self.kwargs = inputs.inputs[layer]
        self.y = inputs.outputs[layer].float()
        self.ref = self.y.pow(2).sum(-1).clamp_min(1e-30)
        self.readers = {k: [self.layer.get_submodule(p) for p in paths] for k, paths in readers.items()}
        parent, _, self._attn_name = attention.rpartition(".")
        self._attn_parent = self.layer.get_submodule(parent) if parent else self.layer
        self._attn_out: dict[tuple, object] = {}  # attention thresholds -> its output (a few kept)

    @torch.no_grad()
    def __call__(self, thresholds: dict[str, float]) -> float:
        handles = []
        akey = tuple(float(thresholds.get(k, 0.0)) for k in self.ATTENTION_KINDS)
        attention = getattr(self._attn_parent, self._attn_name)
        replay = self._attn_out.get(akey)
        try:
            for kind, mods in self.readers.items():
                t = float(thresholds.get(kind, 0.0))
                if t > 0 and not (replay is not None and kind in self.ATTENTION_KINDS):
                    for m in mods:
                        handles.append(m.register_forward_pre_hook(
                            lambda mod, args, t=t: (args[0] * (args[0].abs() > t),) + tuple(args[1:])))
            if replay is not None:
                setattr(self._attn_parent, self._attn_name, _Replay(replay))
            else:
                handles.append(attention.register_forward_hook(lambda mod, args, out: self._keep(akey, out)))
            out = self.layer(self.x, *self.args, **self.kwargs)
        finally:
            for h in handles:
                h.remove()
            setattr(self._attn_parent, self._attn_name, attention)
        out = (out[0] if isinstance(out, tuple) else out).float()
        return float(((out - self.y).pow(2).sum(-1) / self.ref).mean())

    def _keep(self, key: tuple, out) -> None:
        if len(self._attn_out) >= 8:  # a greedy step needs the current and the candidates' few
            self._attn_out.pop(next(iter(self._attn_out)))
        self._attn_out[key] = out
