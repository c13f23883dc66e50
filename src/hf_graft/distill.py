"""The Cultivation (grafting+): distillation from the averaged softmax of frozen teachers.

SPEC section 6 / paper eqs. 8-12. Pure torch: no Trainer imports.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "averaged_teacher_probs"]


def _stack_teachers(teacher_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(teacher_logits, torch.Tensor):
        if teacher_logits.ndim == 2:  # a single teacher given as [B, C]
            return teacher_logits.unsqueeze(0)
        return teacher_logits
    if len(teacher_logits) == 0:
        raise ValueError("teacher_logits: need at least one teacher's logits")
    return torch.stack(list(teacher_logits))


def averaged_teacher_probs(teacher_logits, temperature: float = 2.0) -> torch.Tensor:
    """`pbar = 1/M sum_m softmax(z_m / tau)` in float32, shape [B, C] (eq. 12)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    stacked = _stack_teachers(teacher_logits).float()
    return torch.softmax(stacked / temperature, dim=-1).mean(dim=0)


def kd_loss(student_logits: torch.Tensor, teacher_logits, temperature: float = 2.0) -> torch.Tensor:
    """`tau^2 * mean_batch( sum_k pbar_k * -log_softmax(student / tau)_k )` (eq. 11, batch-averaged).

    `teacher_logits` is a list of M tensors [B, C] or one [M, B, C] tensor. Computed in float32
    (log_softmax is shift-invariant, so large logits cannot overflow), whatever autocast is active.
    """
    pbar = averaged_teacher_probs(teacher_logits, temperature)
    if pbar.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits give probabilities of shape {tuple(pbar.shape)}, "
            f"student_logits has shape {tuple(student_logits.shape)}"
        )
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
        return (temperature**2) * -(pbar * log_p).sum(dim=-1).mean()
