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
    """builtin:digits, 64 training and 64 held-out images (real data, loaded once per test run)."""
    from hf_graft.config import DataArguments
    from hf_graft.data.loading import load_image_data

    args = DataArguments(dataset_name="builtin:digits", max_train_samples=64, max_eval_samples=64, input_size=TINY_SIZE)
    return args, load_image_data(args, seed=0)


@pytest.fixture
def make_trainer(tmp_path, digits_small):
    """Build a GraftingTrainer on `digits_small` with a tiny student; keyword arguments go to GraftingConfig.

    Defaults: 2 epochs of 4 steps (batch 16), CPU, no workers, no checkpoints, a log entry every step.
    `max_train_samples` (a multiple of the batch size) trains on fewer images.
    """
    from _tiny_run import build_trainer

    def build(*, callbacks=None, teachers=None, max_train_samples=None, **overrides):
        kwargs = dict(num_train_epochs=2, learning_rate=0.1, lr_spread=["none"], filter_thresholds=[0.01, 0.1],
                      student_model=TINY_STUDENT)
        kwargs.update(overrides)
        output_dir = kwargs.pop("output_dir", tmp_path / "run")
        return build_trainer(digits_small, output_dir, callbacks=callbacks, teachers=teachers,
                             max_train_samples=max_train_samples, **kwargs)

    return build
