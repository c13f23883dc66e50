"""Checks before training (labels, precision, offline Hub), corrupt images, divergence, analyze on
non-finite weights, and secrets kept out of every file a run writes."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from hf_graft.cli.analyze import main as analyze_main
from hf_graft.config import DataArguments
from hf_graft.data.loading import load_image_data
from hf_graft.data.checks import CorruptImageError, LabelError

from hf_graft.graft.filters import filter_report

from _cli_run import cli, error_lines


def _image_dataset(folder, splits: dict[str, list[int]], names: list[str] | None = None):
    """A save_to_disk DatasetDict of 8x8 images with the given labels (ClassLabel with `names`, else int64)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)
    parts = {}
    for split, labels in splits.items():
        images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in labels]
        ds = Dataset.from_dict({"image": images, "label": labels},
                               features=Features({"image": ImageFeature(), "label": Value("int64")}))
        if names is not None:  # cast, as a parquet file with this metadata would load: values are not checked
            ds = ds.cast_column("label", ClassLabel(names=names))
        parts[split] = ds
    DatasetDict(parts).save_to_disk(str(folder))
    return str(folder)


# ----------------------------------------------------------------------------- labels
def test_a_label_outside_the_classes_fails_before_training_naming_split_column_value_and_row(tmp_path, capsys):
    folder = _image_dataset(tmp_path / "data", {"train": [0, 1, 2, 0, 1, 7, 2, 7], "test": [0, 1, 2, 0]},
                            names=["a", "b", "c"])
    out = tmp_path / "run"
    assert cli(out, "--dataset_name", folder, "--max_train_samples", "8", "--max_eval_samples", "4") == 2
    (line,) = error_lines(capsys)
    assert "split 'train', column 'label': label 7 at row 5 is not one of the classes (0..2, 3 names)" in line
    assert "2 row(s) in all" in line
    assert not out.exists()


def test_a_missing_label_in_the_eval_split_is_found_before_training(tmp_path):
    folder = _image_dataset(tmp_path / "data", {"train": [0, 1, 2, 3], "test": [0, 1, -1, 3]})
    with pytest.raises(LabelError, match=r"split 'test', column 'label': label -1 \(datasets' mark for a missing "
                                         r"label\) at row 2"):
        load_image_data(DataArguments(dataset_name=folder))


def test_sparse_integer_labels_are_renumbered_and_named_by_their_values(tmp_path):
    folder = _image_dataset(tmp_path / "data", {"train": [0, 1, 2, 7, 7, 2], "test": [7, 0, 1, 2]})
    data = load_image_data(DataArguments(dataset_name=folder))
    assert data.label_names == ["0", "1", "2", "7"] and data.num_classes == 4
    assert data.train["label"] == [0, 1, 2, 3, 3, 2] and data.eval["label"] == [3, 0, 1, 2]
    # dense labels stay as they are
    dense = load_image_data(DataArguments(dataset_name=_image_dataset(tmp_path / "dense", {"train": [0, 2, 1, 2],
                                                                                            "test": [1, 0]})))
    assert dense.label_names == ["0", "1", "2"] and dense.train["label"] == [0, 2, 1, 2]


# ----------------------------------------------------------------------------- corrupt images
@pytest.mark.parametrize("on_device", [False, True], ids=["dataloader", "data_on_device"])
def test_a_corrupt_image_stops_the_run_with_one_line_naming_the_file(tmp_path, capsys, on_device):
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for name in ("cat", "dog"):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / "images" / split / name / f"{i}.png")
    broken = tmp_path / "images" / "train" / "dog" / "3.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not an image")
    out = tmp_path / "run"
    code = cli(out, "--dataset_name", "imagefolder", "--data_dir", str(tmp_path / "images"),
               "--max_train_samples", "16", "--per_device_train_batch_size", "8", "--dataloader_num_workers", "1",
               "--data_on_device", str(on_device).lower())
    assert code == (2 if on_device else 1)  # on the device, images are decoded before training starts
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hf-graft train:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"file {broken}" in lines[0] and "of split 'train'" in lines[0] and "UnidentifiedImageError" in lines[0]


def test_corrupt_image_error_from_a_worker_is_reduced_to_its_line():
    from hf_graft.data.checks import undecodable_image

    class Rows(list):
        split = "train"

    error = undecodable_image(Rows([1, 2]), 1, "image", OSError("image file is truncated"))
    assert error.one_line() == str(error) and "row 1 of split 'train'" in str(error)
    # how torch re-raises an exception of a DataLoader worker: its traceback becomes the message
    wrapped = CorruptImageError(f"Caught CorruptImageError in DataLoader worker process 0.\nOriginal Traceback "
                                f"(most recent call last):\n  File \"x\", line 1\nhf_graft.data.checks.CorruptImageError: "
                                f"{error}\n")
    assert wrapped.one_line() == str(error)


# ----------------------------------------------------------------------------- settings
def test_fp16_on_the_cpu_is_refused_before_anything_is_loaded(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(out, "--fp16", "true") == 2
    (line,) = error_lines(capsys)
    assert line.startswith("hf-graft train: GraftingConfig.fp16: true, but this run is on the CPU")
    assert not out.exists()


def test_push_to_hub_in_offline_mode_is_refused_before_training(tmp_path, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    out = tmp_path / "run"
    assert cli(out, "--push_to_hub", "true", "--hub_model_id", "someone/grafted") == 2
    (line,) = error_lines(capsys)
    assert "GraftingConfig.push_to_hub: true, but HF_HUB_OFFLINE is set" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- secrets
def test_no_file_of_a_run_holds_the_hub_token(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from hf_graft.training import student as trainer  # where GraftingTrainer.push_to_hub uploads

    secret = "hf_PlantedSecretTokenForTheTest0123456789"
    pushed = {}

    def fake_push(folder, repo_id, *, token=None, private=None, **kwargs):
        pushed.update(folder=folder, repo_id=repo_id, token=token)
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(trainer, "push_student", fake_push)
    out = tmp_path / "run"
    assert cli(out, "--save_strategy", "epoch", "--push_to_hub", "true", "--hub_model_id", "someone/grafted",
               "--hub_token", secret, "--report_to", "tensorboard") == 0
    assert pushed["token"] == secret  # the push itself still has it
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files) and any(p.parent.name == "student" for p in files)
    assert any("events.out.tfevents" in p.name for p in files)
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    args = torch.load(out / "checkpoint-4" / "training_args.bin", weights_only=False)
    assert args.hub_token == "<HUB_TOKEN>" and args.hub_model_id == "someone/grafted"


# ----------------------------------------------------------------------------- divergence
def test_every_member_diverging_stops_the_run_with_one_line_and_keeps_the_measurements(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(out, "--learning_rate", "3e6", "--num_train_epochs", "3") == 1
    (line,) = error_lines(capsys)
    results = json.loads((out / "all_results.json").read_text())
    step = results["diverged_at_step"]
    assert f"training diverged: every member has non-finite values at step {step}: member 0 (" in line
    assert "member 1 (" in line and step <= 4  # stopped within the first epoch of 4 steps, not after 3 epochs
    assert set(results["diverged_members"]) == {"0", "1"} and results["global_step"] == step
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    last = [entry for entry in history if "loss" in entry][-1]
    assert results["loss"] == last["loss"] or math.isnan(results["loss"]) and math.isnan(last["loss"])
    for entry in history:
        if "loss" in entry and not all(math.isfinite(entry[f"member{k}_ce"]) for k in (0, 1)):
            assert not math.isfinite(entry["loss"]), entry
    assert not (out / "student").exists()


class _PoisonMember(TrainerCallback):
    """Fills one member's weights with NaN after a given step (a member that diverged on its own)."""

    def __init__(self, member: int, step: int):
        self.member, self.step, self.trainer = member, step, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                for p in self.trainer.population.members[self.member].parameters():
                    p.fill_(float("nan"))


def test_one_diverged_member_is_reported_and_the_others_train_on(make_trainer, tmp_path, capsys):
    poison = _PoisonMember(member=1, step=2)
    # the Trainer's own NaN filter on: the logged loss must still not be a finite stand-in
    trainer = make_trainer(num_train_epochs=2, save_strategy="epoch", callbacks=[poison], logging_nan_inf_filter=True)
    poison.trainer = trainer
    trainer.train()
    assert trainer.diverged_members == {1: 2}
    member0 = trainer.population.members[0]
    assert all(torch.isfinite(p).all() for p in member0.parameters())
    (report,) = trainer.graft_reports
    assert report.skipped == [0]  # member 0 never took the diverged member 1 as its scion
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [math.isfinite(e["loss"]) for e in logs] == [True, True] + [False] * (len(logs) - 2)

    # analyze says so, in total and per layer
    assert analyze_main([str(tmp_path / "run" / "checkpoint-8"), "--thresholds", "0.1"]) == 0
    text = capsys.readouterr().out
    total = sum(p.numel() for p in member0.state_dict().values() if p.is_floating_point())
    row = next(line for line in text.splitlines() if line.startswith("non-finite weights"))
    assert row.split()[2:] == ["0", "/", str(total), str(total), "/", str(total)]  # BatchNorm statistics too
    assert f"WARNING {tmp_path / 'run' / 'checkpoint-8'}#member1: {total} of {total} weights are not finite" in text
    assert "conv1.weight" in text and "#member0:" not in text


def test_filter_report_counts_non_finite_weights_per_layer():
    import timm

    import hf_graft  # noqa: F401

    model = timm.create_model("cifar_resnet20", num_classes=10)
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, :2] = float("nan")
        model.fc.bias[3] = float("inf")
    report = filter_report(model, thresholds=[0.1])
    assert report.nonfinite == {"conv1.weight": 2, "fc.bias": 1} and report.total_nonfinite == 3
    assert report.num_weights == sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    assert [layer.nonfinite for layer in report.layers if layer.name == "conv1.weight"] == [2]
    assert report.to_dict("m")["nonfinite_weights"] == 3


# ----------------------------------------------------------------------------- on a GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_fp16_one_diverged_member_does_not_freeze_the_others(make_trainer):
    """fp16 loss scaling skips every optimizer step whose gradients hold inf/nan: the diverged member's
    gradients are dropped, so the healthy member keeps being updated."""
    poison = _PoisonMember(member=1, step=2)
    seen = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                seen["after_step_3"] = [p.detach().clone() for p in trainer.population.members[0].parameters()]

    trainer = make_trainer(use_cpu=False, fp16=True, num_train_epochs=2, callbacks=[poison, Snapshot()])
    poison.trainer = trainer
    trainer.train()
    assert trainer.diverged_members == {1: 2}
    final = [p.detach() for p in trainer.population.members[0].parameters()]
    assert all(torch.isfinite(p).all() for p in final)
    assert any(not torch.equal(a, b) for a, b in zip(seen["after_step_3"], final))  # steps 4..8 were taken


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", [{}, {"bf16": True}, {"fp16": True}])
def test_on_cuda_the_checks_add_no_host_sync_to_a_training_step(make_trainer, precision):
    """torch's sync debug mode reports every host synchronisation; none of those in the steady-state
    steps (no logging, evaluation or checkpoint) comes from hf_graft's code."""
    import warnings

    marks = []

    class Mark(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks.append(len(caught))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(use_cpu=False, num_train_epochs=1, logging_steps=1000, eval_strategy="no",
                               callbacks=[Mark()], **precision)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught[marks[1]:marks[3]] if "synchroniz" in str(w.message)]  # steps 2 and 3 of 4
    sources = sorted({f"{os.path.relpath(w.filename)}:{w.lineno}" for w in syncs})
    print(f"{precision or 'fp32'}: {len(syncs) / 2:g} host syncs per step, from {sources}")
    ours = [s for s in sources if "hf_graft" in s]
    assert not ours, ours
