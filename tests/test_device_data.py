"""Data on the training device (`DataArguments.data_on_device`), exercised with the device = CPU.

The augmentation of every example is a function of (seed, epoch, row, member) alone; its pixels are
a zero-padded crop and a mirror of the decoded image; each member reads every example once per
epoch, also across two simulated processes; a run stopped mid-epoch resumes bit-identically;
evaluation inputs equal the PIL path's; bad settings and a dataset too large fail at once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader

import hf_graft  # noqa: F401  (registers cifar_* in timm)
from hf_graft.data import on_device as device_data
from hf_graft.config import DataArguments
from hf_graft.data.sampling import EpochShuffleSampler, MemberOrderDataset
from hf_graft.data.loading import load_image_data
from hf_graft.data.populations import population_datasets
from hf_graft.data.on_device import DeviceImageDataset, collate_examples, decode_to_device

from _tiny_run import CountingTrainer, assert_bit_identical, build_trainer, population_state

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
if not CIFAR10.is_dir():
    CIFAR10 = Path("/work/shared/data/cifar10")
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
N = 40


def _one_line(err: pytest.ExceptionInfo, field: str) -> str:
    message = str(err.value)
    assert "\n" not in message and field in message, message
    return message


@pytest.fixture(scope="module")
def images():
    """N random 3x12x12 uint8 images; label = row index, so a batch says which rows it holds."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (N, 3, 12, 12), dtype=torch.uint8, generator=generator), torch.arange(N)


def _dataset(images, **kwargs) -> DeviceImageDataset:
    pixels, labels = images
    settings = dict(mean=MEAN, std=STD, augmentation="pad_crop", crop_padding=3, hflip=0.5, num_members=3,
                    order="independent", seed=7)
    settings.update(kwargs)
    return DeviceImageDataset(pixels, labels, **settings)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return TF.normalize(x.float().div(255), MEAN, STD)


# ----------------------------------------------------------------------------- augmentation
def test_augmentation_depends_only_on_seed_epoch_row_and_member(images):
    ds = _dataset(images)
    epoch = 2
    tagged = [epoch * N + i for i in range(N)]
    whole = ds.__getitems__(tagged)
    assert whole["pixel_values"].shape == (N, 3, 3, 12, 12) and whole["labels"].shape == (N, 3)
    # the same example gets the same pixels in any batch: alone, reversed, in another batch size
    for i in (0, 5, 17):
        alone = ds.__getitems__([epoch * N + i])
        assert torch.equal(alone["pixel_values"][0], whole["pixel_values"][i])
        assert torch.equal(ds[epoch * N + i]["pixel_values"], whole["pixel_values"][i])
    backwards = ds.__getitems__(tagged[::-1])
    assert torch.equal(backwards["pixel_values"].flip(0), whole["pixel_values"])
    # deterministic: another dataset with the same seed gives the same batch
    assert torch.equal(_dataset(images).__getitems__(tagged)["pixel_values"], whole["pixel_values"])

    def params(dataset, epochs, rows, members):
        dy, dx, flip = dataset.augmentation_params(torch.tensor(epochs), torch.tensor(rows), torch.tensor(members))
        return torch.stack([dy, dx, flip.long()], 1)

    rows = list(range(N))
    base = params(ds, [1] * N, rows, [0] * N)
    for other in (params(ds, [2] * N, rows, [0] * N), params(ds, [1] * N, rows, [1] * N),
                  params(_dataset(images, seed=8), [1] * N, rows, [0] * N)):
        changed = (other != base).any(1).float().mean()
        assert changed > 0.7, changed  # another epoch, member or seed draws anew (9 x 9 x 2 outcomes)
    # the batch's augmentation is what those parameters say: member k of item i reads row perm_k[i]
    rows_read = whole["labels"]
    assert torch.equal(rows_read[:, 0], torch.arange(N))  # member 0: the identity permutation
    for k in range(3):
        assert sorted(rows_read[:, k].tolist()) == rows
        p = params(ds, [epoch] * N, rows_read[:, k].tolist(), [k] * N)
        for i in range(0, N, 7):
            dy, dx, flip = p[i].tolist()
            reference = TF.crop(TF.pad(images[0][rows_read[i, k]], [3]), dy, dx, 12, 12)
            reference = TF.hflip(reference) if flip else reference
            assert torch.equal(whole["pixel_values"][i, k], _normalise(reference))


def test_offsets_and_flips_are_uniform(images):
    n = 20000
    rows, zeros = torch.arange(n), torch.zeros(n, dtype=torch.long)
    dy, dx, flip = _dataset(images).augmentation_params(zeros, rows, zeros)
    for offsets in (dy, dx):
        counts = torch.bincount(offsets, minlength=7)
        assert counts.numel() == 7  # offsets 0 .. 2 * crop_padding
        assert ((counts - n / 7).abs() < 0.1 * n / 7).all(), counts
    assert abs(flip.float().mean().item() - 0.5) < 0.02
    assert not (dy == dx).all()
    assert not _dataset(images, hflip=0.0).augmentation_params(zeros, rows, zeros)[2].any()
    assert _dataset(images, hflip=1.0).augmentation_params(zeros, rows, zeros)[2].all()
    plain = _dataset(images, augmentation="none", num_members=1, order="shared")
    batch = plain.__getitems__([N + 3, 4])  # no augmentation: the decoded image, normalised, any epoch
    assert batch["pixel_values"].shape == (2, 3, 12, 12) and batch["labels"].tolist() == [3, 4]
    assert torch.equal(batch["pixel_values"][0], _normalise(images[0][3]))


# ----------------------------------------------------------------------------- order and sharding
def test_each_member_sees_every_example_once_per_epoch(images, tmp_path, single_thread):
    from hf_graft.config import GraftingConfig
    from hf_graft.population.students import PopulationSpec, StudentPopulation
    from hf_graft.training.trainer import GraftingTrainer

    def trainer_for(order, workers=2):
        config = GraftingConfig(output_dir=str(tmp_path), num_students=3, per_device_train_batch_size=8, use_cpu=True,
                                dataloader_num_workers=workers, dataloader_pin_memory=True, seed=3, data_order=order,
                                eval_strategy="no", save_strategy="no")
        population = StudentPopulation.from_spec(PopulationSpec("cifar_resnet20", 3, num_classes=N), seed=3)
        ds = _dataset(images, num_members=3, order=order, seed=3)
        return GraftingTrainer(model=population, args=config, train_dataset=ds)

    trainer = trainer_for("independent")
    # batches are built in the main process, on the device: no workers, no pinning
    assert trainer.args.dataloader_num_workers == 0 and trainer.args.dataloader_pin_memory is False
    loader = trainer.get_train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs.append(torch.cat([b["labels"] for b in loader]))
    for seen in epochs:
        assert seen.shape == (N, 3)
        for k in range(3):
            assert sorted(seen[:, k].tolist()) == list(range(N))  # every example exactly once
        assert not torch.equal(seen[:, 0], seen[:, 1]) and not torch.equal(seen[:, 1], seen[:, 2])
    assert not torch.equal(epochs[0], epochs[1])  # a new order every epoch
    # the same orders as the PIL path's dataset (same sampler, same member permutations)
    pil = MemberOrderDataset(list(range(N)), None, "image", "label", num_members=3, order="independent", seed=3)
    assert torch.equal(pil.member_indices, trainer.train_dataset.member_indices)

    shared = trainer_for("shared")
    seen = torch.cat([b["labels"] for b in shared.get_train_dataloader()])
    assert seen.ndim == 1 and sorted(seen.tolist()) == list(range(N))


def test_sharding_across_two_processes_keeps_every_augmentation(images):
    """Accelerate's sharding of the sampler's batches (2 simulated processes): together the shards
    read every example once per member, each with the pixels a single process gives it."""
    from accelerate.data_loader import prepare_data_loader

    ds = _dataset(images, num_members=2)

    def pixels_by_member_row(loader):
        out = {}
        for batch in loader:
            for i, rows in enumerate(batch["labels"].tolist()):
                for k, row in enumerate(rows):
                    assert (k, row) not in out
                    out[(k, row)] = batch["pixel_values"][i, k]
        return out

    def loader():
        sampler = EpochShuffleSampler(N, seed=11)
        sampler.set_epoch(1)
        return DataLoader(ds, batch_size=6, sampler=sampler, collate_fn=collate_examples)

    single = pixels_by_member_row(loader())
    assert len(single) == 2 * N
    union = {}
    for rank in range(2):
        shard = prepare_data_loader(loader(), num_processes=2, process_index=rank, put_on_device=False,
                                    even_batches=False)
        shard.set_epoch(1)  # a prepared loader sets its sampler's epoch when it starts
        part = pixels_by_member_row(shard)
        assert 0 < len(part) < 2 * N
        assert not set(part) & set(union)
        union.update(part)
    assert set(union) == set(single)
    assert all(torch.equal(union[key], single[key]) for key in single)


# ----------------------------------------------------------------------------- training and resume
def _on_device(digits):
    data_args, data = digits
    return dataclasses.replace(data_args, data_on_device=True), data


COMMON = dict(num_train_epochs=3, save_strategy="steps", save_steps=2, save_total_limit=None,
              student_model_kwargs={"drop_rate": 0.2})


def test_mid_epoch_resume_is_bit_identical(tmp_path, digits_small, single_thread):
    """Pad-crop + flip on the device and dropout: a run resumed from checkpoint-6 (mid-epoch 1, before
    graft 1) ends with the uninterrupted run's weights, every parameter and buffer, bit for bit."""
    digits = _on_device(digits_small)
    reference = build_trainer(digits, tmp_path / "reference", trainer_cls=CountingTrainer, **COMMON)
    assert isinstance(reference.train_dataset, DeviceImageDataset) and reference.train_dataset.augments
    reference.train()
    assert reference.graft_log == [(0, 4), (1, 8)]

    resumed = build_trainer(digits, tmp_path / "resumed", trainer_cls=CountingTrainer, **COMMON)
    resumed.train(resume_from_checkpoint=str(tmp_path / "reference" / "checkpoint-6"))
    assert resumed.graft_log == [(1, 8)]
    assert_bit_identical(population_state(resumed), population_state(reference))
    evals = [e["eval_member0_top1"] for e in reference.state.log_history if "eval_member0_top1" in e]
    assert len(evals) == 3


def test_evaluation_equals_the_pil_path(tmp_path, digits_small, single_thread):
    """Resized digits (8 -> 16 px): the same eval inputs as the PIL transform and the same metrics; and a
    training split without augmentation ('none') is the PIL path's training input too."""
    device_run = build_trainer(_on_device(digits_small), tmp_path / "device", num_train_epochs=1)
    pil_run = build_trainer(digits_small, tmp_path / "pil", num_train_epochs=1)
    device_eval, pil_eval = device_run.eval_dataset, pil_run.eval_dataset
    assert isinstance(device_eval, DeviceImageDataset) and isinstance(pil_eval, MemberOrderDataset)
    batch = device_eval.__getitems__(range(len(device_eval)))
    reference = torch.stack([pil_eval[i]["pixel_values"] for i in range(len(pil_eval))])
    torch.testing.assert_close(batch["pixel_values"], reference, rtol=0, atol=1e-6)
    assert batch["labels"].tolist() == [int(pil_eval[i]["labels"]) for i in range(len(pil_eval))]
    device_metrics, pil_metrics = device_run.evaluate(), pil_run.evaluate()
    assert device_metrics["eval_loss"] == pytest.approx(pil_metrics["eval_loss"], rel=1e-5)
    for key in ("eval_member0_top1", "eval_member1_top1", "eval_ensemble_top1"):
        assert device_metrics[key] == pil_metrics[key]

    data_args, data = digits_small
    plain = dataclasses.replace(data_args, train_augmentation="none")
    config = device_run.population.spec.data_config
    pil_train, _ = population_datasets(data, plain, config, num_members=2, order="independent", seed=0)
    device_train, _ = population_datasets(data, dataclasses.replace(plain, data_on_device=True), config,
                                          num_members=2, order="independent", seed=0)
    items = device_train.__getitems__([len(device_train) + i for i in range(6)])
    expected = torch.stack([pil_train[len(pil_train) + i]["pixel_values"] for i in range(6)])
    torch.testing.assert_close(items["pixel_values"], expected, rtol=0, atol=1e-6)


@pytest.mark.skipif(not CIFAR10.is_dir(), reason="local CIFAR-10 copy (../shared/data/cifar10) not present")
def test_cifar10_eval_at_native_size_equals_the_pil_transform():
    import timm

    from hf_graft.data.transforms import build_transform, resolve_student_data_config

    args = DataArguments(dataset_name=str(CIFAR10), max_train_samples=64, max_eval_samples=64, data_on_device=True)
    data = load_image_data(args, seed=0)
    config = resolve_student_data_config(timm.create_model("cifar_resnet20"))
    splits = decode_to_device(data, args, config, "cpu")
    assert splits.train_images.shape == (64, 3, 32, 32) and splits.augmentation == "pad_crop"
    _, evaluation = splits.datasets(num_members=2, order="independent", seed=0)
    got = evaluation.__getitems__(range(64))
    transform = build_transform(config, args, is_training=False)
    reference = torch.stack([transform(row["img"].convert("RGB")) for row in data.eval])
    assert (got["pixel_values"] - reference).abs().max() <= 1 / 255
    assert got["labels"].tolist() == list(data.eval["label"])


# ----------------------------------------------------------------------------- errors
def test_augmentations_the_device_does_not_run_fail_in_one_line():
    for field, kwargs in [("train_augmentation", dict(train_augmentation="rrc")),
                          ("color_jitter", dict(color_jitter=0.4)),
                          ("auto_augment", dict(auto_augment="rand-m9-mstd0.5"))]:
        with pytest.raises(ValueError) as err:
            DataArguments(data_on_device=True, **kwargs)
        _one_line(err, f"DataArguments.{field}")
    DataArguments(train_augmentation="rrc", color_jitter=0.4)  # fine on the PIL path
    # 'auto' means random-resized-crop above 64 px: refused before anything is decoded
    args = DataArguments(data_on_device=True)
    config = {"input_size": [3, 96, 96], "mean": MEAN, "std": STD, "interpolation": "bilinear", "crop_pct": 1.0}
    with pytest.raises(ValueError) as err:
        decode_to_device(None, args, config, "cpu")
    assert "rrc" in _one_line(err, "DataArguments.train_augmentation")


def test_a_dataset_that_does_not_fit_fails_before_decoding(digits_small, monkeypatch):
    data_args, data = _on_device(digits_small)
    monkeypatch.setattr(device_data, "_free_memory", lambda device: 2**20)  # 1 MiB free

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the data does not fit")

    monkeypatch.setattr(device_data, "decode_split", no_decoding)
    config = {"input_size": [3, 64, 64], "mean": MEAN, "std": STD, "interpolation": "bilinear", "crop_pct": 1.0}
    with pytest.raises(ValueError) as err:
        population_datasets(data, data_args, config, num_members=2, order="independent", seed=0)
    message = _one_line(err, "DataArguments.data_on_device")
    needed = (len(data.train) + len(data.eval)) * (3 * 64 * 64 + 8) / 2**30
    assert f"needs {needed:.2f} GiB" in message and "has 0.00 GiB free" in message
    assert f"{len(data.train)} train + {len(data.eval)} eval images of 3x64x64" in message


def test_the_training_entry_point_puts_the_data_on_the_device(tmp_path, single_thread):
    from hf_graft.cli.train import build_trainer as build_from_arguments
    from hf_graft.cli.train import parse_recipe

    root = Path(__file__).resolve().parents[1]
    data_args, config = parse_recipe(root / "recipes" / "quickstart.yaml", [
        "--data_on_device", "true", "--train_augmentation", "pad_crop", "--max_train_samples", "64",
        "--max_eval_samples", "32", "--num_train_epochs", "2", "--output_dir", str(tmp_path / "run"),
        "--dataloader_num_workers", "2",
    ])
    trainer = build_from_arguments(data_args, config)
    assert isinstance(trainer.train_dataset, DeviceImageDataset) and isinstance(trainer.eval_dataset, DeviceImageDataset)
    assert trainer.train_dataset.images.device == trainer.args.device
    assert trainer.args.dataloader_num_workers == 0
    trainer.train()
    assert trainer.graft_callback.grafts_done == 1
    evals = [e for e in trainer.state.log_history if "eval_ensemble_top1" in e]
    assert len(evals) == 2 and all(0.0 <= e["eval_ensemble_top1"] <= 100.0 for e in evals)


# ----------------------------------------------------------------------------- on a GPU (skipped without one)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_batches_equal_cpu_batches(images):
    """The same (seed, epoch, row, member) gives the same crop and flip on the GPU as on the CPU
    (integer hash), and the same pixels up to float rounding (CUDA divides by a scalar through its
    reciprocal)."""
    pixels, labels = images
    cpu = _dataset(images)
    gpu = DeviceImageDataset(pixels.cuda(), labels.cuda(), mean=MEAN, std=STD, augmentation="pad_crop",
                             crop_padding=3, hflip=0.5, num_members=3, order="independent", seed=7)
    tagged = [2 * N + i for i in range(N)]
    a, b = cpu.__getitems__(tagged), gpu.__getitems__(tagged)
    assert b["pixel_values"].is_cuda and b["labels"].is_cuda
    assert torch.equal(a["labels"], b["labels"].cpu())
    torch.testing.assert_close(b["pixel_values"].cpu(), a["pixel_values"], rtol=1e-6, atol=1e-6)
    rows, epochs, members = torch.arange(N), torch.full((N,), 2), torch.ones(N, dtype=torch.long)
    for x, y in zip(cpu.augmentation_params(epochs, rows, members),
                    gpu.augmentation_params(epochs.cuda(), rows.cuda(), members.cuda())):
        assert torch.equal(x, y.cpu())


@needs_cuda
def test_cuda_training_entry_point_keeps_the_data_on_the_gpu(tmp_path):
    from hf_graft.cli.train import build_trainer as build_from_arguments
    from hf_graft.cli.train import parse_recipe

    root = Path(__file__).resolve().parents[1]
    data_args, config = parse_recipe(root / "recipes" / "quickstart.yaml", [
        "--data_on_device", "true", "--train_augmentation", "pad_crop", "--use_cpu", "false", "--bf16", "true",
        "--max_train_samples", "64", "--max_eval_samples", "32", "--num_train_epochs", "2",
        "--output_dir", str(tmp_path / "run"),
    ])
    trainer = build_from_arguments(data_args, config)
    assert trainer.train_dataset.images.is_cuda and trainer.eval_dataset.images.is_cuda
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["pixel_values"].is_cuda and batch["pixel_values"].shape[1] == 2
    trainer.train()
    assert trainer.graft_callback.grafts_done == 1
    evals = [e for e in trainer.state.log_history if "eval_ensemble_top1" in e]
    assert len(evals) == 2 and all(0.0 <= e["eval_ensemble_top1"] <= 100.0 for e in evals)


def test_normalize_on_device_changes_nothing_with_data_on_the_device(digits_small):
    """data_on_device normalises on the device anyway: with normalize_on_device as well, the decoded
    splits and the batches are the same."""
    from hf_graft.data.populations import population_datasets
    from hf_graft.data.transforms import resolve_student_data_config

    data_args, data = digits_small
    import timm

    config = resolve_student_data_config(timm.create_model("cifar_resnet20", num_classes=10), data_args.input_size)
    splits = {}
    for flag in (False, True):
        args = dataclasses.replace(data_args, data_on_device=True, normalize_on_device=flag)
        splits[flag] = population_datasets(data, args, config, num_members=2, order="independent", seed=0)
    for a, b in zip(splits[False], splits[True]):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        first_a, first_b = a.__getitems__([0, 1, 2]), b.__getitems__([0, 1, 2])
        assert first_a["pixel_values"].dtype == torch.float32
        assert torch.equal(first_a["pixel_values"], first_b["pixel_values"])
