"""Per-layer routers: from the MLP's input, predict the experts a token needs.

Labels come from the true activation mass: ``mass[t, e] = sum |h[t, i]|`` over expert e's
neurons of the down projection's input; the oracle's experts for a token are its top-k by
mass. A router is one linear layer (hidden -> experts) fitted in closed form by ridge
regression of ``log mass`` on the standardised MLP input: the experts with the largest
predicted log-mass are chosen, so one router serves every top-k. Closed form because it is
deterministic and takes milliseconds; on SmolLM2 it also recalled more of the oracle's
experts than a logistic router trained with Adam on the top-k indicators (0.805 against 0.735
on validation, E = 16, k = 8), and than ridge on the indicators or on the mass shares (0.80).
"""
from __future__ import annotations

import torch

LOG_FLOOR = 1e-6  # mass floor before the log (an expert whose neurons are all ~0)


def expert_mass(h: torch.Tensor, perm: torch.Tensor, experts: int) -> torch.Tensor:
    """(rows, experts): the sum of |h| over each expert's neurons (``perm``: new -> old neuron)."""
    a = h.abs().to(torch.float32)[:, perm]
    return a.reshape(a.shape[0], experts, -1).sum(-1)


def topk_indicator(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 float of each row's k largest entries."""
    return torch.zeros_like(scores, dtype=torch.float32).scatter_(1, scores.topk(k, dim=1).indices, 1.0)


def train_router(x: torch.Tensor, mass: torch.Tensor, *, ridge: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``x @ W.T + b ~ log(mass)`` by ridge regression (``ridge``: the penalty per token on
    the standardised inputs). Returns (W, b) in fp32, on the raw (unstandardised) inputs."""
    x = x.detach().to(torch.float64)
    y = mass.detach().to(torch.float64).clamp_min(LOG_FLOOR).log()
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"need matching rows of inputs and masses (at least 2), got {x.shape[0]} and {y.shape[0]}")
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    gram = z.T @ z + ridge * x.shape[0] * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, z.T @ (y - y.mean(0))).T / sd
    b = y.mean(0) - w @ mu
    return w.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()


def recall(chosen: torch.Tensor, mass: torch.Tensor, top_k: int) -> dict:
    """How well ``chosen`` (rows, k) expert indices cover the oracle: ``recall`` = mean share of
    the oracle's top-k experts chosen; ``mass_recall`` = the chosen experts' |h| mass over the
    oracle top-k's mass (1 = as good as the oracle)."""
    oracle = topk_indicator(mass, top_k)
    picked = torch.zeros_like(oracle).scatter_(1, chosen, 1.0)
    hit = float((oracle * picked).sum() / oracle.sum())
    got = (mass * picked).sum(1)
    best = (mass * oracle).sum(1).clamp_min(1e-30)
    return {"recall": hit, "mass_recall": float((got / best).mean()),
            "mass_share": float((got / mass.sum(1).clamp_min(1e-30)).mean())}
