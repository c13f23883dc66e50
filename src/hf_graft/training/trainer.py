"""GraftingTrainer: a `transformers.Trainer` for a population of grafted students (thin glue).

The math lives in `grafting.py` (the graft), `distill.py` (the KD loss) and `population.py`
(the K members as one module), as docs/method.md describes it; this file only decides *when*
things happen (docs/method.md §6) and wires them into the Trainer's optimizer, clipping,
evaluation, logging and checkpointing, and it ends a run: results, the student, the Hub.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import EvalPrediction

from hf_graft.run.checkpoints import AtomicCheckpoints
from hf_graft.config import GraftingConfig
from hf_graft.data.sampling import EpochShuffleSampler, MemberOrderDataset
from hf_graft.data.transforms import (
    normalize_pixels, pixel_statistics, resolve_student_data_config, students_data_config,
)
from hf_graft.data.on_device import DeviceImageDataset, collate_examples, use_main_process_loading
from hf_graft.training.divergence import DivergenceError, DivergenceMonitor, measured_results
from hf_graft.graft.filters import filter_report
from hf_graft.population.fused import separate_storage
from hf_graft.graft.grafting import GraftReport, graft_internal, graft_members, graft_noise
from hf_graft.training.grad_norms import member_grad_norms
from hf_graft.export.hub import push_student
from hf_graft.export.model_card import build_model_card
from hf_graft.metrics import PopulationMetrics
from hf_graft.population.sources import load_teacher
from hf_graft.population.students import PopulationSpec, StudentPopulation, channels_last_batch
from hf_graft.training.recalibration import BatchNormRecalibrationCallback
from hf_graft.run.results import ensemble_metrics, filter_summaries, member_metrics, select_member, summary_lines
from hf_graft.run.output_dir import OutputDirClaim, run_identity, save_run_identity
from hf_graft.graft.schedule import step_decay
from hf_graft.export.student_folder import save_student
from hf_graft.data.transfer import SideStreamCopy, on_host
from hf_graft.utils.rng import preserved_rng
from hf_graft.utils.files import STUDENT_DIR

__all__ = ["GraftingCallback", "GraftingTrainer"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- callback
class GraftingCallback(TrainerCallback, ExportableState):
    """Decides when to graft (docs/method.md §6); its counter is saved in checkpoints so a resumed
    run grafts exactly where an uninterrupted one would (and never twice at one boundary)."""

    def __init__(self, trainer: "GraftingTrainer" | None = None, grafts_done: int = 0):
        self.trainer = trainer
        self.grafts_done = grafts_done

    def state(self) -> dict:
        return {"args": {}, "attributes": {"grafts_done": self.grafts_done}}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # a fresh run (also a second train() call on the same trainer)
            self.grafts_done = 0
            return
        saved = state.stateful_callbacks.get(type(self).__name__) if state.stateful_callbacks else None
        if isinstance(saved, dict):
            self.grafts_done = int(saved.get("attributes", {}).get("grafts_done", self.grafts_done))

    def _grafts_due(self, args: GraftingConfig, state) -> int:
        """How many grafts must have happened before the work that starts now."""
        if args.graft_every_steps:
            return state.global_step // args.graft_every_steps
        boundary = math.floor(state.epoch + 1e-6)  # the epoch about to run (or resumed inside)
        if boundary < args.graft_start_epoch:
            return 0
        return (boundary - args.graft_start_epoch) // args.graft_every_epochs + 1

    def _maybe_graft(self, args, state):
        if not args.grafting_enabled or self.trainer is None:
            return
        due = self._grafts_due(args, state)
        if due > self.grafts_done:
            self.trainer.graft(step=self.grafts_done)
            self.grafts_done = due

    def on_epoch_begin(self, args, state, control, **kwargs):
        # Grafting at the start of every epoch after the first is grafting at the end of the previous
        # one, after its evaluation and checkpoint (the authors evaluate, save, then graft), and never
        # after the last epoch.
        if not args.graft_every_steps:
            self._maybe_graft(args, state)

    def on_step_begin(self, args, state, control, **kwargs):
        if args.graft_every_steps:
            self._maybe_graft(args, state)


# ----------------------------------------------------------------------------- trainer
class GraftingTrainer(AtomicCheckpoints, Trainer):
    """Trains K students with the Trainer, grafting them in a ring at epoch boundaries.

    `model` is a `StudentPopulation`, or a `PopulationSpec` from which one is built with
    `args.seed` (member k is seeded `seed + 1000 k`). `teachers` (grafting+) default to
    `args.teacher_models`.
    """

    def __init__(
        self,
        model: StudentPopulation | PopulationSpec | None = None,
        args: GraftingConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        teachers: Sequence[nn.Module] | None = None,
        compute_metrics=None,
        callbacks=None,
        **kwargs,
    ):
        if args is None or not isinstance(args, GraftingConfig):
            raise TypeError("GraftingTrainer needs args=GraftingConfig(...)")
        if model is None:
            raise TypeError("GraftingTrainer needs model=StudentPopulation or model=PopulationSpec")
        if isinstance(model, PopulationSpec):
            model = StudentPopulation.from_spec(
                model, seed=args.seed, pretrained=args.student_pretrained, shared_init=args.shared_init
            )
        if not isinstance(model, StudentPopulation):
            raise TypeError(f"GraftingTrainer: model must be a StudentPopulation, got {type(model).__name__}")
        if model.num_members != args.num_students:
            raise ValueError(
                f"GraftingConfig.num_students is {args.num_students} but the population has {model.num_members} members"
            )
        if len(args.lr_multipliers) != model.num_members:
            raise ValueError("GraftingConfig.lr_spread must give one multiplier per member")
        self._population = model
        self._member_params: list[list[nn.Parameter]] | None = None
        model.ce_weight, model.kd_weight, model.kd_temperature = args.ce_weight, args.kd_weight, args.kd_temperature
        model.label_smoothing = args.label_smoothing_factor  # every member's CE (the Trainer's smoother: see below)
        on_cuda = args.device.type == "cuda"
        self.channels_last = on_cuda if args.channels_last is None else bool(args.channels_last)
        model.set_execution(channels_last=self.channels_last, fused=args.member_execution == "fused",
                            model_name=args.student_model)
        if on_cuda and args.dataloader_pin_memory:
            # the copy of a pinned batch to the GPU need not block the host: the host queues the next
            # step's kernels while the GPU works (a blocking copy waits for the whole previous step)
            args.accelerator_config.non_blocking = True
        self._nan_inf_filter_on_device = False

        if teachers is None and args.teacher_models:
            teachers = [load_teacher(name, args.teacher_model_kwargs) for name in args.teacher_models]
        self.teachers: list[nn.Module] = list(teachers or [])
        self._check_teachers(model, args)

        self.graft_callback = GraftingCallback(self)
        self.graft_reports: list[GraftReport] = []
        self._member_loss_sums: dict[str, torch.Tensor] = {}
        self._member_loss_count = 0
        self._member_grad_norms: torch.Tensor | None = None
        evaluation = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        if any(isinstance(d, DeviceImageDataset) for d in (train_dataset, *evaluation)):
            use_main_process_loading(args)
        # pinned training batches go to the GPU on a stream of their own (transfer.py)
        self._batch_copy = SideStreamCopy(args.device) if on_cuda and args.dataloader_pin_memory else None
        recalibration = [BatchNormRecalibrationCallback(args.bn_recalibration_batches)] if args.bn_recalibration_batches else []
        # top-1/top-5 through the evaluate metric shipped with hf_graft, plus args.extra_metrics
        self.eval_metrics = PopulationMetrics(
            args.select_student, args.extra_metrics, args.extra_metric_kwargs, owner=f"{type(args).__name__}.extra_metrics"
        )
        # the Trainer builds a LabelSmoother from label_smoothing_factor, reading `model.config` (which a population
        # has not); it would never run (compute_loss is the population's): the factor is zero while it is built
        smoothing, args.label_smoothing_factor = args.label_smoothing_factor, 0.0
        try:
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator or collate_examples,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                compute_metrics=compute_metrics or self._compute_metrics,
                # recalibration first, so that users' `on_graft_end` sees the statistics the run continues with
                callbacks=[self.graft_callback, *recalibration, *(callbacks or [])],
                **kwargs,
            )
        finally:
            args.label_smoothing_factor = smoothing
        if model.fused is not None and _is_sharded(self.accelerator):
            raise ValueError("GraftingConfig.member_execution: 'fused' runs with one process or DDP, not with "
                             f"{self.accelerator.distributed_type.value}; use member_execution: loop")
        self._place_teachers()
        self._epoch_sampler: EpochShuffleSampler | None = None
        self.results: dict | None = None  # the end of the run (see `train`)
        self.student_dir: Path | None = None
        self.add_callback(_SamplerEpochCallback(self))
        self.divergence_monitor = DivergenceMonitor(self)
        self.add_callback(self.divergence_monitor)
        self.run_identity: dict | None = None  # set by train(); saved in every checkpoint

    # ------------------------------------------------------------------ teachers
    def _check_teachers(self, population: StudentPopulation, args: GraftingConfig) -> None:
        num_classes = population.members[0].num_classes if hasattr(population.members[0], "num_classes") else None
        for i, teacher in enumerate(self.teachers):
            t_classes = getattr(teacher, "num_classes", None)
            if num_classes is not None and t_classes is not None and t_classes != num_classes:
                name = args.teacher_models[i] if args.teacher_models else f"teacher {i}"
                raise ValueError(
                    f"GraftingConfig.teacher_models: {name!r} predicts {t_classes} classes, the students {num_classes}"
                )

    def _place_teachers(self) -> None:
        device = self.args.device
        half = None
        if device.type == "cuda":
            half = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        for teacher in self.teachers:
            teacher.eval().requires_grad_(False)
            teacher.to(device=device, dtype=half) if half is not None else teacher.to(device)
            teacher.to(memory_format=memory_format)

    @torch.no_grad()
    def _teacher_logits(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """[M, B, C] for a shared batch, [M, B, K, C] for per-member batches (one teacher pass each)."""
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

    # ------------------------------------------------------------------ optimisation
    @property
    def population(self) -> StudentPopulation:
        """The StudentPopulation being trained, whatever wraps it for training (DDP, torch.compile): the
        wrappers hold this very module, and unwrapping costs a walk of every submodule."""
        return self._population

    def _member_parameters(self) -> list[list[nn.Parameter]]:
        """Every member's trainable parameters, listed once per `train()` (a walk of the modules each step
        costs more host time than a small member's step)."""
        if self._member_params is None:
            self._member_params = [[p for p in m.parameters() if p.requires_grad] for m in self.population.members]
        return self._member_params

    def _build_accelerator_args(self, **kwargs) -> dict:
        """The Trainer's Accelerator settings, with `GraftingConfig.torch_compile_dynamic` as
        torch.compile's `dynamic` (the Trainer leaves it to torch's automatic choice)."""
        accelerator_args = super()._build_accelerator_args(**kwargs)
        plugin = accelerator_args.get("dynamo_plugin")
        if plugin is not None and self.args.torch_compile:
            plugin.dynamic = self.args.torch_compile_dynamic
        return accelerator_args

    def create_optimizer(self, model=None):
        """One pair of param groups (decay / no decay) per member, each at its own initial rate."""
        if self.optimizer is None:
            population = self.model
            decay_names = set(self.get_decay_parameter_names(population))
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, population)
            groups = []
            for k, member in enumerate(population.members):
                lr = self.args.learning_rate * self.args.lr_multipliers[k]
                named = [(f"members.{k}.{n}", p) for n, p in member.named_parameters() if p.requires_grad]
                decay = [p for n, p in named if n in decay_names]
                no_decay = [p for n, p in named if n not in decay_names]
                groups.append({"params": decay, "weight_decay": self.args.weight_decay, "lr": lr, "member": k})
                groups.append({"params": no_decay, "weight_decay": 0.0, "lr": lr, "member": k})
            self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's schedulers, plus the papers' step decay (`lr_decay_epochs`): the rate is multiplied
        by `lr_decay_gamma` at each listed epoch, after `warmup_steps`. Every member keeps its own
        initial rate (the multiplier applies to each param group's base rate)."""
        if not self.args.lr_decay_epochs:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            optimizer = self.optimizer if optimizer is None else optimizer
            steps_per_epoch = num_training_steps / max(self.args.num_train_epochs, 1e-9)
            if self.args.max_steps > 0 and self.train_dataset is not None:
                steps_per_epoch = max(1, len(self.get_train_dataloader()) // self.args.gradient_accumulation_steps)
            milestones = sorted(round(e * steps_per_epoch) for e in self.args.lr_decay_epochs)
            warmup = self.args.get_warmup_steps(num_training_steps)
            decay = step_decay(milestones, warmup=warmup, gamma=self.args.lr_decay_gamma)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _clip_grad_norm(self, model):
        """Clip every member's gradient norm on its own: one global clip would couple the members."""
        if _is_sharded(self.accelerator):
            return super()._clip_grad_norm(model)
        return self._member_grad_norms_total(clip=True)

    def _member_grad_norms_total(self, clip: bool) -> torch.Tensor:
        """Every member's gradient norm (after clipping it to `max_grad_norm` when `clip`), kept for the
        logs; returns the norm of those norms. A diverged member's gradients are dropped first, before
        fp16 unscaling looks for inf / nan, and the loss scale is undone once, before measuring."""
        self.divergence_monitor.drop_gradients()
        self.accelerator.unscale_gradients()
        norms = member_grad_norms(self._member_parameters(), self.args.device,
                                  max_norm=self.args.max_grad_norm if clip else None)
        self._member_grad_norms = norms = self.divergence_monitor.mark(norms.detach())
        return norms.norm()

    def _streams_to_device(self) -> bool:
        """Whether the host should run ahead of the device (CUDA): no per-step host syncs."""
        return self.args.device.type == "cuda"

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        if self._batch_copy is not None and getattr(loader, "device", None) is not None:
            loader.device = None  # its batches stay pinned on the host: `_prepare_inputs` copies them
        return loader

    def _prepare_inputs(self, inputs):
        # training batches only (`training_step` sets the mode first); evaluation keeps Accelerate's copy
        if self._batch_copy is not None and self.model.training and on_host(inputs):
            inputs = self._batch_copy(inputs)
        inputs = super()._prepare_inputs(inputs)
        pixels = inputs.get("pixel_values") if isinstance(inputs, dict) else None
        if pixels is not None and pixels.dtype == torch.uint8:  # DataArguments.normalize_on_device
            inputs = {**inputs, "pixel_values": normalize_pixels(pixels, *self._pixel_statistics(pixels.device))}
        return inputs

    def _pixel_statistics(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The students' mean and std, on `device` once (a per-step copy from the host would be a host sync)."""
        cached = getattr(self, "_pixel_stats", None)
        if cached is None or cached[0].device != device:
            cached = self._pixel_stats = pixel_statistics(students_data_config(self.population), device)
        return cached

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._nan_inf_filter_on_device:
            # what the Trainer's filter does: a non-finite step loss counts as the mean of the steps
            # accumulated since the last log
            accumulated = getattr(self, "_tr_loss", None)
            since_log = 1 + self.state.global_step - getattr(self, "_globalstep_last_logged", 0)
            fallback = accumulated / since_log if accumulated is not None else torch.zeros_like(loss)
            loss = torch.where(torch.isfinite(loss), loss, fallback.to(loss.dtype))
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """Without clipping, the Trainer measures the norm with `clip_grad_norm_(max_norm=inf)`, which scales
        every gradient by inf / norm: NaN for all members as soon as one member's gradient is, so one
        diverged member would spread to the others. Measure each member's norm instead, changing nothing."""
        if grad_norm is None and not _is_sharded(self.accelerator):
            grad_norm = self._member_grad_norms_total(clip=False)
        return super()._get_grad_norm(model, grad_norm)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values = inputs["pixel_values"]
        teacher_logits = self._teacher_logits(pixel_values) if model.training else None
        outputs = model(pixel_values=pixel_values, labels=inputs.get("labels"), teacher_logits=teacher_logits)
        if model.training and "member_ce" in outputs:
            for key in ("member_ce", "member_kd"):
                if key in outputs:
                    total = self._member_loss_sums.get(key)
                    # a copy, never the output itself: under torch.compile's CUDA graphs (mode
                    # "reduce-overhead") the next step's replay overwrites the outputs in place
                    step_loss = outputs[key].detach()
                    self._member_loss_sums[key] = step_loss.clone() if total is None else total + step_loss
            self._member_loss_count += 1
            self.divergence_monitor.observe(outputs["member_ce"], outputs.get("member_kd"))
            if self.optimizer is not None:  # the rates this step's update uses (the scheduler steps after it)
                self._member_lrs = {g.get("member", 0): g["lr"] for g in self.optimizer.param_groups}
        loss = outputs["loss"]
        # evaluation keeps every batch's logits: copies, for the same reason
        return (loss, {"loss": loss, "logits": outputs["logits"].clone()}) if return_outputs else loss

    # ------------------------------------------------------------------ grafting
    @torch.no_grad()
    def graft(self, step: int) -> GraftReport | None:
        """One graft of the population (the `step`-th, 0-based), logged through the Trainer.

        Callbacks that define `on_graft_begin` / `on_graft_end` are called right before the weights
        are mixed and right after (with the `GraftReport` of an external graft, else None), with
        `model` the unwrapped population and `graft_index` the 0-based count of this graft.
        """
        args: GraftingConfig = self.args
        population = self.population
        members = list(population.members)
        report = None
        logs: dict[str, float] = {}
        # every process must graft the same weights: DDP keeps parameters identical, but BatchNorm
        # running statistics are updated locally after DDP's broadcast in each forward
        self.sync_buffers()
        self._call_graft_event("on_graft_begin", step)
        if args.graft_source == "external":
            report = graft_members(
                members, criterion=args.graft_criterion, bins=args.graft_bins, A=args.graft_A, c=args.graft_c,
                level=args.graft_level,
            )
            logs.update(report.to_log_dict())
            self.graft_reports.append(report)
            self._log_alpha_histograms(report)
        elif args.graft_source == "noise":
            epoch = step + args.graft_start_epoch
            for k, member in enumerate(members):
                device = next(member.parameters()).device
                generator = torch.Generator(device=device).manual_seed(args.seed * 100003 + 1009 * step + k)
                counts = graft_noise(member, epoch=epoch, a=args.graft_noise_a,
                                     threshold=args.graft_invalid_threshold, generator=generator)
                logs[f"graft/member{k}_filters_grafted"] = float(sum(counts.values()))
        elif args.graft_source == "internal":
            for k, member in enumerate(members):
                counts = graft_internal(member, threshold=args.graft_invalid_threshold)
                logs[f"graft/member{k}_filters_grafted"] = float(sum(counts.values()))
        self._call_graft_event("on_graft_end", step, report=report)
        logs.update({f"graft/{name}": value for name, value in self.filter_metrics().items()})
        logs["graft/count"] = float(step + 1)
        self.log(logs)
        return report

    def _call_graft_event(self, event: str, graft_index: int, **kwargs) -> None:
        """The Trainer's CallbackHandler only dispatches its own events: call ours on every callback
        that defines them, in the handler's order."""
        for callback in self.callback_handler.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(self.args, self.state, self.control, model=self.population, graft_index=graft_index,
                        train_dataset=self.train_dataset, data_collator=self.data_collator, **kwargs)


    # ------------------------------------------------------------------ evaluation and logging
    def _compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        metrics = self.eval_metrics(logits, prediction.label_ids, leave_out=self.diverged_members)
        metrics.update(self.filter_metrics())
        return metrics

    def filter_metrics(self) -> dict[str, float]:
        """Filter health of every member (the paper's "Reason"): own invalid-filter ratio at each of
        `args.filter_thresholds` and the network's total entropy, as flat `member{k}_...` scalars."""
        logs: dict[str, float] = {}
        for k, member in enumerate(self.population.members):
            summary = filter_report(member, thresholds=self.args.filter_thresholds, bins=self.args.graft_bins).summary()
            logs.update({f"member{k}_{name}": value for name, value in summary.items()})
        return logs

    def _log_alpha_histograms(self, report: GraftReport) -> None:
        """Per-member histogram of the anchors' alphas for TensorBoard (when it is a report_to target)."""
        from transformers.integrations import TensorBoardCallback

        for callback in self.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None) if isinstance(callback, TensorBoardCallback) else None
            if writer is None:
                continue
            for member in report.members:
                if member.alpha_values:
                    writer.add_histogram(
                        f"graft/member{member.index}_alpha", np.asarray(member.alpha_values), self.state.global_step
                    )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._member_loss_count:
            # per-member CE and KD terms, so a user sees whether the KD term dominates
            for key, total in self._member_loss_sums.items():
                term = key.split("_", 1)[1]
                for k, value in enumerate((total / self._member_loss_count).tolist()):
                    logs[f"member{k}_{term}"] = round(value, 6)
                    if not math.isfinite(value):  # a non-finite batch is never logged as a finite loss
                        logs["loss"] = float("nan")
            self._member_loss_sums, self._member_loss_count = {}, 0
            if self._member_grad_norms is not None:
                for k, value in enumerate(self._member_grad_norms.tolist()):
                    logs[f"member{k}_grad_norm"] = round(value, 6)
            # the rates of the last logged step, as the Trainer's own `learning_rate` (not the next step's)
            for k, lr in sorted(getattr(self, "_member_lrs", {}).items()):
                logs[f"member{k}_learning_rate"] = lr
        super().log(logs, start_time) if start_time is not None else super().log(logs)

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # channels_last weights are not contiguous and fused members' statistics share one buffer:
        # safetensors takes neither, so the checkpoint gets contiguous copies of those tensors
        state_dict = separate_storage(self.model.state_dict() if state_dict is None else state_dict)
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and self.population.spec is not None:
            self.population.spec.save(output_dir)
        if self.args.should_save and self.run_identity is not None:
            save_run_identity(output_dir, self.run_identity)

    # ------------------------------------------------------------------ the end of a run: results, student, Hub
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """`Trainer.train`, then the end of the run: the evaluation of the final weights, the selected
        member and the filter statistics, computed once (`self.results`, also written to
        `output_dir/all_results.json`); with `export_student`, the student folder (`save_student`);
        and a closing summary through the `hf_graft.trainer` logger.

        Before any training step: the settings this device cannot honour (preflight.py), and `output_dir`
        locked for the whole run (export included), writable, with room for a checkpoint, and either free
        of another run (or cleared with `replace_output_dir`) or holding the checkpoint this run resumes,
        of the same experiment (run_dir.py). `resume_from_checkpoint` may be a folder, or True / "true" /
        "last" for the newest checkpoint of `output_dir`. A run whose every member diverged raises
        `DivergenceError` after writing what it measured to all_results.json."""
        from hf_graft.run.preflight import check_run_settings

        started = time.perf_counter()
        self._member_params = None
        check_run_settings(self.args)
        self.run_identity = run_identity(self)
        claim = OutputDirClaim(
            self.args, resume_from_checkpoint, identity=self.run_identity, needed_bytes=self._checkpoint_bytes(),
            # a second train() of this trainer continues in the folder it already claimed
            check_fresh=not getattr(self, "_claimed_output_dir", False), clear=False,
        )
        self._claimed_output_dir = True
        clear_previous_run = claim.at_train_begin()  # replace_output_dir: only once everything is built
        self.add_callback(clear_previous_run)
        try:
            with _cudnn_benchmark(self._cudnn_benchmark_setting()):
                try:
                    output = self._train_with_nan_inf_filter_on_device(resume_from_checkpoint=claim.resume,
                                                                       trial=trial, **kwargs)
                except DivergenceError as err:
                    if self.is_world_process_zero():
                        self.save_metrics("all", measured_results(self.state, err), combined=False)
                        self.save_state()
                    raise
                self._finish_run(output.metrics, started)
            return output
        finally:
            self.remove_callback(clear_previous_run)
            claim.release()
            self._close_progress_bars()  # an error then starts on a line of its own

    def _cudnn_benchmark_setting(self) -> bool:
        """`GraftingConfig.cudnn_benchmark`, null read as: on for CUDA unless full_determinism, else unchanged."""
        if self.args.cudnn_benchmark is not None:
            if self.args.cudnn_benchmark and self.args.device.type != "cuda":
                logger.warning("GraftingConfig.cudnn_benchmark: true has no effect on %s (cuDNN runs on CUDA devices)",
                               self.args.device.type)
            return self.args.cudnn_benchmark
        if self.args.device.type == "cuda":
            return not self.args.full_determinism
        return torch.backends.cudnn.benchmark

    def _finish_run(self, train_metrics: dict, started: float) -> None:
        self.results = self.run_results(train_metrics)
        try:
            if self.args.export_student:
                if self.results["selected_member"] is None:
                    logger.warning("no student written: %s", self.results["selection_reason"])
                else:
                    self.save_student()
        finally:  # the results are written even when the export fails
            self.results["wall_time_s"] = round(time.perf_counter() - started, 2)
            if self.is_world_process_zero():
                self.save_metrics("all", self.results, combined=False)
                self.save_state()
                for line in summary_lines(self.results, self.args.num_students):
                    logger.info(line)
            self.accelerator.wait_for_everyone()

    def _close_progress_bars(self) -> None:
        from transformers.trainer_callback import ProgressCallback

        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ProgressCallback):
                for name in ("training_bar", "prediction_bar"):
                    bar = getattr(callback, name, None)
                    if bar is not None:
                        bar.close()
                        setattr(callback, name, None)

    def _checkpoint_bytes(self) -> int:
        """Disk room a checkpoint needs: the population's tensors and up to twice that of optimizer state
        (without checkpoints: one member, the exported student)."""
        size = sum(t.numel() * t.element_size() for t in self.population.state_dict().values() if torch.is_tensor(t))
        if str(getattr(self.args.save_strategy, "value", self.args.save_strategy)) != "no":
            return 3 * size
        return size // self.population.num_members if getattr(self.args, "export_student", False) else 0

    @property
    def diverged_members(self) -> dict[int, int]:
        """Members seen with non-finite weights or losses, and the step at which each was first seen."""
        return dict(self.divergence_monitor.diverged)

    def _train_with_nan_inf_filter_on_device(self, **kwargs):
        """On CUDA, Trainer's `logging_nan_inf_filter` runs on the device (`training_step`): the
        Trainer's own check reads every step's loss on the host, which stalls the GPU's queue once a
        step. The argument is restored when training ends."""
        filter_on_host = self.args.logging_nan_inf_filter
        self._nan_inf_filter_on_device = bool(filter_on_host) and self._streams_to_device()
        if self._nan_inf_filter_on_device:
            self.args.logging_nan_inf_filter = False
        try:
            return super().train(**kwargs)
        finally:
            self.args.logging_nan_inf_filter = filter_on_host
            self._nan_inf_filter_on_device = False

    def run_results(self, train_metrics: dict | None = None) -> dict:
        """The metrics of the weights the run ends with, the selected member and why, the settings and
        every member's filter health. The evaluation is the one already logged for these weights (the
        last one, or the best checkpoint's after `load_best_model_at_end`) when there is one."""
        args: GraftingConfig = self.args
        results = dict(train_metrics or {})
        if self.eval_dataset is not None:
            results.update(self._final_evaluation())
        members = member_metrics(results, args.num_students)
        if self.eval_dataset is None and args.select_student == "best":
            selected, reason = None, "no eval_dataset to choose the best member by (select_student: best)"
        else:
            selected, reason = select_member(members, args.select_student, num_members=args.num_students,
                                             diverged=self.diverged_members)
        results.update(selected_member=selected, selection_reason=reason, grafting=args.grafting_settings())
        if args.kd_settings():
            results["distillation"] = args.kd_settings()
        results["filters"] = filter_summaries(results, self.population.members, thresholds=args.filter_thresholds,
                                              bins=args.graft_bins)
        if self.diverged_members:  # members that went on alone with non-finite weights (never scions)
            results["diverged_members"] = {str(k): step for k, step in self.diverged_members.items()}
        return results

    def _final_evaluation(self) -> dict:
        step = self.state.global_step
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            step = self.state.best_global_step  # the weights now loaded are that checkpoint's
        for entry in reversed(self.state.log_history):
            if entry.get("step") == step and "eval_runtime" in entry:
                return {key: value for key, value in entry.items() if key != "step"}
        return self.evaluate()

    def save_student(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write the selected member (default: `output_dir/student`) as a folder that timm and
        transformers both load, with its model card, checked by reloading it both ways before it
        replaces an earlier export (see `student_folder.save_student`). Uses `self.results` (the end
        of `train()`), computing them if `train()` has not run."""
        results = self.results if self.results is not None else self.run_results()
        k = results["selected_member"]
        if k is None:
            raise ValueError(f"GraftingTrainer.save_student: {results['selection_reason']}")
        folder = Path(output_dir) if output_dir is not None else Path(self.args.output_dir) / STUDENT_DIR
        if self.is_world_process_zero():
            args, spec, member = self.args, self.population.spec, self.population.members[k]
            data_config = spec.data_config if spec is not None and spec.data_config else None
            data_config = data_config or resolve_student_data_config(member)
            architecture = args.student_model
            if architecture.startswith(("hf-hub:", "local-dir:")):  # the registry name behind the id
                architecture = member.pretrained_cfg.get("architecture", architecture)
            label_names = spec.label_names if spec is not None else None
            card = build_model_card(
                architecture=architecture, label_names=label_names,
                dataset_name=spec.dataset_name if spec is not None else None,
                member_metrics=member_metrics(results, args.num_students), ensemble_metrics=ensemble_metrics(results),
                selected_member=k, selection_reason=results["selection_reason"],
                grafting_settings=args.grafting_settings(), kd_settings=args.kd_settings(),
                repo_id=args.hub_model_id if args.push_student_to_hub else None, data_config=data_config,
            )
            save_student(member, folder, architecture=architecture, model_kwargs=args.student_model_kwargs,
                         label_names=label_names, data_config=data_config, card=card)
        results["student_dir"] = str(folder)
        self.student_dir = folder
        return folder

    def push_to_hub(self, commit_message: str | None = None, blocking: bool = True, token: str | None = None,
                    revision: str | None = None, **kwargs) -> str | None:
        """Upload only the student folder (its three files) to `hub_model_id`, never the population, the
        optimizer or a checkpoint; writes the folder first if `train()` did not. A failed upload raises
        `PushToHubError` with one line naming the repo (the token removed); the local folder stays.
        Returns the repo URL (on the main process; None on the others)."""
        if not self.args.hub_model_id:
            raise ValueError("GraftingConfig.hub_model_id: required to push the student to the Hub")
        folder = self.student_dir if self.student_dir is not None else self.save_student()
        if not self.is_world_process_zero():
            return None
        url = push_student(folder, self.args.hub_model_id, token=token or self.args.hub_token,
                           private=self.args.hub_private_repo,
                           commit_message=commit_message or "Upload filter-grafted student (hf_graft)")
        logger.info("pushed the student to %s", url)
        return url

    # ------------------------------------------------------------------ processes, checkpoints, resume
    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Give every process the buffers (BatchNorm running statistics) of process 0.

        DDP broadcasts process 0's buffers at the start of every training forward, and each process
        then updates them with its own shard of the batch, so after the last step of an epoch the
        processes disagree. Grafting mixes those statistics too: without this broadcast the
        members drift apart across processes at every graft, and every process evaluates a
        slightly different population than the one process 0 saves. One collective per dtype.
        """
        import torch.distributed as dist

        if self.args.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return
        groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for buffer in self.population.buffers():
            groups[(buffer.device, buffer.dtype)].append(buffer)
        for buffers in groups.values():
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.broadcast(flat, src=0)
            offset = 0
            for b in buffers:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()

    def evaluate(self, *args, **kwargs):
        """Evaluation leaves the training's random streams untouched (it would otherwise draw from the
        global RNG when its dataloader starts), so the weights a run ends with do not depend on when
        or how often it evaluates, and a run resumed from a checkpoint written before an evaluation
        (e.g. save_steps hitting an epoch's last step, eval_strategy "epoch") stays exact."""
        self.sync_buffers()  # every process evaluates the population that process 0 saves
        with preserved_rng(self.args.device):
            return super().evaluate(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        """Per-epoch permutation seeded by (data_seed or seed, epoch), epoch-tagged indices.

        Independent of the global RNG, so it is the same on every process (Accelerate shards its
        batches) and the same when a run is resumed; the tags seed each example's augmentation.
        """
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, (MemberOrderDataset, DeviceImageDataset)) and self.args.train_sampling_strategy == "random":
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler = getattr(self, "_epoch_sampler", None)
            # one sampler per trainer (every dataloader built for training shares it), so the epoch
            # set by _SamplerEpochCallback reaches the loader that trains
            if sampler is None or sampler.num_examples != len(dataset) or sampler.seed != seed:
                sampler = self._epoch_sampler = EpochShuffleSampler(len(dataset), seed=seed)
            return sampler
        return super()._get_train_sampler(train_dataset)

    def _load_callback_state(self) -> None:
        """With `restore_callback_states_from_checkpoint`, the Trainer rebuilds stateful callbacks from
        their saved state, which cannot hold a reference to this trainer: re-attach it, or the
        restored GraftingCallback would never graft."""
        super()._load_callback_state()
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, GraftingCallback) and callback.trainer is None:
                callback.trainer = self
                self.graft_callback = callback


def _is_sharded(accelerator) -> bool:
    """FSDP and DeepSpeed shard the parameters: per-member norms and fused members do not apply there."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


# ----------------------------------------------------------------------------- global settings
@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool):
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


class _SamplerEpochCallback(TrainerCallback):
    """Sets the epoch of GraftingTrainer's EpochShuffleSampler at every epoch begin.

    Accelerate forwards `set_epoch` to the sampler in most set-ups, but not through the wrappers of
    a distributed run resumed mid-epoch (SkipBatchSampler around BatchSamplerShard); the epoch is
    then read from the trainer state, which the checkpoint restores.
    """

    def __init__(self, trainer: GraftingTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        sampler = getattr(self.trainer, "_epoch_sampler", None)
        if sampler is not None:
            sampler.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))
