"""A tiny GraftingTrainer on builtin:digits, built the way the command line builds a run
(`hf_graft.builder.build_population_and_datasets`).

The population is built with `config.student_model_kwargs` (e.g. dropout, so that the forward
pass draws from the global RNG as real recipes do), and the trainer class can be swapped for a
recording subclass. conftest's `make_trainer` fixture is this with its own defaults.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import TrainerCallback

import hf_graft  # noqa: F401  (registers the cifar_* models in timm)
from hf_graft.training.builder import build_population_and_datasets
from hf_graft.config import GraftingConfig
from hf_graft.training.trainer import GraftingTrainer


def build_trainer(digits, output_dir, *, trainer_cls=GraftingTrainer, callbacks=None, teachers=None,
                  max_train_samples=None, **overrides) -> GraftingTrainer:
    """Defaults: cifar_resnet20 at 16 px, K = 2, batch 16 (64 images: 4 steps an epoch), 3 epochs,
    eval every epoch, CPU, no dataloader workers, no checkpoints, no student export."""
    data_args, data = digits
    kwargs = dict(
        output_dir=str(output_dir), student_model="cifar_resnet20", num_students=2, num_train_epochs=3,
        per_device_train_batch_size=16, per_device_eval_batch_size=64, use_cpu=True, dataloader_num_workers=0,
        save_strategy="no", eval_strategy="epoch", logging_steps=1, seed=0, report_to="none", disable_tqdm=True,
        learning_rate=0.05, lr_spread=["cosine"], filter_thresholds=[0.1], export_student=False,
    )
    kwargs.update(overrides)
    config = GraftingConfig(**kwargs)
    if max_train_samples is not None:
        data = dataclasses.replace(data, train=data.train.select(range(max_train_samples)))
    population, train_dataset, eval_dataset = build_population_and_datasets(config, data_args, data=data)
    return trainer_cls(model=population, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
                       callbacks=callbacks, teachers=teachers)


def population_state(trainer: GraftingTrainer) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer of the population."""
    return {name: t.detach().clone() for name, t in trainer.population.state_dict().items()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if a[name].dtype != b[name].dtype or not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:5]}"


class CountingTrainer(GraftingTrainer):
    """Remembers at which global step each graft of this trainer instance ran."""

    def graft(self, step: int):
        self.graft_log = getattr(self, "graft_log", [])
        self.graft_log.append((step, self.state.global_step))
        return super().graft(step)


class SaveAndStopAtStep(TrainerCallback):
    """Writes a checkpoint at optimizer step `step` and stops there, as a killed-and-resumed run would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True
