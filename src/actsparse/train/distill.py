"""Distillation loss on logits: ``KL(teacher || student)`` per real token.

    loss = kl_on_logits(student_logits, teacher_logits, attention_mask, temperature=1.0)

``sum_v p_t(v) (log p_t(v) - log p_s(v))`` with ``p = softmax(logits / T)``, averaged over the
positions whose mask is 1 (padding never counts) and multiplied by ``T**2`` (Hinton et al.:
the gradient scale then does not depend on T). Computed in fp32 whatever the logits' dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from actsparse.errors import ConfigError


def kl_on_logits(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None, *,
                 temperature: float = 1.0) -> torch.Tensor:
    """Mean over real tokens of ``KL(softmax(teacher / T) || softmax(student / T)) * T**2``.

    ``student`` and ``teacher``: (..., vocab) logits of the same shape; ``mask``: the leading
    shape (1 = real token), or None for every position."""
    if student.shape != teacher.shape:
        raise ConfigError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    if mask is None:
        return per_token.mean() * temperature ** 2
    valid = mask.to(per_token.device).bool()
    if tuple(valid.shape) != tuple(per_token.shape):
        raise ConfigError(f"mask {tuple(valid.shape)} does not match the logits' leading shape {tuple(per_token.shape)}")
    n = valid.sum()
    if int(n) == 0:
        return per_token.sum() * 0.0
    return per_token[valid].sum() / n * temperature ** 2
