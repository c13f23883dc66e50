"""The callbacks of a `GraftingTrainer`: when to graft, the sampler's epoch, BatchNorm recalibration after
a graft, and divergence. Each gets what it needs as constructor arguments, never the trainer.

`GraftingCallback` and `DivergenceMonitor` decide; the trainer acts on what they decided
(`GraftingTrainer.training_step` runs a due graft, `GraftingTrainer.train` raises a divergence), so a
callback rebuilt by the Trainer from a checkpoint's saved state works as it is.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.data import default_collate
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from hf_graft.population.recalibration import recalibrate_batchnorm
from hf_graft.training.divergence import DivergenceError, find_diverged

__all__ = [
    "BatchNormRecalibrationCallback", "DivergenceMonitor", "GraftingCallback", "SamplerEpochCallback",
    "dispatch_graft_event",
]

logger = logging.getLogger(__name__)


def dispatch_graft_event(callbacks, event: str, args, state, control, **kwargs) -> None:
    """Call `event` (`on_graft_begin` / `on_graft_end`) on every callback that defines it, in the handler's
    order: the Trainer's CallbackHandler only dispatches its own events."""
    for callback in callbacks:
        handler = getattr(callback, event, None)
        if handler is not None:
            handler(args, state, control, **kwargs)


class GraftingCallback(TrainerCallback, ExportableState):
    """Decides when to graft (docs/method.md §6). Its counter is saved in checkpoints, so a resumed run
    grafts exactly where an uninterrupted one would, and never twice at one boundary.

    The trainer asks `take_due` before it fetches each optimizer step's batches (before that step's
    `on_step_begin`) and runs the graft it returns: at the beginning of an epoch (decided in
    `on_epoch_begin`), that is after the previous epoch's evaluation and checkpoint (the authors
    evaluate, save, then graft) and never after the last epoch; with `graft_every_steps`, every that
    many steps.
    """

    def __init__(self, grafts_done: int = 0):
        self.grafts_done = grafts_done
        self.pending: int | None = None

    def state(self) -> dict:
        return {"args": {}, "attributes": {"grafts_done": self.grafts_done}}

    def on_train_begin(self, args, state, control, **kwargs):
        self.pending = None
        if state.global_step == 0:  # a fresh run (also a second train() call on the same trainer)
            self.grafts_done = 0
            return
        saved = state.stateful_callbacks.get(type(self).__name__) if state.stateful_callbacks else None
        if isinstance(saved, dict):
            self.grafts_done = int(saved.get("attributes", {}).get("grafts_done", self.grafts_done))

    @staticmethod
    def grafts_due(args, state) -> int:
        """How many grafts must have happened before the work that starts now."""
        if args.graft_every_steps:
            return state.global_step // args.graft_every_steps
        boundary = math.floor(state.epoch + 1e-6)  # the epoch about to run (or resumed inside)
        if boundary < args.graft_start_epoch:
            return 0
        return (boundary - args.graft_start_epoch) // args.graft_every_epochs + 1

    def _decide(self, args, state) -> None:
        if not args.grafting_enabled:
            return
        due = self.grafts_due(args, state)
        if due > self.grafts_done:
            self.pending = self.grafts_done
            self.grafts_done = due

    def on_epoch_begin(self, args, state, control, **kwargs):
        if not args.graft_every_steps:
            self._decide(args, state)

    def take_due(self, args, state) -> int | None:
        """The 0-based index of the graft due before the step that starts now, or None; handed over once."""
        if args.graft_every_steps:
            self._decide(args, state)
        pending, self.pending = self.pending, None
        return pending


class SamplerEpochCallback(TrainerCallback):
    """Sets the epoch of the trainer's `EpochShuffleSampler`s at every epoch begin.

    Accelerate forwards `set_epoch` to the sampler in most set-ups, but not through the wrappers of a
    distributed run resumed mid-epoch (SkipBatchSampler around BatchSamplerShard); the epoch is then
    read from the trainer state, which the checkpoint restores. `samplers` is the list the trainer
    appends its sampler to when it builds one.
    """

    def __init__(self, samplers: list):
        self.samplers = samplers

    def on_epoch_begin(self, args, state, control, **kwargs):
        for sampler in self.samplers:
            sampler.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))


class BatchNormRecalibrationCallback(TrainerCallback):
    """After every graft, re-estimate the BatchNorm running statistics of the mixed weights on
    `num_batches` training batches (`GraftingConfig.bn_recalibration_batches`): a linear mix of two
    networks' running statistics is not the statistics of the mixed network."""

    def __init__(self, num_batches: int):
        self.num_batches = num_batches

    def on_graft_end(self, args, state, control, *, model, graft_index, train_dataset, data_collator=None, **kwargs):
        recalibrate_batchnorm(model, train_dataset, num_batches=self.num_batches,
                              batch_size=args.per_device_train_batch_size, device=args.device,
                              seed=args.seed + graft_index, collate=data_collator or default_collate)


class DivergenceMonitor(TrainerCallback):
    """Watches `members` for non-finite weights and losses (the trainer feeds it every step's member losses).

    A diverged member is logged once and left to train alone (never a scion, no more updates). When every
    member has diverged, the monitor stops the run before anything more is evaluated or saved and keeps
    the `DivergenceError` in `error`, which the trainer raises once the Trainer's loop has ended.
    """

    def __init__(self, members: Sequence[nn.Module]):
        self.members = list(members)
        self.diverged: dict[int, int] = {}  # member -> the step at which it was first seen diverged
        self.error: DivergenceError | None = None
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
            for p in self.members[k].parameters():
                p.grad = None

    def mark(self, member_grad_norms: torch.Tensor) -> torch.Tensor:
        """Per-member gradient norms with a diverged member's as nan (not the 0 of its dropped gradients)."""
        if self.diverged:
            member_grad_norms[list(self.diverged)] = float("nan")
        return member_grad_norms

    def on_train_begin(self, args, state, control, **kwargs):
        self._bad_losses, self._losses_seen, self.diverged, self.error = None, 0, {}, None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # a training log entry (not an evaluation or a graft)
            self._look(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._look(args, state, control)

    def _look(self, args, state, control) -> None:
        if self.error is not None:  # stopping: the epoch's end must not evaluate or save either
            control.should_training_stop = True
            control.should_evaluate = control.should_save = False
            return
        loss_bad = None
        if self._losses_seen and self._bad_losses is not None:
            loss_bad = self._bad_losses == self._losses_seen
        self._bad_losses, self._losses_seen = None, 0
        reasons = find_diverged(self.members, loss_bad, world_size=args.world_size)
        for k, why in reasons.items():
            if k not in self.diverged:
                self.diverged[k] = state.global_step
                if len(reasons) < len(self.members):
                    logger.warning(
                        "member %d diverged at step %d (non-finite %s); it is no longer used as a scion, the other "
                        "members train on", k, state.global_step, why,
                    )
        if reasons and len(reasons) == len(self.members):
            self.error = DivergenceError(reasons, state.global_step)
            control.should_training_stop = True
            control.should_evaluate = control.should_save = False  # nothing diverged is evaluated or saved
