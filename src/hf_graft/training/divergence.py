"""Stopping a run whose every member has diverged (non-finite weights or losses), and saying so.

A member with non-finite weights is never used as a scion (grafting.py), its gradients are dropped from
then on (GraftingTrainer), and the others go on without it; when every member has diverged there is
nothing left to train, so `DivergenceMonitor` stops the run with a `DivergenceError` naming the members
and the step. It looks at every logging step and at every epoch
end (before that epoch's evaluation, checkpoint and graft): one small flag tensor per member is read
back from the device there, so the training steps themselves add no host synchronisation. A member has
diverged when its weights hold a non-finite value, or when every loss it had since the previous look
was non-finite (a single overflowing step that fp16 loss scaling skips does not count).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback

__all__ = ["DivergenceError", "DivergenceMonitor", "measured_results"]

logger = logging.getLogger("hf_graft.training.divergence")


class DivergenceError(RuntimeError):
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


class DivergenceMonitor(TrainerCallback):
    """Watches the members of a `GraftingTrainer`; the trainer feeds it every training step's member losses."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.diverged: dict[int, int] = {}  # member -> the step at which it was first seen diverged
        self._bad_losses: torch.Tensor | None = None  # per member: non-finite losses since the last look
        self._losses_seen = 0

    def observe(self, member_ce: torch.Tensor, member_kd: torch.Tensor | None = None) -> None:
        """Count the members whose loss of this forward pass is not finite (stays on the device)."""
        loss = member_ce if member_kd is None else member_ce + member_kd
        bad = (~torch.isfinite(loss.detach())).to(torch.int32)
        self._bad_losses = bad if self._bad_losses is None else self._bad_losses + bad
        self._losses_seen += 1

    def drop_gradients(self) -> None:
        """A diverged member receives no more updates: its non-finite gradients would otherwise make fp16 loss
        scaling skip every optimizer step, freezing the healthy members with it."""
        for k in self.diverged:
            for p in self.trainer.population.members[k].parameters():
                p.grad = None

    def mark(self, member_grad_norms: torch.Tensor) -> torch.Tensor:
        """Per-member gradient norms with a diverged member's as nan (not the 0 of its dropped gradients)."""
        if self.diverged:
            member_grad_norms[list(self.diverged)] = float("nan")
        return member_grad_norms

    def on_train_begin(self, args, state, control, **kwargs):
        self._bad_losses, self._losses_seen, self.diverged = None, 0, {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # a training log entry (not an evaluation or a graft)
            self.check(args, state)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.check(args, state)

    @torch.no_grad()
    def check(self, args, state) -> None:
        members = self.trainer.population.members
        weights_ok = torch.stack([
            torch.stack([torch.isfinite(_local(p)).all() for p in member.parameters() if p.numel()]).all()
            for member in members
        ])
        weights_bad = (~weights_ok).to(torch.int32)
        if self._losses_seen and self._bad_losses is not None:
            loss_bad = (self._bad_losses.to(weights_bad.device) == self._losses_seen).to(torch.int32)
        else:
            loss_bad = torch.zeros_like(weights_bad)
        flags = torch.stack([weights_bad, loss_bad])
        if args.world_size > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        weights_flags, loss_flags = flags.tolist()  # the one host read of a look
        self._bad_losses, self._losses_seen = None, 0
        reasons = {
            k: "weights" if w else "loss" for k, (w, l) in enumerate(zip(weights_flags, loss_flags)) if w or l
        }
        for k, why in reasons.items():
            if k not in self.diverged:
                self.diverged[k] = state.global_step
                if len(reasons) < len(members):
                    logger.warning(
                        "member %d diverged at step %d (non-finite %s); it is no longer used as a scion, the other "
                        "members train on", k, state.global_step, why,
                    )
        if reasons and len(reasons) == len(members):
            raise DivergenceError(reasons, state.global_step)


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
