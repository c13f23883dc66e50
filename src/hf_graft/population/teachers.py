"""The frozen teachers of grafting+ (docs/method.md §9): placed once on the training device, and run on
a population's batch to give the logits that `graft.distill.kd_loss` averages."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from hf_graft.population.students import channels_last_batch

__all__ = ["TeacherEnsemble"]


class TeacherEnsemble:
    """M frozen teachers (eval mode, no gradients). `names` are what the config called them, for errors."""

    def __init__(self, teachers: Sequence[nn.Module], names: Sequence[str] | None = None):
        self.teachers = list(teachers)
        self.names = list(names) if names else [f"teacher {i}" for i in range(len(self.teachers))]
        self.channels_last = False

    def __len__(self) -> int:
        return len(self.teachers)

    def __iter__(self):
        return iter(self.teachers)

    def __getitem__(self, index: int) -> nn.Module:
        return self.teachers[index]

    def check_classes(self, num_classes: int | None, owner: str = "GraftingConfig.teacher_models") -> None:
        """One line naming the teacher whose class count differs from the students'."""
        for name, teacher in zip(self.names, self.teachers):
            t_classes = getattr(teacher, "num_classes", None)
            if num_classes is not None and t_classes is not None and t_classes != num_classes:
                raise ValueError(f"{owner}: {name!r} predicts {t_classes} classes, the students {num_classes}")

    def place(self, device: torch.device, *, half: torch.dtype | None = None, channels_last: bool = False) -> None:
        """Frozen, on `device` (in `half` precision when given), in the students' memory format."""
        self.channels_last = channels_last
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        for teacher in self.teachers:
            teacher.eval().requires_grad_(False)
            teacher.to(device=device, dtype=half) if half is not None else teacher.to(device)
            teacher.to(memory_format=memory_format)

    @torch.no_grad()
    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """[M, B, C] for a shared batch [B, C, H, W], [M, B, K, C] for per-member batches [B, K, C, H, W]
        (one teacher pass each over all K members' images); None without teachers."""
        if not self.teachers:
            return None
        per_member = pixel_values.ndim == 5
        B = pixel_values.shape[0]
        if self.channels_last:
            # member-major [K * B, C, H, W]: a channels_last view of the batch's channels_last layout
            pixel_values = channels_last_batch(pixel_values)
            flat = pixel_values.transpose(0, 1).flatten(0, 1) if per_member else pixel_values
        else:
            flat = pixel_values.flatten(0, 1) if per_member else pixel_values
        outs = []
        for teacher in self.teachers:
            dtype = next(teacher.parameters()).dtype
            z = teacher(flat.to(dtype)).float()
            if per_member:
                z = z.view(-1, B, z.shape[-1]).transpose(0, 1) if self.channels_last else z.view(B, -1, z.shape[-1])
            outs.append(z)
        return torch.stack(outs)
