"""GraftingTrainer: a `transformers.Trainer` for a population of grafted students.

It holds the Trainer's hooks and the order of a run; each job lives in its own module: the graft in
`graft/`, the population and teachers in `population/`, when to graft and divergence in
`training/callbacks.py`, parameter groups and per-member norms in `training/optimization.py`, the
run's folder and results in `run/`, the student and the Hub in `export/` (docs/method.md §6: when).
The private Trainer hooks overridden here are listed in `hf_graft/_compat.py`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from transformers import Trainer
from transformers.trainer_utils import EvalPrediction

from hf_graft import _compat
from hf_graft.config import GraftingConfig
from hf_graft.data.on_device import DeviceImageDataset, collate_examples
from hf_graft.data.sampling import EpochShuffleSampler, MemberOrderDataset
from hf_graft.data.transfer import SideStreamCopy, on_host
from hf_graft.data.transforms import DeviceNormalizer, students_data_config
from hf_graft.graft.filters import population_filter_metrics
from hf_graft.graft.grafting import GraftReport
from hf_graft.graft.step import graft_population
from hf_graft.population.fused import separate_storage
from hf_graft.population.students import PopulationSpec, StudentPopulation
from hf_graft.run.checkpoints import one_line_when_disk_full
from hf_graft.run.output_dir import OutputDirClaim, checkpoint_bytes, run_identity, save_run_identity
from hf_graft.run.preflight import check_run_settings, cudnn_benchmark, cudnn_benchmark_setting
from hf_graft.run.results import logged_evaluation, run_results, summary_lines
from hf_graft.training.callbacks import (
    BatchNormRecalibrationCallback, DivergenceMonitor, GraftingCallback, SamplerEpochCallback, dispatch_graft_event,
)
from hf_graft.training.divergence import measured_results
from hf_graft.training.member_logs import MemberLogs
from hf_graft.training.student import StudentExport
from hf_graft.training.setup import (
    derived_config, evaluation_metrics, run_args, teacher_dtype, teacher_ensemble, trainer_population,
)
from hf_graft.training.optimization import (
    MemberGradients, is_sharded, member_param_groups, step_decay_scheduler,
)
from hf_graft.utils.distributed import broadcast_buffers
from hf_graft.utils.rng import preserved_rng

__all__ = ["GraftingCallback", "GraftingTrainer"]

logger = logging.getLogger(__name__)


class GraftingTrainer(StudentExport, Trainer):
    """Trains K students with the Trainer, grafting them in a ring at epoch boundaries. `model`: a
    `StudentPopulation`, or a `PopulationSpec` built with `args.seed` (member k seeded `seed + 1000 k`);
    `teachers` (grafting+) default to `args.teacher_models`; `selection_dataset` chooses the student."""

    def __init__(self, model: StudentPopulation | PopulationSpec | None = None, args: GraftingConfig | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None,
                 teachers: Sequence[nn.Module] | None = None, compute_metrics=None, callbacks=None,
                 selection_dataset=None, **kwargs):
        population = trainer_population(model, args)  # its loss weights and execution set from `args`
        args = run_args(args, train_dataset, eval_dataset)
        self._population, self.channels_last = population, population.channels_last
        self.member_gradients = MemberGradients(population.members)
        on_cuda = args.device.type == "cuda"
        self.teachers = teacher_ensemble(teachers, args, population)
        self.graft_reports: list[GraftReport] = []
        self.member_logs = MemberLogs()  # each member's loss terms, gradient norm and rate, for the logs
        self._nan_inf_filter_on_device, self._normalizer = False, None  # normalizer: normalize_on_device
        # pinned training batches go to the GPU on a stream of their own (data/transfer.py)
        self._batch_copy = SideStreamCopy(args.device) if on_cuda and args.dataloader_pin_memory else None
        self.eval_metrics = evaluation_metrics(args, population)  # top-1/top-5, or mAP / CMC for task reid
        self._samplers: list[EpochShuffleSampler] = []
        self.divergence_monitor = DivergenceMonitor(population.members)
        own = [GraftingCallback()]
        if args.bn_recalibration_batches:  # before users' callbacks: their on_graft_end sees the new statistics
            own.append(BatchNormRecalibrationCallback(args.bn_recalibration_batches))
        super().__init__(model=population, args=args, data_collator=data_collator or collate_examples,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         compute_metrics=compute_metrics or self._compute_metrics,
                         callbacks=[*own, *(callbacks or [])], **kwargs)
        if population.fused is not None and is_sharded(self.accelerator):
            raise ValueError("GraftingConfig.member_execution: 'fused' runs with one process or DDP, not with "
                             f"{self.accelerator.distributed_type.value}; use member_execution: loop")
        self.label_smoother = None  # the population smooths every member's CE itself (population/students.py)
        self.teachers.place(args.device, half=teacher_dtype(args), channels_last=self.channels_last)
        self.add_callback(SamplerEpochCallback(self._samplers))
        self.add_callback(self.divergence_monitor)
        self.selection_dataset = selection_dataset  # chooses the student when given (selection_split_percentage)
        self.results: dict | None = None  # the end of the run (see `train`)
        self.student_dir: Path | None = None
        self.run_identity: dict | None = None  # set by train(); saved in every checkpoint

    @property
    def population(self) -> StudentPopulation:
        """The population trained, whatever wraps it (DDP, torch.compile), without a walk to unwrap it."""
        return self._population

    @property
    def graft_callback(self) -> GraftingCallback:  # the Trainer may rebuild it from a checkpoint
        return next(c for c in self.callback_handler.callbacks if isinstance(c, GraftingCallback))

    @property
    def epoch_sampler(self) -> EpochShuffleSampler | None:  # once the training dataloader is built
        return self._samplers[0] if self._samplers else None

    @property
    def diverged_members(self) -> dict[int, int]:
        """Members seen with non-finite weights or losses, and the step each was first seen at."""
        return dict(self.divergence_monitor.diverged)

    # ------------------------------------------------------------------ optimisation
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
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            decayed = (self.get_decay_parameter_names(self.model) if self.args.weight_decay_scope == "transformers"
                       else [name for name, _ in self.model.named_parameters()])  # "all": the papers' SGD
            groups = member_param_groups(self.population.members, decayed,
                                         learning_rate=self.args.learning_rate,
                                         multipliers=self.args.lr_multipliers, weight_decay=self.args.weight_decay)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's schedulers, or the papers' step decay (`lr_decay_epochs`, after `warmup_steps`)."""
        if not self.args.lr_decay_epochs:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            steps_per_epoch = num_training_steps / max(self.args.num_train_epochs, 1e-9)
            if self.args.max_steps > 0 and self.train_dataset is not None:
                steps_per_epoch = max(1, len(self.get_train_dataloader()) // self.args.gradient_accumulation_steps)
            self.lr_scheduler = step_decay_scheduler(
                self.optimizer if optimizer is None else optimizer, decay_epochs=self.args.lr_decay_epochs,
                steps_per_epoch=steps_per_epoch, warmup_steps=self.args.get_warmup_steps(num_training_steps),
                gamma=self.args.lr_decay_gamma)
            _compat.mark_scheduler_created(self)
        return self.lr_scheduler

    def _clip_grad_norm(self, model):
        """Clip every member's gradient norm on its own: one global clip would couple the members."""
        if is_sharded(self.accelerator):
            return super()._clip_grad_norm(model)
        return self._member_grad_norms_total(clip=True)

    def _get_grad_norm(self, model, grad_norm=None):
        """Without clipping, the Trainer measures the norm with `clip_grad_norm_(max_norm=inf)`, which scales
        every gradient by inf / norm: NaN for all members as soon as one member's gradient is, so one
        diverged member would spread to the others. Measure each member's norm instead, changing nothing."""
        if grad_norm is None and not is_sharded(self.accelerator):
            grad_norm = self._member_grad_norms_total(clip=False)
        return super()._get_grad_norm(model, grad_norm)

    def _member_grad_norms_total(self, clip: bool) -> torch.Tensor:
        """Every member's gradient norm (after clipping it to `max_grad_norm` when `clip`), kept for the
        logs; returns the norm of those norms. A diverged member's gradients are dropped first, before
        fp16 unscaling looks for inf / nan, and the loss scale is undone once, before measuring."""
        self.divergence_monitor.drop_gradients()
        self.accelerator.unscale_gradients()
        norms = self.member_gradients.norms(self.args.device, max_norm=self.args.max_grad_norm if clip else None)
        self.member_logs.grad_norms = norms = self.divergence_monitor.mark(norms.detach())
        return norms.norm()

    # ------------------------------------------------------------------ batches and the step
    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        if self._batch_copy is not None:  # its batches stay pinned on the host: `_prepare_inputs` copies them
            _compat.keep_batches_on_host(loader)
        return loader

    def _get_train_sampler(self, train_dataset=None):
        """Per-epoch permutation seeded by (data_seed or seed, epoch), epoch-tagged indices: independent of
        the global RNG, so the same on every process and after a resume; the tags seed each example's
        augmentation."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, (MemberOrderDataset, DeviceImageDataset)) and self.args.train_sampling_strategy == "random":
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            # one sampler per trainer (every training dataloader shares it): SamplerEpochCallback sets its epoch
            if not self._samplers or self._samplers[0].num_examples != len(dataset) or self._samplers[0].seed != seed:
                self._samplers[:] = [EpochShuffleSampler(len(dataset), seed=seed)]
            return self._samplers[0]
        return super()._get_train_sampler(train_dataset)

    def _prepare_inputs(self, inputs):
        # training batches only (`training_step` sets the mode first); evaluation keeps Accelerate's copy
        if self._batch_copy is not None and self.model.training and on_host(inputs):
            inputs = self._batch_copy(inputs)
        inputs = super()._prepare_inputs(inputs)
        pixels = inputs.get("pixel_values") if isinstance(inputs, dict) else None
        if pixels is not None and pixels.dtype == torch.uint8:  # DataArguments.normalize_on_device
            if self._normalizer is None:
                self._normalizer = DeviceNormalizer(students_data_config(self.population))
            inputs = {**inputs, "pixel_values": self._normalizer(pixels)}
        return inputs

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        due = self.graft_callback.take_due(self.args, self.state)
        if due is not None:  # before the step's batches and its on_step_begin (GraftingCallback says when)
            self.graft(step=due)
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._nan_inf_filter_on_device:
            # what the Trainer's filter does: a non-finite step loss counts as the mean of the steps
            # accumulated since the last log
            accumulated, last_logged = _compat.logged_loss_state(self)
            since_log = 1 + self.state.global_step - last_logged
            fallback = accumulated / since_log if accumulated is not None else torch.zeros_like(loss)
            loss = torch.where(torch.isfinite(loss), loss, fallback.to(loss.dtype))
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values = inputs["pixel_values"]
        teacher_logits = self.teachers.logits(pixel_values) if model.training else None
        # a features evaluation (task reid) has labels [identity, camera, is_query]: no loss on them
        labels = inputs.get("labels") if model.training or self.population.output == "logits" else None
        outputs = model(pixel_values=pixel_values, labels=labels, teacher_logits=teacher_logits)
        if model.training and "member_ce" in outputs:
            self.member_logs.record_losses(outputs, self.optimizer)
            self.divergence_monitor.observe(outputs["member_ce"], outputs.get("member_kd"))
        loss = outputs["loss"] if "loss" in outputs else outputs["logits"].new_zeros(())
        # evaluation keeps every batch's logits: copies (under torch.compile's CUDA graphs, mode
        # "reduce-overhead", the next step's replay overwrites the outputs in place)
        return (loss, {"loss": loss, "logits": outputs["logits"].clone()}) if return_outputs else loss

    # ------------------------------------------------------------------ grafting
    @torch.no_grad()
    def graft(self, step: int) -> GraftReport | None:
        """One graft of the population (the `step`-th, 0-based), logged through the Trainer.

        Callbacks that define `on_graft_begin` / `on_graft_end` are called right before the weights
        are mixed and right after (with the `GraftReport` of an external graft, else None), with
        `model` the unwrapped population and `graft_index` the 0-based count of this graft.
        """
        # every process must graft the same weights: DDP keeps parameters identical, but BatchNorm
        # running statistics are updated locally after DDP's broadcast in each forward
        self.sync_buffers()
        self._call_graft_event("on_graft_begin", step)
        report, logs = graft_population(list(self.population.members), self.args, step)
        if report is not None:
            self.graft_reports.append(report)
            self._log_alpha_histograms(report)
        self._call_graft_event("on_graft_end", step, report=report)
        logs.update({f"graft/{name}": value for name, value in self.filter_metrics().items()})
        logs["graft/count"] = float(step + 1)
        self.log(logs)
        return report

    def _call_graft_event(self, event: str, graft_index: int, **kwargs) -> None:
        dispatch_graft_event(self.callback_handler.callbacks, event, self.args, self.state, self.control,
                             model=self.population, graft_index=graft_index, train_dataset=self.train_dataset,
                             data_collator=self.data_collator, **kwargs)

    def _log_alpha_histograms(self, report: GraftReport) -> None:
        """Per-member histogram of the anchors' alphas for TensorBoard (when it is a report_to target)."""
        for writer in _compat.tensorboard_writers(self.callback_handler.callbacks):
            for member in report.members:
                if member.alpha_values:
                    writer.add_histogram(f"graft/member{member.index}_alpha", np.asarray(member.alpha_values),
                                         self.state.global_step)

    # ------------------------------------------------------------------ evaluation and logging
    def evaluate(self, *args, **kwargs):
        """Evaluation leaves the training's random streams untouched, so the weights a run ends with do not
        depend on when or how often it evaluates (and a resume stays exact)."""
        self.sync_buffers()  # every process evaluates the population that process 0 saves
        with preserved_rng(self.args.device):
            return super().evaluate(*args, **kwargs)

    def _compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        metrics = self.eval_metrics(logits, prediction.label_ids, leave_out=self.diverged_members)
        metrics.update(self.filter_metrics())
        return metrics

    def filter_metrics(self) -> dict[str, float]:
        """Every member's invalid-filter ratios and total entropy, as flat `member{k}_...` scalars."""
        return population_filter_metrics(self.population.members, thresholds=self.args.filter_thresholds,
                                         bins=self.args.graft_bins)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training entry: each member's numbers beside the Trainer's own
            entries, non_finite = self.member_logs.entries()
            logs.update(entries)
            if non_finite:  # a non-finite batch is never logged as a finite loss
                logs["loss"] = float("nan")
        super().log(logs, start_time) if start_time is not None else super().log(logs)

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # channels_last weights are not contiguous and fused members' statistics share one buffer:
        # safetensors takes neither, so the checkpoint gets contiguous copies of those tensors
        super()._save(output_dir, separate_storage(self.model.state_dict() if state_dict is None else state_dict))
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and self.population.spec is not None:
            self.population.spec.save(output_dir)
        if self.args.should_save and self.run_identity is not None:
            save_run_identity(output_dir, self.run_identity)

    def _save_checkpoint(self, model, trial) -> None:
        with one_line_when_disk_full(self.args.output_dir, self.state.global_step, world_size=self.args.world_size):
            super()._save_checkpoint(model, trial)

    def sync_buffers(self) -> None:
        """Every process gets process 0's buffers (BatchNorm statistics): before a graft and an evaluation."""
        broadcast_buffers(self.population, self.args.world_size)

    # ------------------------------------------------------------------ the run: claim, train, results, student, Hub
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None,
              output_dir_claim: OutputDirClaim | None = None, **kwargs):
        """`Trainer.train`, then the end of the run, once: `self.results` (final evaluation, selected member,
        filter statistics; also `output_dir/all_results.json`), the student folder with `export_student`,
        and a closing summary. Before any step: the settings this device cannot honour (run/preflight.py)
        and `output_dir` claimed for the run (run/output_dir.py), or the caller's `output_dir_claim`.
        `resume_from_checkpoint`: a folder, or True / "true" / "last" for the newest complete checkpoint.
        A run whose every member diverged raises `DivergenceError` after writing what it measured."""
        started = time.perf_counter()
        self.member_gradients.reset()
        claim = output_dir_claim
        if claim is None:
            check_run_settings(self.args)
            # a second train() of this trainer continues in the folder it already claimed
            claim = OutputDirClaim(self.args, resume_from_checkpoint,
                                   check_fresh=not getattr(self, "_claimed_output_dir", False))
        self._claimed_output_dir = True
        clear_previous_run = claim.at_train_begin()  # replace_output_dir: once everything is built
        self.add_callback(clear_previous_run)
        try:
            self.run_identity = run_identity(self)
            claim.confirm(identity=self.run_identity, needed_bytes=checkpoint_bytes(self.population, self.args))
            with cudnn_benchmark(cudnn_benchmark_setting(self.args)):
                output = self._train_with_nan_inf_filter_on_device(resume_from_checkpoint=claim.resume,
                                                                   trial=trial, **kwargs)
                error = self.divergence_monitor.error
                if error is not None:
                    if self.is_world_process_zero():
                        self.save_metrics("all", measured_results(self.state, error), combined=False)
                        self.save_state()
                    raise error
                self._finish_run(output.metrics, started)
            return output
        finally:
            self.remove_callback(clear_previous_run)
            if output_dir_claim is None:
                claim.release()
            _compat.close_progress_bars(self.callback_handler.callbacks)  # an error then starts on its own line

    def _train_with_nan_inf_filter_on_device(self, **kwargs):
        """On CUDA, Trainer's `logging_nan_inf_filter` runs on the device (`training_step`): the
        Trainer's own check reads every step's loss on the host, which stalls the GPU's queue once a
        step. The Trainer then trains with a copy of the config without its filter, and gets the
        config back when training ends."""
        config = self.args
        self._nan_inf_filter_on_device = bool(config.logging_nan_inf_filter) and self._streams_to_device()
        if self._nan_inf_filter_on_device:
            self.args = derived_config(config, logging_nan_inf_filter=False)
        try:
            return super().train(**kwargs)
        finally:
            self.args = config
            self._nan_inf_filter_on_device = False

    def _streams_to_device(self) -> bool:
        """Whether the host runs ahead of the device (CUDA): no per-step host syncs."""
        return self.args.device.type == "cuda"

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

    def run_results(self, train_metrics: dict | None = None) -> dict:
        """The metrics of the weights the run ends with (the evaluation already logged for them when there
        is one), the selected member and why, the settings and every member's filter health."""
        metrics = dict(train_metrics or {})
        if self.eval_dataset is not None:
            step = self.state.global_step
            if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
                step = self.state.best_global_step  # the weights now loaded are that checkpoint's
            metrics.update(logged_evaluation(self.state.log_history, step) or self.evaluate())
        selection = (None if self.selection_dataset is None
                     else self.evaluate(self.selection_dataset, metric_key_prefix="selection"))
        return run_results(metrics, args=self.args, members=self.population.members, task=self.population.task,
                           has_eval=self.eval_dataset is not None, diverged=self.diverged_members,
                           selection_metrics=selection, eval_split=getattr(self.eval_dataset, "split_name", None),
                           selection_split=getattr(self.selection_dataset, "split_name", None))
