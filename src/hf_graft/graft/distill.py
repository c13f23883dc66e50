"""The Cultivation (grafting+): distillation from the averaged softmax of frozen teachers.

docs/method.md §9 / paper eqs. 8-12. Pure torch: no Trainer imports.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "averaged_teacher_probs", "at_least_float32"]


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half precision up to float32 for losses; float32 and float64 as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _stack_teachers(teacher_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """[M, B, C] in at least float32, detached: teachers are frozen, no gradient ever reaches them."""
    if isinstance(teacher_logits, torch.Tensor):
        stacked = teacher_logits.unsqueeze(0) if teacher_logits.ndim == 2 else teacher_logits  # one [B, C] teacher
    else:
        if len(teacher_logits) == 0:
            raise ValueError("teacher_logits: need at least one teacher's logits")
        stacked = torch.stack(list(teacher_logits))
    if stacked.ndim != 3:
        raise ValueError(
            f"teacher_logits: expected M tensors [B, C] or one [M, B, C] tensor, got shape {tuple(stacked.shape)}"
        )
    return at_least_float32(stacked.detach())


def averaged_teacher_probs(teacher_logits, temperature: float = 2.0) -> torch.Tensor:
    """`pbar = 1/M sum_m softmax(z_m / tau)` in float32, shape [B, C] (eq. 12), without gradient."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    stacked = _stack_teachers(teacher_logits)
    with torch.autocast(device_type=stacked.device.type, enabled=False):
        return torch.softmax(stacked / temperature, dim=-1).mean(dim=0)


def kd_loss(student_logits: torch.Tensor, teacher_logits, temperature: float = 2.0) -> torch.Tensor:
    """`tau^2 * mean_batch( sum_k pbar_k * -log_softmax(student / tau)_k )` (eq. 11, batch-averaged).

    `teacher_logits` is a list of M tensors [B, C] or one [M, B, C] tensor (or one [B, C]); they
    are detached, so the gradient reaches the student only. Computed in float32 (softmax and
    log_softmax subtract the max, so large logits cannot overflow), whatever autocast is active.
    """
    pbar = averaged_teacher_probs(teacher_logits, temperature)  # checks temperature > 0
    if pbar.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits give probabilities of shape {tuple(pbar.shape)}, "
            f"student_logits has shape {tuple(student_logits.shape)}"
        )
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p = F.log_softmax(at_least_float32(student_logits) / temperature, dim=-1)
        return (temperature**2) * -(pbar * log_p).sum(dim=-1).mean()
