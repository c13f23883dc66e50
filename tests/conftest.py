"""Shared fixtures: offline Hub, one torch thread for tiny models, and a tiny GraftingTrainer factory."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any huggingface import reads it
# One intra-op thread per test process (and its subprocesses): tiny convolutions lose badly to
# OpenMP threads fighting over shared cores; the suite gets its parallelism from pytest-xdist.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY_STUDENT = "cifar_resnet20"  # registered in timm by `import hf_graft`
TINY_SIZE = 16  # pixels: enough for a 3-stage CIFAR ResNet, fast on a shared 2-core CPU


@pytest.fixture
def single_thread():
    """Tiny convolutions run much faster on one thread than fighting for two shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def digits_small():
    """builtin:digits, 64 training and 64 held-out images (real data, loaded once per session)."""
    from hf_graft.config import DataArguments
    from hf_graft.data import load_image_data

    args = DataArguments(dataset_name="builtin:digits", max_train_samples=64, max_eval_samples=64, input_size=TINY_SIZE)
    return args, load_image_data(args, seed=0)


@pytest.fixture
def make_trainer(tmp_path, digits_small):
    """Build a GraftingTrainer on `digits_small` with a tiny student; keyword arguments go to GraftingConfig.

    Defaults: 2 epochs of 4 steps (batch 16), CPU, no workers, no checkpoints, a log entry every step.
    `max_train_samples` (a multiple of the batch size) trains on fewer images.
    """
    import hf_graft  # noqa: F401
    from hf_graft.config import GraftingConfig
    from hf_graft.trainer import GraftingTrainer
    from hf_graft.data import MemberOrderDataset, build_transform, resolve_student_data_config
    from hf_graft.population import PopulationSpec, StudentPopulation

    data_args, data = digits_small

    def build(*, callbacks=None, teachers=None, max_train_samples=None, **overrides):
        kwargs = dict(
            output_dir=str(tmp_path / "run"), num_train_epochs=2, per_device_train_batch_size=16,
            per_device_eval_batch_size=64, use_cpu=True, dataloader_num_workers=0, save_strategy="no",
            logging_steps=1, seed=0, report_to="none", disable_tqdm=True, student_model=TINY_STUDENT,
        )
        kwargs.update(overrides)
        config = GraftingConfig(**kwargs)
        spec = PopulationSpec(config.student_model, config.num_students, data.num_classes,
                              student_model_kwargs=config.student_model_kwargs, label_names=data.label_names)
        population = StudentPopulation.from_spec(spec, seed=config.seed, shared_init=config.shared_init)
        spec.data_config = resolve_student_data_config(population.members[0], data_args.input_size)
        train = data.train if max_train_samples is None else data.train.select(range(max_train_samples))
        order = config.data_order if config.num_students > 1 else "shared"
        train_dataset = MemberOrderDataset(
            train, build_transform(spec.data_config, data_args, is_training=True), data.image_column,
            data.label_column, num_members=config.num_students, order=order, seed=config.seed,
        )
        eval_dataset = MemberOrderDataset(
            data.eval, build_transform(spec.data_config, data_args, is_training=False), data.image_column,
            data.label_column,
        )
        return GraftingTrainer(model=population, args=config, train_dataset=train_dataset,
                               eval_dataset=eval_dataset, callbacks=callbacks, teachers=teachers)

    return build
