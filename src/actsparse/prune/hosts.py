"""Host pruners built on ``torch.nn.utils.prune``.

A host scores every surviving weight of the prunable parameters (``weight`` of Linear
and Conv modules by default; biases and normalisation parameters are never prunable)
and removes the ``k`` lowest-importance survivors *globally* across layers. Masks are
applied with ``prune.custom_from_mask``, so they compose through ``PruningContainer``
(a pruned weight is never revived), live in ``<name>_orig`` / ``<name>_mask`` and are
made permanent with ``prune.remove``.

Counting: ``amount`` is either an int (exact count) or a float fraction of the
*currently surviving* weights, rounded down: ``k = floor(amount * survivors)``.
Ties: among equal importances the weight with the smaller global flat index is pruned
first (parameters in ``parameters`` order, each flattened row-major).

Hosts (registry ``HOSTS``, look-up ``get_host(name)``):

- ``magnitude``: importance ``|w|`` (global magnitude; one-shot in the experiment).
- ``imp``: the same score, flagged ``rewind=True``: iterative magnitude pruning with
  rewinding to the initial (or an early-iteration) weights, lottery-ticket style.
- ``random``: importance from a seeded uniform draw.
- ``snip``: importance ``|g * w|``, ``g = dL/dw`` on one batch.
- ``grasp``: score ``S = -w * (H g)`` (Hessian-gradient product by double backward,
  logits divided by a temperature ``T``); the weights with the *highest* ``S`` are removed.
- ``synflow``: data-free. All parameters replaced by their absolute values (in
  float64, eval mode), input all ones, ``R = sum(net(1))``, importance ``|dR/dw * w|``;
  applied over ``rounds`` rounds with an exponential schedule (after round j the
  survivors are ``S0 * (1 - amount) ** (j / rounds)``), re-scoring every round.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from actsparse.errors import ConfigError

# modules whose ``weight`` is prunable; biases and normalisation parameters never are
PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

Param = tuple[nn.Module, str]


# --------------------------------------------------------------------------- params


def prunable_parameters(model: nn.Module) -> list[Param]:
    """``(module, "weight")`` for every Linear/Conv module, in ``named_modules`` order."""
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]


def resolve_parameters(model: nn.Module, parameters: Sequence[Param] | None = None) -> list[Param]:
    """Validate the parameters to prune; raise ``ConfigError`` when there are none or a
    bias / normalisation parameter is among them."""
    params = list(parameters) if parameters is not None else prunable_parameters(model)
    if not params:
        raise ConfigError("the model has no prunable weights (no Linear/Conv 'weight' found); "
                          "pass parameters=[(module, 'weight'), ...] explicitly")
    for m, n in params:
        if isinstance(m, NORM_TYPES):
            raise ConfigError(f"normalisation parameters are never pruned: {type(m).__name__}.{n}")
        if n.startswith("bias") or "bias" in n:
            raise ConfigError(f"biases are never pruned: {type(m).__name__}.{n}")
        if not hasattr(m, n):
            raise ConfigError(f"{type(m).__name__} has no parameter {n!r}")
    return params


def ensure_pruned(params: Iterable[Param]) -> None:
    """Put every parameter under prune's reparametrisation (identity mask if not yet pruned)."""
    for m, n in params:
        if not prune.is_pruned(m) or not hasattr(m, n + "_mask"):
            prune.identity(m, n)


def leaf(m: nn.Module, n: str) -> torch.Tensor:
    """The trainable tensor: ``<n>_orig`` when pruned, else ``<n>``."""
    return getattr(m, n + "_orig") if hasattr(m, n + "_orig") else getattr(m, n)


def current_mask(m: nn.Module, n: str) -> torch.Tensor:
    mask = getattr(m, n + "_mask", None)
    if mask is None:
        return torch.ones_like(getattr(m, n))
    return mask.detach().clone()


def effective_weight(m: nn.Module, n: str) -> torch.Tensor:
    """``orig * mask`` (what the forward uses), detached."""
    return (leaf(m, n).detach() * current_mask(m, n)).clone()


def count_surviving(params: Iterable[Param]) -> int:
    return int(sum(int(current_mask(m, n).sum().item()) for m, n in params))


def count_total(params: Iterable[Param]) -> int:
    return int(sum(leaf(m, n).numel() for m, n in params))


def resolve_count(amount: float | int, survivors: int, what: str = "amount") -> int:
    """int -> exact count; float in [0, 1] -> ``floor(amount * survivors)``."""
    if isinstance(amount, bool):
        raise ConfigError(f"{what} must be a number, got {amount!r}")
    if isinstance(amount, int):
        if amount < 0 or amount > survivors:
            raise ConfigError(f"{what}={amount} must be between 0 and the {survivors} surviving weights")
        return amount
    amount = float(amount)
    if not 0.0 <= amount <= 1.0 or math.isnan(amount):
        raise ConfigError(f"{what}={amount} must be a fraction in [0, 1]")
    # tiny epsilon so 0.2 * 1000 = 199.99999 still gives 200
    return int(math.floor(amount * survivors + 1e-9))


# --------------------------------------------------------------------------- selection


def select_lowest(scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], k: int,
                  eligible: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """New masks with the ``k`` lowest-score eligible survivors set to 0.

    Survivors are ``mask == 1`` (and ``eligible`` where given). Ties are broken by the
    global flat index (parameters in order, row-major): the smaller index goes first.
    Raises if fewer than ``k`` weights are eligible. Never sets a 0 back to 1.
    """
    flat_s = torch.cat([s.detach().reshape(-1).to(torch.float64) for s in scores])
    flat_m = torch.cat([m.reshape(-1) for m in masks]) > 0
    ok = flat_m.clone()
    if eligible is not None:
        ok &= torch.cat([e.reshape(-1).bool() for e in eligible])
    cand = torch.nonzero(ok, as_tuple=False).reshape(-1)  # ascending flat index
    if k > cand.numel():
        raise ConfigError(f"asked to prune {k} weights but only {cand.numel()} are eligible")
    s = flat_s[cand]
    if torch.isnan(s).any():
        raise ConfigError("importance scores contain NaN")
    order = torch.sort(s, stable=True).indices  # stable: equal scores keep flat-index order
    drop = cand[order[:k]]
    new = flat_m.to(masks[0].dtype if masks[0].is_floating_point() else torch.float32)
    new[drop] = 0
    out, i = [], 0
    for m in masks:
        out.append(new[i:i + m.numel()].reshape(m.shape).to(m.dtype).clone())
        i += m.numel()
    return out


def apply_masks(params: Sequence[Param], masks: Sequence[torch.Tensor]) -> None:
    """Apply (compose) masks through ``prune.custom_from_mask``."""
    for (m, n), mask in zip(params, masks):
        prune.custom_from_mask(m, n, mask=mask)


@contextlib.contextmanager
def frozen_buffers(model: nn.Module):
    """Restore every buffer (BatchNorm running stats...) and the train/eval mode on exit."""
    saved = {k: v.detach().clone() for k, v in model.named_buffers()}
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in saved:
                    v.copy_(saved[k])
        for m, t in modes.items():
            m.training = t


# --------------------------------------------------------------------------- hosts


@dataclass
class PruneResult:
    host: str
    pruned: int
    survivors_before: int
    survivors_after: int
    total: int


class Host:
    """Base class: subclasses define ``importance`` (higher = keep)."""

    name = "base"
    needs_data = False
    rewind = False  # lottery-ticket rewinding after each cycle (experiment runner)
    score_at = "trained"  # "trained": score the trained weights; "init": score at the rewind point

    def importance(self, model: nn.Module, params: Sequence[Param], batch=None) -> list[torch.Tensor]:
        raise NotImplementedError

    def _check_batch(self, batch):
        if self.needs_data and batch is None:
            raise ConfigError(f"host {self.name!r} needs a batch (inputs, targets) to score weights")

    def prune(self, model: nn.Module, amount: float | int, *, parameters: Sequence[Param] | None = None,
              batch=None) -> PruneResult:
        """Prune ``amount`` of the surviving weights globally (see module docstring)."""
        params = resolve_parameters(model, parameters)
        ensure_pruned(params)
        self._check_batch(batch)
        before = count_surviving(params)
        k = resolve_count(amount, before)
        if k > 0:
            masks = [current_mask(m, n) for m, n in params]
            scores = self.importance(model, params, batch)
            apply_masks(params, select_lowest(scores, masks, k))
        return PruneResult(self.name, k, before, count_surviving(params), count_total(params))

    def __call__(self, model, amount, **kw) -> PruneResult:
        return self.prune(model, amount, **kw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Magnitude(Host):
    name = "magnitude"

    def importance(self, model, params, batch=None):
        return [effective_weight(m, n).abs() for m, n in params]


class IMP(Magnitude):
    name = "imp"
    rewind = True


class Random(Host):
    name = "random"
    rewind = True

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.calls = 0

    def importance(self, model, params, batch=None):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.calls)
        self.calls += 1
        return [torch.rand(leaf(m, n).shape, generator=g) for m, n in params]

    def __repr__(self):
        return f"Random(seed={self.seed})"


def _loss(model, batch, loss_fn=None, temperature: float = 1.0):
    x, y = batch
    out = model(x) / temperature
    return (loss_fn or F.cross_entropy)(out, y)


def snip_scores(model: nn.Module, params: Sequence[Param], batch, loss_fn=None) -> list[torch.Tensor]:
    """``|dL/dw * w|`` on one batch (``w`` = the effective weight; gradient w.r.t. it)."""
    ensure_pruned(params)
    leaves = [leaf(m, n) for m, n in params]
    with frozen_buffers(model):
        model.train()
        loss = _loss(model, batch, loss_fn)
        grads = torch.autograd.grad(loss, leaves)
    return [(g * effective_weight(m, n)).abs().detach() for g, (m, n) in zip(grads, params)]


def grasp_scores(model: nn.Module, params: Sequence[Param], batch, loss_fn=None,
                 temperature: float = 200.0) -> list[torch.Tensor]:
    """GraSP ``S = -w * (H g)`` w.r.t. the surviving weights (pruned entries are held at 0).

    ``g = dL/dw``; ``Hg = d/dw (g_fixed . dL/dw)`` by double backward. The loss uses
    logits / ``temperature`` (200 in the GraSP paper's code). High ``S`` = prune first.
    """
    ensure_pruned(params)
    leaves = [leaf(m, n) for m, n in params]
    with frozen_buffers(model):
        model.train()
        g = [t.detach() for t in torch.autograd.grad(_loss(model, batch, loss_fn, temperature), leaves)]
        grads = torch.autograd.grad(_loss(model, batch, loss_fn, temperature), leaves, create_graph=True)
        z = sum((gi * gf).sum() for gi, gf in zip(grads, g))
        hg = torch.autograd.grad(z, leaves)
    return [(-effective_weight(m, n) * h).detach() for h, (m, n) in zip(hg, params)]


class SNIP(Host):
    name = "snip"
    needs_data = True
    rewind = True
    score_at = "init"

    def __init__(self, loss_fn: Callable | None = None):
        self.loss_fn = loss_fn

    def importance(self, model, params, batch=None):
        return snip_scores(model, params, batch, self.loss_fn)


class GraSP(Host):
    name = "grasp"
    needs_data = True
    rewind = True
    score_at = "init"

    def __init__(self, temperature: float = 200.0, loss_fn: Callable | None = None):
        self.temperature = temperature
        self.loss_fn = loss_fn

    def importance(self, model, params, batch=None):
        return [-s for s in grasp_scores(model, params, batch, self.loss_fn, self.temperature)]


def synflow_scores(model: nn.Module, params: Sequence[Param], masks: Sequence[torch.Tensor] | None = None,
                   input_shape: Sequence[int] | None = None) -> list[torch.Tensor]:
    """SynFlow ``|dR/dw * w|``: data-free, on a float64 copy with ``|params|``, input all ones.

    ``masks`` overrides the current masks (used between SynFlow's own rounds).
    ``input_shape`` defaults to ``model.input_shape``.
    """
    shape = tuple(input_shape or getattr(model, "input_shape", ()) or ())
    if not shape:
        raise ConfigError("synflow needs the input shape: set model.input_shape or pass input_shape=")
    index = {id(m): i for i, m in enumerate(model.modules())}
    with torch.no_grad():  # prune's cached ``weight`` may be a graph node, which deepcopy refuses
        for m, n in params:
            if hasattr(m, n + "_orig") and hasattr(m, n + "_mask"):
                setattr(m, n, getattr(m, n + "_orig") * getattr(m, n + "_mask"))
    twin = copy.deepcopy(model).double().eval()
    tmods = list(twin.modules())
    tparams = [(tmods[index[id(m)]], n) for m, n in params]
    ensure_pruned(tparams)
    with torch.no_grad():
        for p in twin.parameters():
            p.abs_()
        for name, b in twin.named_buffers():
            if not name.endswith("_mask") and b.is_floating_point():
                b.abs_()
        if masks is not None:
            for (m, n), mk in zip(tparams, masks):
                getattr(m, n + "_mask").copy_(mk)
    leaves = [leaf(m, n) for m, n in tparams]
    r = twin(torch.ones((1, *shape), dtype=torch.float64)).sum()
    grads = torch.autograd.grad(r, leaves)
    return [(g * effective_weight(m, n)).abs().detach().to(torch.float64)
            for g, (m, n) in zip(grads, tparams)]


class SynFlow(Host):
    name = "synflow"
    rewind = True
    score_at = "init"

    def __init__(self, rounds: int = 100, input_shape: Sequence[int] | None = None):
        if rounds < 1:
            raise ConfigError(f"synflow rounds must be >= 1, got {rounds}")
        self.rounds = rounds
        self.input_shape = input_shape

    def __repr__(self):
        return f"SynFlow(rounds={self.rounds})"

    def prune(self, model, amount, *, parameters=None, batch=None) -> PruneResult:
        """Data-free: ``batch`` is ignored. Prunes in ``rounds`` exponential steps."""
        params = resolve_parameters(model, parameters)
        ensure_pruned(params)
        before = count_surviving(params)
        k = resolve_count(amount, before)
        target = before - k
        masks = [current_mask(m, n) for m, n in params]
        alive = before
        if k > 0:
            for j in range(1, self.rounds + 1):
                keep = target if j == self.rounds else max(target, int(math.floor(before * (target / before) ** (j / self.rounds))))
                if keep >= alive:
                    continue
                scores = synflow_scores(model, params, masks, self.input_shape)
                masks = select_lowest(scores, masks, alive - keep)
                alive = keep
            apply_masks(params, masks)
        return PruneResult(self.name, k, before, count_surviving(params), count_total(params))


HOSTS: dict[str, type[Host]] = {
    "magnitude": Magnitude,
    "imp": IMP,
    "random": Random,
    "snip": SNIP,
    "grasp": GraSP,
    "synflow": SynFlow,
}


def get_host(name: str, **kwargs) -> Host:
    """Instantiate the host registered as ``name`` (kwargs go to its constructor)."""
    try:
        cls = HOSTS[name]
    except KeyError:
        raise ConfigError(f"unknown host {name!r}; valid hosts: {', '.join(HOSTS)}") from None
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad options for host {name!r}: {err}") from None


def register_host(name: str, cls: type[Host]) -> None:
    """Add a custom host (a ``Host`` subclass) to the registry."""
    HOSTS[name] = cls
