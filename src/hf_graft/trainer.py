"""GraftingTrainer: a `transformers.Trainer` for a population of grafted students (thin glue).

The math lives in `grafting.py` (the graft), `distill.py` (the KD loss) and `population.py`
(the K members as one module); this file only decides *when* things happen and wires them into
the Trainer's optimizer, clipping, evaluation, logging and checkpointing.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import default_collate
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import EvalPrediction

from .config import GraftingConfig
from .grafting import GraftReport, graft_internal, graft_members, graft_noise
from .population import PopulationSpec, StudentPopulation

__all__ = ["GraftingCallback", "GraftingTrainer", "population_metrics", "load_teacher"]


# ----------------------------------------------------------------------------- metrics
def population_metrics(logits: torch.Tensor, labels: torch.Tensor, select_student: str = "best") -> dict[str, float]:
    """Top-1/top-5 (percent) of every member, of the ensemble (mean softmax) and of the selected member.

    `logits` is [N, K, C], `labels` [N].
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
        saved = state.stateful_callbacks.get(type(self).__name__) if state.stateful_callbacks else None
        if isinstance(saved, dict):
            self.grafts_done = int(saved.get("attributes", {}).get("grafts_done", self.grafts_done))
        elif state.global_step == 0:
            self.grafts_done = 0

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
        self._check_teachers(model)

        self.graft_callback = GraftingCallback(self)
        self.graft_reports: list[GraftReport] = []
        self._member_loss_sums: dict[str, torch.Tensor] = {}
        self._member_loss_count = 0
        self._member_grad_norms: torch.Tensor | None = None
        select = args.select_student
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or default_collate,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            compute_metrics=compute_metrics or (lambda p: self._compute_metrics(p, select)),
            callbacks=[self.graft_callback, *(callbacks or [])],
            **kwargs,
        )
        self._place_teachers()

    # ------------------------------------------------------------------ teachers
    def _check_teachers(self, population: StudentPopulation) -> None:
        num_classes = population.members[0].num_classes if hasattr(population.members[0], "num_classes") else None
        for i, teacher in enumerate(self.teachers):
            t_classes = getattr(teacher, "num_classes", None)
            if num_classes is not None and t_classes is not None and t_classes != num_classes:
                name = self.args.teacher_models[i] if self.args.teacher_models else f"teacher {i}"
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
        if args.graft_source == "external":
            report = graft_members(
                members, criterion=args.graft_criterion, bins=args.graft_bins, A=args.graft_A, c=args.graft_c,
                level=args.graft_level,
            )
            logs.update(report.to_log_dict())
            self.graft_reports.append(report)
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
        for start in range(0, len(order), batch):
            items = default_collate([dataset[i] for i in order[start:start + batch]])
            population(pixel_values=items["pixel_values"].to(self.args.device))
        for m, momentum in saved:
            m.momentum = momentum
        population.train(was_training)

    # ------------------------------------------------------------------ evaluation and logging
    def _compute_metrics(self, prediction: EvalPrediction, select_student: str) -> dict[str, float]:
        logits = prediction.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return population_metrics(torch.as_tensor(logits), torch.as_tensor(prediction.label_ids), select_student)

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
            if self.optimizer is not None:
                lrs = defaultdict(float)
                for group in self.optimizer.param_groups:
                    lrs[group.get("member", 0)] = group["lr"]
                for k, lr in sorted(lrs.items()):
                    logs[f"member{k}_learning_rate"] = lr
        super().log(logs, start_time) if start_time is not None else super().log(logs)

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and self.population.spec is not None:
            self.population.spec.save(output_dir)
