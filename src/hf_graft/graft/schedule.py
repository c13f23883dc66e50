"""Learning-rate schedules of a population: the members' initial-rate spread and the paper's step
decay (docs/method.md §7, §11)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

__all__ = ["cosine_lr_multipliers", "step_decay"]


def cosine_lr_multipliers(num_members: int) -> list[float]:
    """The authors' "dlr" spread: member i (1-based, of K) starts at lr * (1 + cos(pi (K - i) / K)) / 2."""
    K = num_members
    return [(1.0 + math.cos(math.pi * (K - i) / K)) / 2.0 for i in range(1, K + 1)]


def step_decay(milestones: Sequence[int], *, warmup: int, gamma: float) -> Callable[[int], float]:
    """The papers' step decay as a `LambdaLR` factor of the optimizer step: a linear warm-up over
    `warmup` steps, then the rate times `gamma` for every milestone (a step count) passed."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return gamma ** sum(step >= m for m in milestones)

    return factor
