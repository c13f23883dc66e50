"""A tiny GraftingTrainer on builtin:digits for the resume / precision tests.

The population is built with `config.student_model_kwargs` (e.g. dropout, so that the forward
pass draws from the global RNG as real recipes do), and the trainer class can be swapped for a
recording subclass. conftest's `make_trainer` fixture is this with its own defaults.
"""

from __future__ import annotations

import dataclasses

import torch

import hf_graft  # noqa: F401  (registers the cifar_* models in timm)
from hf_graft.config import GraftingConfig
from hf_graft.data import population_datasets, resolve_student_data_config
from hf_graft.population import PopulationSpec, StudentPopulation
from hf_graft.trainer import GraftingTrainer


def build_trainer(digits, output_dir, *, trainer_cls=GraftingTrainer, callbacks=None, teachers=None,
                  max_train_samples=None, **overrides) -> GraftingTrainer:
    """Defaults: cifar_resnet20 at 16 px, K = 2, batch 16 (64 images: 4 steps an epoch), 3 epochs,
    eval every epoch, CPU, no dataloader workers, no checkpoints."""
    data_args, data = digits
    kwargs = dict(
        output_dir=str(output_dir), student_model="cifar_resnet20", num_students=2, num_train_epochs=3,
        per_device_train_batch_size=16, per_device_eval_batch_size=64, use_cpu=True, dataloader_num_workers=0,
        save_strategy="no", eval_strategy="epoch", logging_steps=1, seed=0, report_to="none", disable_tqdm=True,
        learning_rate=0.05, lr_spread=["cosine"], filter_thresholds=[0.1],
    )
    kwargs.update(overrides)
    config = GraftingConfig(**kwargs)
    spec = PopulationSpec(config.student_model, config.num_students, data.num_classes,
                          student_model_kwargs=config.student_model_kwargs, label_names=data.label_names)
    population = StudentPopulation.from_spec(spec, seed=config.seed, shared_init=config.shared_init)
    spec.data_config = resolve_student_data_config(population.members[0], data_args.input_size)
    if max_train_samples is not None:
        data = dataclasses.replace(data, train=data.train.select(range(max_train_samples)))
    train_dataset, eval_dataset = population_datasets(
        data, data_args, spec.data_config, num_members=config.num_students, order=config.data_order, seed=config.seed,
    )
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
