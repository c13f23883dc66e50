"""Per-member gradient norms and clipping in a few operations per member.

`torch.nn.utils.clip_grad_norm_` / `get_total_norm` move every parameter's norm to one device before
stacking them: one more dispatched operation per parameter, every step. For small members on a GPU
the host's dispatch time is the step time, so each member's norm is taken here with one foreach
call, one stack and one vector norm; the arithmetic (and so every logged value) is theirs.
"""

from __future__ import annotations

import torch


def member_grad_norms(members: list[list[torch.nn.Parameter]], device: torch.device,
                      max_norm: float | None = None) -> torch.Tensor:
    """Each member's total 2-norm over its parameters' gradients, as a [K] tensor on `device`; with
    `max_norm`, each member's gradients are then scaled to a norm of at most `max_norm`, as
    `clip_grad_norm_` would per member. A member without gradients has norm 0."""
    norms = []
    for params in members:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            norms.append(torch.zeros((), device=device))
            continue
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if max_norm is not None:
            torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        norms.append(norm)
    return torch.stack([n.to(device) for n in norms])
