"""hf_graft.data: datasets loading (builtin digits, local parquet CIFAR-10, imagefolder), timm transforms,
and the per-member example order."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage
from torch.utils.data import DataLoader, RandomSampler
from torchvision import transforms as T

import hf_graft  # noqa: F401  (registers cifar_* in timm)
from hf_graft.config import DataArguments
from hf_graft.data.sampling import MemberOrderDataset
from hf_graft.data.transforms import (
    build_transform, normalize_pixels, pixel_statistics, resolve_student_data_config,
)
from hf_graft.data.loading import load_builtin_digits, load_image_data

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
if not CIFAR10.is_dir():
    CIFAR10 = Path("/work/shared/data/cifar10")
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the paper's CIFAR statistics
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _digest(image: PILImage.Image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def _one_line(err: pytest.ExceptionInfo, field: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    assert field in message, message


# ----------------------------------------------------------------------------- builtin:digits
def test_shipped_digits_file_is_the_uci_test_set():
    """The file hf_graft ships (no scikit-learn needed): 1,797 8x8 images of counts 0..16, the known class sizes."""
    from hf_graft.data.loading import BUILTIN_DIGITS_FILE

    assert BUILTIN_DIGITS_FILE.stat().st_size < 100_000
    assert BUILTIN_DIGITS_FILE.with_suffix(".LICENSE").read_text().count("CC BY 4.0") == 1
    with np.load(BUILTIN_DIGITS_FILE) as digits:
        images, labels = digits["images"], digits["labels"]
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and 0 == images.min() < images.max() == 16
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_shipped_digits_equal_scikit_learns():
    datasets = pytest.importorskip("sklearn.datasets")  # a test extra; hf_graft itself does not need it

    from hf_graft.data.loading import BUILTIN_DIGITS_FILE

    reference = datasets.load_digits()
    with np.load(BUILTIN_DIGITS_FILE) as digits:
        assert np.array_equal(digits["images"], reference.images)  # counts 0..16, as floats there
        assert np.array_equal(digits["labels"], reference.target)


def test_builtin_digits_is_the_sklearn_set_with_a_fixed_split():
    load_digits = pytest.importorskip("sklearn.datasets").load_digits

    first, second = load_builtin_digits(), load_builtin_digits()
    assert isinstance(first, DatasetDict) and set(first) == {"train", "test"}
    assert len(first["train"]) + len(first["test"]) == 1797
    assert len(first["test"]) == 360  # ceil(0.2 * 1797)
    label = first["train"].features["label"]
    assert isinstance(label, ClassLabel) and label.names == [str(d) for d in range(10)]
    assert isinstance(first["train"].features["image"], Image)

    # the same images in the same split and order, twice
    for split in ("train", "test"):
        assert first[split]["label"] == second[split]["label"]
        assert [_digest(im) for im in first[split]["image"]] == [_digest(im) for im in second[split]["image"]]

    # every image is one of scikit-learn's digits (8x8, 0..16 scaled to 0..255) with its own label
    digits = load_digits()
    reference = {}
    for pixels, target in zip(digits.images, digits.target):
        img = PILImage.fromarray(np.clip(pixels * (255.0 / 16.0), 0, 255).round().astype("uint8"), mode="L")
        reference.setdefault(_digest(img), set()).add(int(target))
    seen = 0
    for split in ("train", "test"):
        for row in first[split]:
            assert row["image"].size == (8, 8) and row["image"].mode == "L"
            assert row["label"] in reference[_digest(row["image"])]
            seen += 1
    assert seen == 1797
    # stratified: every class holds about 20% of its images out
    test_counts = np.bincount(first["test"]["label"], minlength=10)
    all_counts = np.bincount(digits.target, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 1.5)


def test_load_image_data_on_digits_detects_columns_and_subsamples():
    args = DataArguments(dataset_name="builtin:digits", max_train_samples=100, max_eval_samples=40)
    data = load_image_data(args, seed=3)
    assert (data.image_column, data.label_column) == ("image", "label")
    assert data.label_names == [str(d) for d in range(10)] and data.num_classes == 10
    assert (len(data.train), len(data.eval)) == (100, 40)
    again = load_image_data(args, seed=3)
    assert data.train["label"] == again.train["label"]
    assert [_digest(im) for im in data.train["image"][:20]] == [_digest(im) for im in again.train["image"][:20]]
    other = load_image_data(args, seed=4)  # another seed draws another training subset ...
    assert [_digest(im) for im in other.train["image"]] != [_digest(im) for im in data.train["image"]]
    # ... but the held-out split stays the builtin one, whatever the seed
    assert [_digest(im) for im in other.eval["image"]] == [_digest(im) for im in data.eval["image"]]
    held_out = {_digest(im) for im in load_builtin_digits()["test"]["image"]}
    assert {_digest(im) for im in data.eval["image"]} <= held_out


# ----------------------------------------------------------------------------- local parquet CIFAR-10
@pytest.mark.skipif(not CIFAR10.is_dir(), reason="local CIFAR-10 copy (../shared/data/cifar10) not present")
def test_local_parquet_cifar10_with_hub_schema():
    args = DataArguments(dataset_name=str(CIFAR10), max_train_samples=120, max_eval_samples=50)
    data = load_image_data(args, seed=0)
    assert (data.image_column, data.label_column) == ("img", "label")
    assert data.label_names == CIFAR10_NAMES
    assert (len(data.train), len(data.eval)) == (120, 50)
    assert isinstance(data.train.features["label"], ClassLabel)
    row = data.train[0]
    assert row["img"].size == (32, 32) and 0 <= row["label"] < 10
    # eval comes from the 'test' split: no image is shared with the training subset
    assert not {_digest(im) for im in data.train["img"]} & {_digest(im) for im in data.eval["img"]}
    again = load_image_data(args, seed=0)
    assert data.train["label"] == again.train["label"]
    assert data.eval["label"] == again.eval["label"]


# ----------------------------------------------------------------------------- imagefolder, held-out split
def _write_imagefolder(root: Path, classes=("cat", "dog", "emu"), per_class=8) -> dict[str, str]:
    rng = np.random.RandomState(0)
    digests = {}
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = PILImage.fromarray(rng.randint(0, 256, (10, 12, 3), dtype=np.uint8))
            img.save(root / name / f"{i}.png")
            digests[_digest(img)] = name
    return digests


def test_imagefolder_with_validation_split_percentage(tmp_path):
    digests = _write_imagefolder(tmp_path / "images")
    args = DataArguments(dataset_name="imagefolder", data_dir=str(tmp_path / "images"), validation_split_percentage=25)
    data = load_image_data(args, seed=0)
    assert data.label_names == ["cat", "dog", "emu"]
    assert (len(data.train), len(data.eval)) == (18, 6)  # 25% of 24 held out
    train = [(_digest(r["image"]), r["label"]) for r in data.train]
    held = [(_digest(r["image"]), r["label"]) for r in data.eval]
    assert not {d for d, _ in train} & {d for d, _ in held}
    assert {d for d, _ in train} | {d for d, _ in held} == set(digests)
    for digest, label in train + held:  # labels follow the folder names
        assert data.label_names[label] == digests[digest]
    again = load_image_data(args, seed=0)
    assert [_digest(r["image"]) for r in again.eval] == [d for d, _ in held]


def test_parquet_folder_with_string_labels_and_no_eval_split(tmp_path):
    rng = np.random.RandomState(1)
    images = [PILImage.fromarray(rng.randint(0, 256, (6, 6, 3), dtype=np.uint8)) for _ in range(20)]
    names = ["zebra", "ant"] * 10
    Dataset.from_dict({"picture": images, "kind": names}, features=Features({"picture": Image(), "kind": Value("string")})
                      ).to_parquet(str(tmp_path / "train.parquet"))
    args = DataArguments(dataset_name=str(tmp_path), image_column="picture", label_column="kind",
                         validation_split_percentage=20)
    data = load_image_data(args, seed=0)
    assert data.label_names == ["ant", "zebra"]
    assert (len(data.train), len(data.eval)) == (16, 4)
    by_digest = {_digest(im): name for im, name in zip(images, names)}
    for split in (data.train, data.eval):
        assert isinstance(split.features["kind"], ClassLabel)
        for row in split:
            assert data.label_names[row["kind"]] == by_digest[_digest(row["picture"].convert("RGB"))]


# ----------------------------------------------------------------------------- errors
def test_one_line_errors_for_bad_data_arguments(tmp_path):
    for field, kwargs in [
        ("image_column", dict(dataset_name="builtin:digits", image_column="pixels")),
        ("label_column", dict(dataset_name="builtin:digits", label_column="target")),
        ("train_split", dict(dataset_name="builtin:digits", train_split="training")),
        ("eval_split", dict(dataset_name="builtin:digits", eval_split="dev")),
        ("dataset_name", dict(dataset_name="builtin:mnist")),
    ]:
        with pytest.raises(ValueError) as err:
            load_image_data(DataArguments(**kwargs))
        _one_line(err, f"DataArguments.{field}")
    with pytest.raises(FileNotFoundError) as err:
        load_image_data(DataArguments(dataset_name=str(tmp_path / "no_such_dataset")))
    _one_line(err, "DataArguments.dataset_name")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError) as err:
        load_image_data(DataArguments(dataset_name=str(tmp_path / "empty")))
    _one_line(err, "DataArguments.dataset_name")
    with pytest.raises(RuntimeError) as err:  # offline: an unknown Hub id fails fast, in one line
        load_image_data(DataArguments(dataset_name="nobody-here/no-such-dataset"))
    _one_line(err, "DataArguments.dataset_name")
    with pytest.raises(ValueError) as err:
        DataArguments(dataset_name="imagefolder")
    _one_line(err, "DataArguments.data_dir")
    # two image columns and no conventional name: ambiguous
    Dataset.from_dict(
        {"left": [PILImage.new("RGB", (4, 4))] * 4, "right": [PILImage.new("RGB", (4, 4))] * 4, "label": [0, 1, 0, 1]},
        features=Features({"left": Image(), "right": Image(), "label": ClassLabel(names=["a", "b"])}),
    ).to_parquet(str(tmp_path / "pairs.parquet"))
    with pytest.raises(ValueError) as err:
        load_image_data(DataArguments(dataset_name=str(tmp_path), data_dir=None))
    _one_line(err, "DataArguments.image_column")
    assert "left" in str(err.value) and "right" in str(err.value)


# ----------------------------------------------------------------------------- transforms
def test_transforms_follow_the_students_timm_data_config():
    digit = load_builtin_digits()["train"][0]["image"].convert("RGB")

    cifar = timm.create_model("cifar_resnet20", num_classes=10)
    config = resolve_student_data_config(cifar)
    assert config["input_size"] == [3, 32, 32]
    np.testing.assert_allclose(config["mean"], CIFAR_MEAN, atol=1e-4)
    np.testing.assert_allclose(config["std"], CIFAR_STD, atol=1e-4)
    assert build_transform(config, DataArguments(), is_training=False)(digit).shape == (3, 32, 32)

    native = timm.create_model("resnet10t", num_classes=10)
    default = resolve_student_data_config(native)
    assert default["input_size"][1] > 64  # an ImageNet-size default ...
    config = resolve_student_data_config(native, input_size=32)  # ... overridden for 32-px data
    assert config["input_size"] == [3, 32, 32]
    np.testing.assert_allclose(config["mean"], IMAGENET_MEAN, atol=1e-4)
    np.testing.assert_allclose(config["std"], IMAGENET_STD, atol=1e-4)

    # normalisation: a flat grey picture becomes (v/255 - mean)/std in every channel
    grey = PILImage.new("RGB", (20, 20), (200, 200, 200))
    for args in (DataArguments(), DataArguments(train_augmentation="none")):
        for training in (False, True):
            x = build_transform(config, args, is_training=training)(grey)
            assert x.shape == (3, 32, 32)
            expected = (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
            if training and args.train_augmentation != "none":  # pad_crop may show black padding
                padding = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
                is_pad = torch.isclose(x, padding.view(3, 1, 1), atol=1e-4)
                x = torch.where(is_pad, expected.view(3, 1, 1), x)
            torch.testing.assert_close(x, expected.view(3, 1, 1).expand(3, 32, 32), atol=2e-2, rtol=0)
    eval_tf = build_transform(config, DataArguments(), is_training=False)
    assert torch.equal(eval_tf(digit), eval_tf(digit))  # evaluation is deterministic


def test_pad_crop_and_random_resized_crop():
    config = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.0] * 3, "std": [1.0] * 3,
              "crop_pct": 1.0, "crop_mode": "center"}
    white = PILImage.new("RGB", (32, 32), (255, 255, 255))
    pad_crop = build_transform(config, DataArguments(train_augmentation="pad_crop", crop_padding=3), is_training=True)
    torch.manual_seed(0)
    widths = set()
    for _ in range(40):
        x = pad_crop(white)
        assert x.shape == (3, 32, 32)
        assert set(x.unique().tolist()) <= {0.0, 1.0}  # the image (1) or the zero padding, nothing between
        black_cols = int((x[0].amax(dim=0) == 0).sum())
        black_rows = int((x[0].amax(dim=1) == 0).sum())
        assert black_cols <= 3 and black_rows <= 3  # never more than crop_padding pixels of padding
        widths.add((black_rows, black_cols))
    assert len(widths) > 3  # the crop offset really is random

    # 'auto' is pad_crop for 32-px inputs, random-resized-crop for ImageNet-size ones
    auto_small = build_transform(config, DataArguments(), is_training=True)
    assert any(isinstance(t, T.RandomCrop) for t in auto_small.transforms)
    big = dict(config, input_size=[3, 96, 96])
    for args in (DataArguments(), DataArguments(train_augmentation="rrc")):
        rrc = build_transform(big, args, is_training=True)
        assert any(type(t).__name__ == "RandomResizedCropAndInterpolation" for t in rrc.transforms)
        torch.manual_seed(0)
        crops = [rrc(PILImage.fromarray(np.random.RandomState(0).randint(0, 256, (40, 50, 3), dtype=np.uint8)))
                 for _ in range(3)]
        assert all(c.shape == (3, 96, 96) for c in crops)
        assert not torch.equal(crops[0], crops[1])
    rrc_small = build_transform(config, DataArguments(train_augmentation="rrc"), is_training=True)
    assert not any(isinstance(t, T.RandomCrop) for t in rrc_small.transforms)


@pytest.mark.parametrize("mode,is_training,size", [("pad_crop", True, 32), ("rrc", True, 48), ("none", False, 40)])
def test_uint8_transforms_normalised_on_the_device_give_the_same_input_to_the_last_bit(mode, is_training, size):
    """`normalize_on_device`: the transforms stop at uint8 pixels (same crops, flips and resizing for
    the same seeds), and `normalize_pixels` gives exactly the float tensors the usual transforms give."""
    import random

    config = {"input_size": [3, size, size], "interpolation": "bicubic", "mean": list(CIFAR_MEAN),
              "std": list(CIFAR_STD), "crop_pct": 0.875, "crop_mode": "center"}
    float_tf = build_transform(config, DataArguments(train_augmentation=mode), is_training=is_training)
    uint8_tf = build_transform(config, DataArguments(train_augmentation=mode, normalize_on_device=True),
                               is_training=is_training)
    mean, std = pixel_statistics(config, "cpu")
    rng = np.random.RandomState(0)
    for i in range(6):
        image = PILImage.fromarray(rng.randint(0, 256, (37 + i, 45, 3), dtype=np.uint8))
        outputs = []
        for tf in (float_tf, uint8_tf):
            random.seed(i)
            torch.manual_seed(i)
            outputs.append(tf(image))
        expected, raw = outputs
        assert raw.dtype == torch.uint8 and raw.shape == expected.shape == (3, size, size)
        assert torch.equal(normalize_pixels(raw, mean, std), expected)
        batch = torch.stack([raw, raw]).unsqueeze(0)  # [B, K, C, H, W]: the statistics broadcast per channel
        assert torch.equal(normalize_pixels(batch, mean, std)[0, 1], expected)
    assert normalize_pixels(expected, mean, std) is expected  # float pixels are already normalised
    with pytest.raises(ValueError, match="^pixel_values: uint8 batches are normalised") as err:
        pixel_statistics({"input_size": [3, 32, 32]}, "cpu")
    _one_line(err, "data_config")


# ----------------------------------------------------------------------------- per-member order
N = 48


@pytest.fixture(scope="module")
def indexed():
    """A real datasets.Dataset whose label is the row index, so a batch says which rows it holds."""
    features = Features({"image": Image(), "label": Value("int64")})
    return Dataset.from_dict({"image": [PILImage.new("L", (2, 2), i) for i in range(N)], "label": list(range(N))},
                             features=features)


def _orders(dataset, seed, epochs=1, batch_size=8):
    """[epochs, N, K] row indices seen by each member, with a seeded shuffling sampler."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=generator))
    out = []
    for _ in range(epochs):
        labels = torch.cat([batch["labels"] for batch in loader])
        out.append(labels.view(len(dataset), -1))
    return torch.stack(out)


def test_independent_orders_cover_every_example_once_per_epoch(indexed):
    ds = MemberOrderDataset(indexed, T.PILToTensor(), "image", "label", num_members=3, order="independent", seed=5)
    item = ds[0]
    assert item["pixel_values"].shape == (3, 3, 2, 2) and item["labels"].shape == (3,)
    # the pixels are the row's own (labels and images come from the same row)
    assert torch.equal(item["pixel_values"][:, 0, 0, 0].long(), item["labels"])

    orders = _orders(ds, seed=0, epochs=2)  # [2, N, 3]
    for epoch in range(2):
        for k in range(3):
            assert sorted(orders[epoch, :, k].tolist()) == list(range(N))  # every example exactly once
        for a in range(3):
            for b in range(a + 1, 3):
                assert not torch.equal(orders[epoch, :, a], orders[epoch, :, b])  # members differ
    for k in range(3):
        assert not torch.equal(orders[0, :, k], orders[1, :, k])  # a new order every epoch

    # member 0 reads the sampler's order itself
    sampler_order = list(RandomSampler(indexed, generator=torch.Generator().manual_seed(0)))
    assert orders[0, :, 0].tolist() == sampler_order
    # reproducible with the same seed, different with another
    same = MemberOrderDataset(indexed, T.PILToTensor(), "image", "label", num_members=3, order="independent", seed=5)
    assert torch.equal(_orders(same, seed=0, epochs=2), orders)
    other = MemberOrderDataset(indexed, T.PILToTensor(), "image", "label", num_members=3, order="independent", seed=6)
    other_orders = _orders(other, seed=0)[0]
    assert torch.equal(other_orders[:, 0], orders[0, :, 0])
    assert not torch.equal(other_orders[:, 1:], orders[0, :, 1:])


def test_shared_order_feeds_every_member_the_same_batch(indexed):
    ds = MemberOrderDataset(indexed, T.PILToTensor(), "image", "label", num_members=3, order="shared", seed=5)
    item = ds[7]
    assert item["pixel_values"].shape == (3, 2, 2) and item["labels"].ndim == 0 and int(item["labels"]) == 7
    order = _orders(ds, seed=0)[0]
    assert order.shape == (N, 1)
    assert order[:, 0].tolist() == list(RandomSampler(indexed, generator=torch.Generator().manual_seed(0)))


def test_independent_orders_survive_sharding_across_two_processes(indexed):
    """Accelerate's sharding of the sampler's indices (2 simulated processes): for every member the
    shards are disjoint and together hold every example exactly once."""
    from accelerate.data_loader import prepare_data_loader

    ds = MemberOrderDataset(indexed, T.PILToTensor(), "image", "label", num_members=2, order="independent", seed=1)
    per_rank = []
    for rank in range(2):
        loader = DataLoader(ds, batch_size=6, shuffle=True)
        shard = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False,
                                    use_seedable_sampler=True, data_seed=11)
        shard.set_epoch(0)
        per_rank.append(torch.cat([b["labels"] for b in shard]))  # [N/2, K]
    assert per_rank[0].shape == (N // 2, 2)
    for k in range(2):
        seen = torch.cat([per_rank[0][:, k], per_rank[1][:, k]]).tolist()
        assert sorted(seen) == list(range(N))
    assert not torch.equal(per_rank[0][:, 0], per_rank[0][:, 1])


def test_grafting_trainer_dataloader_gives_each_member_its_own_full_epoch(indexed, tmp_path, single_thread):
    from hf_graft.config import GraftingConfig
    from hf_graft.population.students import PopulationSpec, StudentPopulation
    from hf_graft.training.trainer import GraftingTrainer

    def epoch_orders(seed, order="independent"):
        config = GraftingConfig(output_dir=str(tmp_path), num_students=2, per_device_train_batch_size=8,
                                use_cpu=True, dataloader_num_workers=0, seed=seed, data_order=order,
                                eval_strategy="no", save_strategy="no")
        population = StudentPopulation.from_spec(PopulationSpec("cifar_resnet20", 2, num_classes=N), seed=seed)
        ds = MemberOrderDataset(indexed, T.PILToTensor(), "image", "label", num_members=2, order=order, seed=seed)
        trainer = GraftingTrainer(model=population, args=config, train_dataset=ds)
        return torch.cat([b["labels"] for b in trainer.get_train_dataloader()])

    first = epoch_orders(seed=3)
    assert first.shape == (N, 2)
    for k in range(2):
        assert sorted(first[:, k].tolist()) == list(range(N))
    assert not torch.equal(first[:, 0], first[:, 1])
    assert torch.equal(epoch_orders(seed=3), first)  # reproducible from the seed
    assert not torch.equal(epoch_orders(seed=4), first)
    shared = epoch_orders(seed=3, order="shared")
    assert shared.ndim == 1 and sorted(shared.tolist()) == list(range(N))
