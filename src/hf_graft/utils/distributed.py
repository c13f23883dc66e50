"""Collectives a population needs beyond what DDP does."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn

__all__ = ["broadcast_buffers"]


@torch.no_grad()
def broadcast_buffers(module: nn.Module, world_size: int) -> None:
    """Give every process the buffers (BatchNorm running statistics) of process 0, one collective per dtype.

    DDP broadcasts process 0's buffers at the start of every training forward, and each process then
    updates them with its own shard of the batch, so after an epoch the processes disagree; a graft
    mixes those statistics too, and every process must evaluate what process 0 saves."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for buffer in module.buffers():
        groups[(buffer.device, buffer.dtype)].append(buffer)
    for buffers in groups.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()
