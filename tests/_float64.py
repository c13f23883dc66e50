"""Training runs in float64, for comparisons that must agree to the last bits.

Two executions of the same computation (loop and fused members, contiguous and channels_last
memory) round differently in float32, and training amplifies rounding where a ReLU input sits at
zero: a float32 comparison after several steps can only bound the difference loosely. In float64
the rounding is ~1e-16 and does not grow into anything visible, so any difference is a wrong
computation.
"""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from hf_graft.training.trainer import GraftingTrainer

FLOAT64_EXACT = 1e-12  # float64 runs of two executions agree to this (0.0 measured on the CPU here)


def float64_collate(items):
    batch = default_collate(items)
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


class Float64Trainer(GraftingTrainer):
    """The same run with members, teachers and batches in float64."""

    def __init__(self, *args, model=None, teachers=None, **kwargs):
        teachers = [t.double() for t in teachers] if teachers else None
        super().__init__(*args, model=model.double(), teachers=teachers, data_collator=float64_collate, **kwargs)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
