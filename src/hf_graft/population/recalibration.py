"""BatchNorm statistics re-estimated after a graft (`GraftingConfig.bn_recalibration_batches`).

A graft mixes two networks' running means and variances linearly, which is not the statistics of
the mixed network; `recalibrate_batchnorm` replaces them by a pass over a few training batches (the
trainer's `BatchNormRecalibrationCallback` runs it after every graft).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import default_collate

from hf_graft.data.transforms import normalize_pixels, pixel_statistics, students_data_config
from hf_graft import _compat
from hf_graft.utils.rng import preserved_rng

__all__ = ["recalibrate_batchnorm"]


@torch.no_grad()
def recalibrate_batchnorm(population: nn.Module, dataset, *, num_batches: int, batch_size: int,
                          device: torch.device, seed: int, collate=default_collate) -> None:
    """Reset and re-estimate every BatchNorm's running statistics of `population` on `num_batches`
    batches of `dataset` drawn by `seed` (batched by `collate`), leaving the global random streams untouched."""
    bns = [m for m in population.modules() if isinstance(m, _compat.batchnorm_base()) and m.track_running_stats]
    if not bns:
        return
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the recalibration batches
    was_training = population.training
    population.train()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)[: num_batches * batch_size].tolist()
    # forked RNG: the global stream (dropout, augmentation) continues as if no recalibration ran,
    # which keeps a run resumed at this epoch boundary identical to an uninterrupted one
    statistics = None  # the students' mean and std, for uint8 batches (DataArguments.normalize_on_device)
    with preserved_rng(device):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            items = collate([dataset[i] for i in order[start:start + batch_size]])
            pixels = items["pixel_values"].to(device)
            if pixels.dtype == torch.uint8:
                statistics = statistics or pixel_statistics(students_data_config(population), device)
                pixels = normalize_pixels(pixels, *statistics)
            population(pixel_values=pixels)
    for m, momentum in saved:
        m.momentum = momentum
    population.train(was_training)
