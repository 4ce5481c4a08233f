"""ReLU-balance regulariser (Fast Certified Robust Training, uncertified variant).

Per ReLU layer, from its pre-activations z: the mean magnitude and the variance of the
active (z > 0) and inactive (z < 0) entries, ratios folded to ``min(r, 1/r)`` (r_m, r_v;
the same definitions as :func:`actsparse.measure.metrics.relu_balance`), and

    loss_layer = (relu(tau - r_m) + relu(tau - r_v)) / tau,    tau = 0.5

averaged over layers. Computed differentiably from the pre-activations (the certified
original uses interval bounds instead). Its weight decays linearly to 0 over the warm-up:
``LinearDecay(initial, warmup_steps)`` from :mod:`actsparse.train.schedule`.

    reg = ReLUBalance(model)                    # sites: mlp.act:input (the pre-activations)
    with reg:
        out = model(**batch, labels=labels)
        loss = out.loss + reg.weight(step) * reg.loss
"""
from __future__ import annotations

import torch
from torch import nn

from actsparse.measure.capture import SiteSpec
from actsparse.train.losses import GraphHooks, rows_and_mask
from actsparse.train.schedule import LinearDecay


def _fold(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if float(a.detach()) <= 0 or float(b.detach()) <= 0:
        return a * 0.0 + b * 0.0
    return torch.minimum(a / b, b / a)


def balance_ratios(z: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_m, r_v) of one layer's pre-activations ``z`` (0 when one side is empty)."""
    rows, _ = rows_and_mask(z, mask)
    z = rows.reshape(-1)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    pos, neg = z > 0, z < 0
    n_pos, n_neg = pos.sum(), neg.sum()
    if int(n_pos) == 0 or int(n_neg) == 0:
        zero = z.sum() * 0.0
        return zero, zero
    zp = torch.where(pos, z, torch.zeros_like(z))
    zn = torch.where(neg, z, torch.zeros_like(z))
    m_pos = zp.sum() / n_pos
    m_neg = zn.sum() / n_neg
    v_pos = (torch.where(pos, (z - m_pos) ** 2, torch.zeros_like(z))).sum() / n_pos
    v_neg = (torch.where(neg, (z - m_neg) ** 2, torch.zeros_like(z))).sum() / n_neg
    return _fold(m_pos, m_neg.abs()), _fold(v_pos, v_neg)


def balance_loss(preacts: list[torch.Tensor], tau: float = 0.5, masks: list | None = None) -> torch.Tensor:
    """``mean over layers of (relu(tau - r_m) + relu(tau - r_v)) / tau``."""
    if not preacts:
        raise ValueError("balance_loss needs at least one pre-activation tensor")
    terms = []
    for i, z in enumerate(preacts):
        r_m, r_v = balance_ratios(z, None if masks is None else masks[i])
        terms.append((torch.relu(tau - r_m) + torch.relu(tau - r_v)) / tau)
    return torch.stack(terms).mean()


class ReLUBalance(GraphHooks):
    """Collect the pre-activations of ReLU layers during forward; ``.loss`` is the balance
    regulariser of the last forward (with graph).

    Args:
        sites: pre-activation sites; default ``mlp.act:input`` (the input of each MLP
            activation; for a gated MLP that is the gate projection's output).
        tau: target ratio (0.5).
        initial, warmup_steps: the weight ``initial * max(0, 1 - step / warmup_steps)``.
    """

    def __init__(self, model: nn.Module, sites: SiteSpec = "mlp.act:input", *, tau: float = 0.5,
                 initial: float = 0.5, warmup_steps: int = 1000):
        super().__init__(model, sites)
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.weight = LinearDecay(initial, warmup_steps)

    def _reset(self) -> None:
        self._z: list[torch.Tensor] = []
        self._masks: list = []

    def _on_tensor(self, name: str, t: torch.Tensor) -> None:
        self._z.append(t)
        self._masks.append(self.mask)

    @property
    def loss(self) -> torch.Tensor:
        if not self._z:
            return torch.zeros(())
        return balance_loss(self._z, self.tau, self._masks)
