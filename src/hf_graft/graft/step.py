"""One graft of a population, by the scion source a run is configured with (docs/method.md §3-§5).

Pure torch: `settings` is any object with the `GraftingConfig` fields named below.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from hf_graft.graft.grafting import GraftReport, graft_internal, graft_members, graft_noise

__all__ = ["graft_population"]


@torch.no_grad()
def graft_population(members: Sequence[nn.Module], settings, step: int) -> tuple[GraftReport | None, dict[str, float]]:
    """The `step`-th graft (0-based) of `members` in place; returns the external graft's report (else None)
    and the numbers to log.

    external: the ring graft (`graft_members`); noise: each member's invalid filters get seeded noise
    (seed, step and member fix the draw); internal: each member's invalid filters get its own largest
    ones; none: nothing."""
    logs: dict[str, float] = {}
    report = None
    if settings.graft_source == "external":
        report = graft_members(members, criterion=settings.graft_criterion, bins=settings.graft_bins,
                               A=settings.graft_A, c=settings.graft_c, level=settings.graft_level,
                               anchor=settings.graft_anchor, alpha_decimals=settings.graft_alpha_decimals,
                               include_max=settings.graft_histogram_include_max)
        logs.update(report.to_log_dict())
    elif settings.graft_source == "noise":
        # the epoch this graft follows (the first graft follows graft_start_epoch)
        epoch = settings.graft_start_epoch + step * settings.graft_every_epochs
        for k, member in enumerate(members):
            device = next(member.parameters()).device
            generator = torch.Generator(device=device).manual_seed(settings.seed * 100003 + 1009 * step + k)
            counts = graft_noise(member, epoch=epoch, a=settings.graft_noise_a, first_t=settings.graft_noise_first_t,
                                 threshold=settings.graft_invalid_threshold, generator=generator)
            logs[f"graft/member{k}_filters_grafted"] = float(sum(counts.values()))
    elif settings.graft_source == "internal":
        for k, member in enumerate(members):
            counts = graft_internal(member, threshold=settings.graft_invalid_threshold,
                                    order=settings.graft_internal_order)
            logs[f"graft/member{k}_filters_grafted"] = float(sum(counts.values()))
    return report, logs
