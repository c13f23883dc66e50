"""Stopping a run whose every member has diverged (non-finite weights or losses), and saying so.

A member with non-finite weights is never used as a scion (grafting.py), its gradients are dropped from
then on (GraftingTrainer), and the others go on without it; when every member has diverged there is
nothing left to train, so the trainer's `DivergenceMonitor` (training/callbacks.py) stops the run with a `DivergenceError` naming the members
and the step. It looks at every logging step and at every epoch
end (before that epoch's evaluation, checkpoint and graft): one small flag tensor per member is read
back from the device there, so the training steps themselves add no host synchronisation. A member has
diverged when its weights hold a non-finite value, or when every loss it had since the previous look
was non-finite (a single overflowing step that fp16 loss scaling skips does not count).
"""

from __future__ import annotations

from typing import Any

import torch
from hf_graft.errors import HfGraftError

__all__ = ["DivergenceError", "find_diverged", "measured_results"]

class DivergenceError(HfGraftError, RuntimeError):
    """Every member has diverged; `members` maps each to why ("weights" / "loss"), `step` is where it was seen."""

    def __init__(self, members: dict[int, str], step: int):
        self.members, self.step = dict(members), int(step)
        which = ", ".join(f"member {k} ({why})" for k, why in sorted(self.members.items()))
        super().__init__(
            f"training diverged: every member has non-finite values at step {self.step}: {which}; lower "
            "learning_rate, set max_grad_norm, or resume from an earlier checkpoint"
        )


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2 shards: this process's piece


@torch.no_grad()
def find_diverged(members, loss_bad: torch.Tensor | None, *, world_size: int = 1) -> dict[int, str]:
    """Members with non-finite weights ("weights") or whose every loss since the last look was non-finite
    ("loss"; `loss_bad` a [K] bool tensor, or None), agreed across processes (one host read)."""
    weights_ok = torch.stack([
        torch.stack([torch.isfinite(_local(p)).all() for p in member.parameters() if p.numel()]).all()
        for member in members
    ])
    weights_bad = (~weights_ok).to(torch.int32)
    loss_flags = loss_bad.to(device=weights_bad.device, dtype=torch.int32) if loss_bad is not None else None
    flags = torch.stack([weights_bad, loss_flags if loss_flags is not None else torch.zeros_like(weights_bad)])
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    weights_flags, loss_flags = flags.tolist()
    return {k: "weights" if w else "loss" for k, (w, l) in enumerate(zip(weights_flags, loss_flags)) if w or l}


def measured_results(state, error: DivergenceError) -> dict[str, Any]:
    """What a diverged run had measured: the last value of every evaluation metric, the last training
    loss, and where and how it diverged."""
    results: dict[str, Any] = {}
    for entry in state.log_history:
        for key, value in entry.items():
            if key.startswith("eval_") or key == "loss":
                results[key] = value
    results.update({
        "global_step": state.global_step,
        "epoch": state.epoch,
        "stopped": str(error),
        "diverged_members": {str(k): why for k, why in sorted(error.members.items())},
        "diverged_at_step": error.step,
    })
    return results
