"""GraftingTrainer: a `transformers.Trainer` for a population of grafted students (thin glue).

The math lives in `grafting.py` (the graft), `distill.py` (the KD loss) and `population.py`
(the K members as one module); this file only decides *when* things happen and wires them into
the Trainer's optimizer, clipping, evaluation, logging and checkpointing.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import default_collate
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import EvalPrediction

from .config import GraftingConfig
from .data import EpochShuffleSampler, MemberOrderDataset
from .filters import filter_report
from .grafting import GraftReport, graft_internal, graft_members, graft_noise
from .metrics import PopulationMetrics
from .population import PopulationSpec, StudentPopulation
from .registry import check_folder_architecture

__all__ = ["GraftingCallback", "GraftingTrainer", "population_metrics", "load_teacher"]


# ----------------------------------------------------------------------------- metrics
def population_metrics(logits: torch.Tensor, labels: torch.Tensor, select_student: str = "best") -> dict[str, float]:
    """Top-1/top-5 (percent) of every member, of the ensemble (mean softmax) and of the selected member.

    `logits` is [N, K, C], `labels` [N]. The trainer computes the same numbers through the `evaluate`
    metric `population_accuracy` (hf_graft.metrics), together with any extra metrics.
    """
    from timm.utils import accuracy

    logits = torch.as_tensor(logits).float()
    labels = torch.as_tensor(labels).long()
    if labels.ndim == 2:  # per-member labels: evaluation data is shared, take the first view
        labels = labels[:, 0]
    num_members = logits.shape[1]
    topk = (1, min(5, logits.shape[-1]))
    metrics: dict[str, float] = {}
    top1 = []
    for k in range(num_members):
        acc1, acc5 = accuracy(logits[:, k], labels, topk=topk)
        metrics[f"member{k}_top1"] = float(acc1)
        metrics[f"member{k}_top5"] = float(acc5)
        top1.append(float(acc1))
    ens1, ens5 = accuracy(torch.softmax(logits, dim=-1).mean(dim=1), labels, topk=topk)
    metrics["ensemble_top1"] = float(ens1)
    metrics["ensemble_top5"] = float(ens5)
    selected = int(np.argmax(top1)) if select_student == "best" else int(select_student)
    metrics["selected_member"] = float(selected)
    metrics["top1"] = metrics[f"member{selected}_top1"]
    metrics["top5"] = metrics[f"member{selected}_top5"]
    return metrics


# ----------------------------------------------------------------------------- teachers
def load_teacher(name: str, model_kwargs: dict | None = None) -> nn.Module:
    """A frozen teacher from a timm name, an 'hf-hub:'/'local-dir:' id or a folder hf_graft exported."""
    import timm

    kwargs = dict(model_kwargs or {})
    if os.path.isdir(name):
        if os.path.isfile(os.path.join(name, "graft_population.json")):
            raise ValueError(
                f"GraftingConfig.teacher_models: {name!r} is a training checkpoint (a whole population); "
                "export one member first (hf-graft export) or point at output_dir/student"
            )
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(f"GraftingConfig.teacher_models: folder {name!r} has no config.json")
        check_folder_architecture(name, f"GraftingConfig.teacher_models: {name!r}")
        model = timm.create_model(f"local-dir:{os.path.abspath(name)}", pretrained=True, **kwargs)
    elif name.startswith(("hf-hub:", "local-dir:")):
        model = timm.create_model(name, pretrained=True, **kwargs)
    elif timm.is_model(name):
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:
            raise ValueError(
                f"GraftingConfig.teacher_models: no trained weights for {name!r} available here "
                f"({type(err).__name__}); use a local folder of a trained model"
            ) from err
    else:
        raise ValueError(
            f"GraftingConfig.teacher_models: {name!r} is neither a timm model name, an hf-hub:/local-dir: id, "
            "nor an existing folder"
        )
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- callback
class GraftingCallback(TrainerCallback, ExportableState):
    """Decides when to graft; its counter is saved in checkpoints so a resumed run grafts exactly
    where an uninterrupted one would (and never twice at one boundary)."""

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
class GraftingTrainer(Trainer):
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
        model.ce_weight, model.kd_weight, model.kd_temperature = args.ce_weight, args.kd_weight, args.kd_temperature

        if teachers is None and args.teacher_models:
            teachers = [load_teacher(name, args.teacher_model_kwargs) for name in args.teacher_models]
        self.teachers: list[nn.Module] = list(teachers or [])
        self._check_teachers(model, args)

        self.graft_callback = GraftingCallback(self)
        self.graft_reports: list[GraftReport] = []
        self._member_loss_sums: dict[str, torch.Tensor] = {}
        self._member_loss_count = 0
        self._member_grad_norms: torch.Tensor | None = None
        # top-1/top-5 through the evaluate metric shipped with hf_graft, plus args.extra_metrics
        self.eval_metrics = PopulationMetrics(
            args.select_student, args.extra_metrics, args.extra_metric_kwargs, owner=f"{type(args).__name__}.extra_metrics"
        )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or default_collate,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            compute_metrics=compute_metrics or self._compute_metrics,
            callbacks=[self.graft_callback, *(callbacks or [])],
            **kwargs,
        )
        self._place_teachers()
        self._epoch_sampler: EpochShuffleSampler | None = None
        self.add_callback(_SamplerEpochCallback(self))

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
        for teacher in self.teachers:
            teacher.eval().requires_grad_(False)
            teacher.to(device=device, dtype=half) if half is not None else teacher.to(device)

    @torch.no_grad()
    def _teacher_logits(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """[M, B, C] for a shared batch, [M, B, K, C] for per-member batches (one teacher pass each)."""
        if not self.teachers:
            return None
        per_member = pixel_values.ndim == 5
        flat = pixel_values.flatten(0, 1) if per_member else pixel_values
        outs = []
        for teacher in self.teachers:
            dtype = next(teacher.parameters()).dtype
            z = teacher(flat.to(dtype)).float()
            outs.append(z.view(pixel_values.shape[0], pixel_values.shape[1], -1) if per_member else z)
        return torch.stack(outs)

    # ------------------------------------------------------------------ optimisation
    @property
    def population(self) -> StudentPopulation:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False) if hasattr(self, "accelerator") else self.model

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
            gamma = self.args.lr_decay_gamma

            def step_decay(step: int) -> float:
                if step < warmup:
                    return (step + 1) / (warmup + 1)
                return gamma ** sum(step >= m for m in milestones)

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, step_decay)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _clip_grad_norm(self, model):
        """Clip every member's gradient norm on its own: one global clip would couple the members."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()  # fp16: undo the loss scale once, before measuring
        norms = torch.stack([
            torch.nn.utils.clip_grad_norm_(member.parameters(), self.args.max_grad_norm)
            for member in self.population.members
        ])
        self._member_grad_norms = norms.detach()
        return norms.norm()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values = inputs["pixel_values"]
        teacher_logits = self._teacher_logits(pixel_values) if model.training else None
        outputs = model(pixel_values=pixel_values, labels=inputs.get("labels"), teacher_logits=teacher_logits)
        if model.training and "member_ce" in outputs:
            for key in ("member_ce", "member_kd"):
                if key in outputs:
                    total = self._member_loss_sums.get(key)
                    self._member_loss_sums[key] = outputs[key] if total is None else total + outputs[key]
            self._member_loss_count += 1
            if self.optimizer is not None:  # the rates this step's update uses (the scheduler steps after it)
                self._member_lrs = {g.get("member", 0): g["lr"] for g in self.optimizer.param_groups}
        loss = outputs["loss"]
        return (loss, {"loss": loss, "logits": outputs["logits"]}) if return_outputs else loss

    # ------------------------------------------------------------------ grafting
    @torch.no_grad()
    def graft(self, step: int) -> GraftReport | None:
        """One graft of the population (the `step`-th, 0-based), logged through the Trainer."""
        args: GraftingConfig = self.args
        population = self.population
        members = list(population.members)
        report = None
        logs: dict[str, float] = {}
        # every process must graft the same weights: DDP keeps parameters identical, but BatchNorm
        # running statistics are updated locally after DDP's broadcast in each forward
        self.sync_buffers()
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
        if args.bn_recalibration_batches > 0:
            self._recalibrate_batchnorm(args.bn_recalibration_batches, seed=args.seed + step)
        logs.update({f"graft/{name}": value for name, value in self.filter_metrics().items()})
        logs["graft/count"] = float(step + 1)
        self.log(logs)
        return report

    @torch.no_grad()
    def _recalibrate_batchnorm(self, num_batches: int, seed: int) -> None:
        """Re-estimate BatchNorm running statistics of the mixed weights on a few training batches.

        Linear mixing of two networks' running means and variances is not the statistics of the mixed
        network; this pass (cumulative average, train-mode BN, no gradients) replaces them.
        """
        population = self.population
        bns = [m for m in population.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not bns:
            return
        saved = [(m, m.momentum) for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the recalibration batches
        was_training = population.training
        population.train()
        generator = torch.Generator().manual_seed(seed)
        dataset = self.train_dataset
        batch = self.args.per_device_train_batch_size
        order = torch.randperm(len(dataset), generator=generator)[: num_batches * batch].tolist()
        # forked RNG: the global stream (dropout, augmentation) continues as if no recalibration ran,
        # which keeps a run resumed at this epoch boundary identical to an uninterrupted one
        devices = [self.args.device.index or 0] if self.args.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(order), batch):
                items = default_collate([dataset[i] for i in order[start:start + batch]])
                population(pixel_values=items["pixel_values"].to(self.args.device))
        for m, momentum in saved:
            m.momentum = momentum
        population.train(was_training)

    # ------------------------------------------------------------------ evaluation and logging
    def _compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        metrics = self.eval_metrics(logits, prediction.label_ids)
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
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and self.population.spec is not None:
            self.population.spec.save(output_dir)

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
        with _preserved_rng(self.args.device):
            return super().evaluate(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        """Per-epoch permutation seeded by (data_seed or seed, epoch), epoch-tagged indices.

        Independent of the global RNG, so it is the same on every process (Accelerate shards its
        batches) and the same when a run is resumed; the tags seed each example's augmentation.
        """
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, MemberOrderDataset) and self.args.train_sampling_strategy == "random":
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

    def _save_checkpoint(self, model, trial) -> None:
        """Write `checkpoint-N` atomically.

        transformers' own `_save_checkpoint` writes straight into `checkpoint-N`, so a process killed
        while saving leaves a half-written folder that `get_last_checkpoint` then picks. Here every
        process writes its part (model, optimizer, scheduler, scaler, its RNG state, trainer state)
        into `tmp-checkpoint-N`; once all have finished, the folder is flushed to disk and renamed
        to `checkpoint-N` in one `os.rename`. A killed save leaves only `tmp-checkpoint-N`, which
        neither `get_last_checkpoint` nor the rotation of `save_total_limit` match, and which the
        next save of that step removes. `best_model_checkpoint` and rotation follow the final name.
        """
        from transformers.trainer import TRAINER_STATE_NAME
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

        args = self.args
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final_dir = os.path.join(run_dir, name)
        staging_dir = os.path.join(run_dir, STAGING_PREFIX + name)
        if args.local_process_index == 0:  # one process per node (nodes may not share a file system)
            shutil.rmtree(staging_dir, ignore_errors=True)  # left over by a save that was killed
            os.makedirs(staging_dir, exist_ok=True)
        self.accelerator.wait_for_everyone()

        self.save_model(staging_dir, _internal_call=True)
        if not args.save_only_model:
            self._save_optimizer_and_scheduler(staging_dir)
            self._save_scaler(staging_dir)
            self._save_rng_state(staging_dir)

        if (
            args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
            and self.state.best_global_step
        ):
            best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if self.state.best_global_step == self.state.global_step or os.path.isdir(best_dir):
                self.state.best_model_checkpoint = best_dir
        if args.should_save:
            for callback in [*self.callback_handler.callbacks, self.control]:
                if isinstance(callback, ExportableState):
                    key = type(callback).__name__
                    if isinstance(self.state.stateful_callbacks.get(key), list):
                        self.state.stateful_callbacks[key].append(callback.state())
                    else:
                        self.state.stateful_callbacks[key] = callback.state()
            self.state.save_to_json(os.path.join(staging_dir, TRAINER_STATE_NAME))

        self.accelerator.wait_for_everyone()  # every process has written its files
        if args.process_index == 0:
            _publish_dir(staging_dir, final_dir)
        self.accelerator.wait_for_everyone()
        # nodes that do not share process 0's file system publish their own copy, one after it
        if args.process_index != 0 and args.local_process_index == 0 and os.path.isdir(staging_dir):
            _publish_dir(staging_dir, final_dir)
        self.accelerator.wait_for_everyone()

        if args.push_to_hub:
            self._push_from_checkpoint(final_dir)
        if args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )


# ----------------------------------------------------------------------------- checkpoint helpers
@contextlib.contextmanager
def _preserved_rng(device: torch.device):
    """Restore the python, numpy and torch (CPU and the training CUDA device) RNG states on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


STAGING_PREFIX = "tmp-"  # `tmp-checkpoint-N`: matched by neither get_last_checkpoint nor rotation


def _fsync_tree(folder: str) -> None:
    """Flush every file of `folder`, then the folder itself, to stable storage."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish_dir(staging_dir: str, final_dir: str) -> None:
    """Rename a complete staging folder to its final name (replacing an older copy of that name)."""
    _fsync_tree(staging_dir)
    replaced = None
    if os.path.isdir(final_dir):
        replaced = staging_dir + "-replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final_dir, replaced)
    os.rename(staging_dir, final_dir)
    _fsync_dir(os.path.dirname(os.path.abspath(final_dir)))
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


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
