"""Faults and bad input as a new user meets them: each ends in one clear line or in correct behaviour,
with nothing lost (every file of an earlier run keeps its name, size and modification time) and
nothing reported wrongly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_graft.cli import export

from _cli_run import finished_quickstart_run, cli, copy_run, error_lines


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below `folder`: its size and modification time (ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch quickstart run: checkpoint-4, checkpoint-8, results and student/."""
    return finished_quickstart_run(tmp_path_factory.mktemp("finished") / "run")


# ----------------------------------------------------------------------------- deletes a user's data
def test_export_overwrite_never_removes_a_folder_holding_the_run(finished_run, tmp_path, capsys):
    parent = tmp_path / "parent"
    run = copy_run(finished_run, parent / "run")
    (parent / "notes.txt").write_text("mine")
    before = _files(parent)
    assert export.main([str(run / "checkpoint-8"), "--member", "0", "--out", str(parent), "--overwrite"]) == 2
    (line,) = error_lines(capsys, "hf-graft export")
    assert f"--out {parent}: contains the checkpoint being exported" in line
    # a folder holding another training run, or the user's own files: refused, --overwrite or not
    other = tmp_path / "other"
    copy_run(finished_run, other / "old_run")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    (mine / "config.json").write_text("{}")
    listings = {other: _files(other), mine: _files(mine)}
    for out, message in ((other, "contains (old_run) a training output"), (mine, "not empty and not an export of")):
        assert export.main([str(run / "checkpoint-8"), "--member", "0", "--out", str(out), "--overwrite"]) == 2
        (line,) = error_lines(capsys, "hf-graft export")
        assert message in line
    assert _files(parent) == before
    assert {folder: _files(folder) for folder in listings} == listings
    # what an earlier export wrote is replaced with --overwrite: another checkpoint's export, the run's student/
    for out in (tmp_path / "export_of_4", tmp_path / "student_copy"):
        if out.name == "student_copy":
            copy_run(finished_run / "student", out)
        else:
            assert export.main([str(run / "checkpoint-4"), "--member", "1", "--out", str(out)]) == 0
        assert export.main([str(run / "checkpoint-8"), "--member", "0", "--out", str(out)]) == 2
        assert export.main([str(run / "checkpoint-8"), "--member", "0", "--out", str(out), "--overwrite"]) == 0
        recorded = json.loads((out / "config.json").read_text())["hf_graft_export"]
        assert (recorded["checkpoint"], recorded["member"]) == ("checkpoint-8", 0)


def test_replace_output_dir_with_a_bad_batch_size_refuses_before_touching_the_run(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = _files(out)
    for field, value in (("per_device_train_batch_size", "0"), ("per_device_eval_batch_size", "0"),
                         ("gradient_accumulation_steps", "0"), ("max_steps", "0"), ("save_steps", "-1")):
        assert cli(out, f"--{field}", value) == 2  # the quickstart recipe sets replace_output_dir: true
        (line,) = error_lines(capsys)
        assert f"GraftingConfig.{field}: got {value}" in line
    assert _files(out) == before


def test_replace_output_dir_removes_the_previous_run_only_when_training_begins(finished_run, tmp_path, monkeypatch):
    """A failure while the Trainer builds its optimizer, scheduler or data loaders loses nothing."""
    from hf_graft.training.trainer import GraftingTrainer

    def broken(self, *args, **kwargs):
        raise ValueError("no optimizer today")

    out = copy_run(finished_run, tmp_path / "run")
    before = _files(out)
    monkeypatch.setattr(GraftingTrainer, "create_optimizer", broken)
    with pytest.raises(ValueError, match="no optimizer today"):
        cli(out)
    assert _files(out) == before


# ----------------------------------------------------------------------------- wrong results in silence: data
def _saved_dataset(folder: Path, splits: dict, label_feature=None, images=None) -> str:
    """A save_to_disk DatasetDict of 8x8 RGB images with the given labels per split; `label_feature` per split
    (a `datasets` feature, default: inferred), `images` a function of the row giving a PIL image."""
    import numpy as np
    from datasets import Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    rng = np.random.default_rng(0)
    make = images or (lambda i: Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)))
    parts = {}
    for split, labels in splits.items():
        features = None
        feature = (label_feature or {}).get(split)
        if feature is not None:
            features = Features({"image": ImageFeature(), "label": feature})
        parts[split] = Dataset.from_dict({"image": [make(i) for i in range(len(labels))], "label": labels},
                                         features=features)
        if features is None:
            parts[split] = parts[split].cast_column("image", ImageFeature())
    DatasetDict(parts).save_to_disk(str(folder))
    return str(folder)


def test_splits_that_disagree_on_the_labels_are_refused_naming_both(tmp_path):
    from datasets import ClassLabel

    from hf_graft.config import DataArguments
    from hf_graft.data.checks import LabelError
    from hf_graft.data.loading import load_image_data

    names = ClassLabel(names=["a", "b", "c"])
    outside = _saved_dataset(tmp_path / "outside", {"train": [0, 1, 2, 0], "test": [5, 5]}, {"train": names})
    with pytest.raises(LabelError, match=r"splits 'train' and 'test' disagree on the labels of column 'label' "
                                         r"\(integers outside the ClassLabel's range\): 'train' has a ClassLabel of 3 "
                                         r"names \{'a', 'b', 'c'\} \(0..2\), 'test' has integer labels \{5\}"):
        load_image_data(DataArguments(dataset_name=outside))
    # integers inside the names' range are those classes: never renumbered
    inside = load_image_data(DataArguments(dataset_name=_saved_dataset(
        tmp_path / "inside", {"train": [0, 1, 2, 0], "test": [1, 2, 2]}, {"train": names})))
    assert inside.label_names == ["a", "b", "c"] and inside.eval["label"] == [1, 2, 2]
    # an evaluation label the training split lacks: no class is made up for it
    strings = _saved_dataset(tmp_path / "strings", {"train": ["cat", "dog", "cat"], "test": ["dog", "zebra"]})
    with pytest.raises(LabelError, match=r"split 'test' has label\(s\) \{'zebra'\} that split 'train' lacks "
                                         r"\('train' has \{'cat', 'dog'\}\)"):
        load_image_data(DataArguments(dataset_name=strings))
    integers = _saved_dataset(tmp_path / "integers", {"train": [0, 1, 2, 0], "test": [1, 5]})
    with pytest.raises(LabelError, match=r"split 'test' has label\(s\) \{5\} that split 'train' lacks"):
        load_image_data(DataArguments(dataset_name=integers))
    mixed = _saved_dataset(tmp_path / "mixed", {"train": ["cat", "dog"], "test": [0, 1]})
    with pytest.raises(LabelError, match=r"\(different kinds of labels\): 'train' has string labels "
                                         r"\{'cat', 'dog'\}, 'test' has integer labels \{0, 1\}"):
        load_image_data(DataArguments(dataset_name=mixed))


def test_one_class_and_empty_splits_are_refused_in_one_line(tmp_path, capsys):
    from datasets import ClassLabel

    one = _saved_dataset(tmp_path / "one", {"train": ["cat"] * 8, "test": ["cat"] * 4})
    assert cli(tmp_path / "run_one", "--dataset_name", one) == 2
    (line,) = error_lines(capsys)
    assert "DataArguments.label_column: the data has a single class ({'cat'})" in line
    # several classes, but the training examples hold one of them
    names = {"train": ClassLabel(names=["a", "b"]), "test": ClassLabel(names=["a", "b"])}
    sorted_by_class = _saved_dataset(tmp_path / "sorted", {"train": [0] * 8 + [1] * 8, "test": [0, 1]}, names)
    from hf_graft.config import DataArguments, GraftingConfig
    from hf_graft.data.checks import LabelError
    from hf_graft.data.loading import load_image_data
    from hf_graft.training.builder import build_population_and_datasets

    data = load_image_data(DataArguments(dataset_name=sorted_by_class))
    data.train = data.train.select(range(8))  # the first 8 rows: class 'a' only
    config = GraftingConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none")
    with pytest.raises(LabelError, match=r"the training examples \(8\) hold a single class \{'a'\} of 2"):
        build_population_and_datasets(config, DataArguments(dataset_name=sorted_by_class), data=data)
    # a split saved with no examples
    empty = _saved_dataset(tmp_path / "empty", {"train": [0, 1, 0, 1], "test": []},
                           {"train": ClassLabel(names=["a", "b"]), "test": ClassLabel(names=["a", "b"])})
    assert cli(tmp_path / "run_empty", "--dataset_name", empty) == 2
    (line,) = error_lines(capsys)
    assert f"DataArguments.dataset_name: {empty}: split(s) 'test' were saved with no examples" in line
    assert not any((tmp_path / name).exists() for name in ("run_one", "run_empty"))


def test_16_bit_images_are_scaled_to_8_bits_not_clipped_white(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from hf_graft.config import DataArguments
    from hf_graft.data.loading import load_image_data
    from hf_graft.data.on_device import decode_split
    from hf_graft.data.populations import population_datasets

    rng = np.random.default_rng(3)
    deep = [rng.integers(0, 65536, (8, 8), dtype=np.uint16) for _ in range(4)]
    # the 8-bit image each one is: round(v * 255 / 65535)
    shallow = [np.round(d.astype(np.float64) * 255 / 65535).astype(np.uint8) for d in deep]
    folders = {bits: _saved_dataset(tmp_path / f"bits{bits}", {"train": [0, 1, 0, 1], "test": [0, 1]},
                                    images=lambda i, bits=bits: Image.fromarray(deep[i] if bits == 16 else shallow[i]))
               for bits in (16, 8)}
    pixels = {}
    for bits, folder in folders.items():
        args = DataArguments(dataset_name=folder, input_size=8, train_augmentation="none")
        data = load_image_data(args)
        assert data.train[0]["image"].mode == ("I;16" if bits == 16 else "L")
        config = {"input_size": [3, 8, 8], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
                  "crop_pct": 1.0, "crop_mode": "center"}
        train, _ = population_datasets(data, args, config, num_members=1, order="shared", seed=0)
        on_device, _ = decode_split(data.train, data.image_column, data.label_column, lambda image: image, 8, "cpu")
        pixels[bits] = (torch.stack([train[i]["pixel_values"] for i in range(4)]), on_device)
    for path in (0, 1):
        assert torch.equal(pixels[16][path], pixels[8][path])
    assert pixels[16][1].float().mean() < 200  # not the all-white 255 of a clipped conversion
    from hf_graft.data.checks import as_rgb

    with pytest.raises(ValueError, match=r"32-bit integer pixels \(PIL mode I\) in 0..70000, which have no known"):
        as_rgb(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))


def test_resume_names_another_dataset_or_augmentation_and_an_older_identity_still_resumes(tmp_path, capsys):
    import shutil

    from hf_graft.utils.files import RUN_IDENTITY_FILE

    def digits_like(folder, seed):
        import numpy as np
        from datasets import ClassLabel
        from PIL import Image

        rng = np.random.default_rng(seed)
        names = ClassLabel(names=[str(d) for d in range(10)])
        labels = [i % 10 for i in range(16)]
        return _saved_dataset(folder, {"train": labels, "test": labels[:8]}, {"train": names, "test": names},
                              images=lambda i: Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)))

    data = tmp_path / "a" / "data"
    digits_like(data, seed=0)
    out = tmp_path / "run"
    tiny = ["--dataset_name", str(data), "--max_train_samples", "16", "--num_train_epochs", "2",
            "--save_strategy", "epoch", "--replace_output_dir", "false"]
    assert cli(out, *tiny) == 0  # checkpoint-1 and checkpoint-2
    checkpoint = out / "checkpoint-1"
    shutil.rmtree(out / "checkpoint-2")
    capsys.readouterr()
    resume = [*tiny, "--resume_from_checkpoint", str(checkpoint)]
    before = _files(out)
    # the same folder name, other images: the digest differs
    moved = tmp_path / "b" / "data"
    digits_like(moved, seed=1)
    resume_moved = [*resume[:1], str(moved), *resume[2:]]
    assert cli(out, *resume_moved) == 2
    (line,) = error_lines(capsys)
    assert f"resume_from_checkpoint: {checkpoint} was trained with the data (a digest of both splits' sizes" in line
    # another augmentation
    assert cli(out, *resume, "--train_augmentation", "pad_crop") == 2
    (line,) = error_lines(capsys)
    assert ("was trained with the training augmentation (DataArguments.train_augmentation and its settings) = "
            '{"train_augmentation": "none"}, this run has {"crop_padding": 4, "hflip": 0.5, "train_augmentation": '
            '"pad_crop"}') in line
    assert _files(out) == before
    # the same data moved to another folder resumes; so does a checkpoint whose identity predates these keys
    shutil.copytree(data, tmp_path / "c" / "data")
    assert cli(out, *resume[:1], str(tmp_path / "c" / "data"), *resume[2:]) == 0
    shutil.rmtree(out / "checkpoint-2")
    identity = json.loads((checkpoint / RUN_IDENTITY_FILE).read_text())
    for key in ("dataset_name", "num_eval_examples", "data_digest", "train_augmentation"):
        del identity[key]
    (checkpoint / RUN_IDENTITY_FILE).write_text(json.dumps(identity))
    assert cli(out, *resume) == 0


# ----------------------------------------------------------------------------- a diverged member
def test_the_ensemble_leaves_out_diverged_members_and_says_so():
    import numpy as np

    from hf_graft.metrics import PopulationMetrics

    labels = np.arange(40) % 4
    healthy = np.eye(4, dtype=np.float32)[labels] * 5.0  # right on every example
    logits = np.stack([healthy, np.full_like(healthy, np.nan), np.roll(healthy, 1, axis=1)], axis=1)  # [N, 3, C]
    everyone = PopulationMetrics("best")(logits, labels)
    assert everyone["member0_top1"] == 100.0 and everyone["member2_top1"] == 0.0 and "ensemble_members" not in everyone
    kept = PopulationMetrics("best")(logits, labels, leave_out={1: 3})
    # the ensemble of members 0 and 2: the mean of their softmax, as population_accuracy computes it
    import torch
    from timm.utils import accuracy

    probs = torch.softmax(torch.from_numpy(logits[:, [0, 2]]), dim=-1).mean(dim=1)
    assert kept["ensemble_top1"] == float(accuracy(probs, torch.from_numpy(labels), topk=(1,))[0])
    assert kept["ensemble_members"] == [0, 2] and kept["selected_member"] == 0.0 and kept["top1"] == 100.0
    assert kept["member1_top1"] == everyone["member1_top1"]  # each member is still measured on its own
    # the card and the closing summary say which members the ensemble is
    from hf_graft.export.model_card import build_model_card
    from hf_graft.run.results import summary_lines

    results = {f"eval_{k}": v for k, v in kept.items()}
    card = str(build_model_card(architecture="cifar_resnet20", label_names=None, dataset_name=None,
                                member_metrics={k: {"top1": kept[f"member{k}_top1"]} for k in range(3)},
                                ensemble_metrics={"top1": kept["ensemble_top1"], "members": [0, 2]}, selected_member=0,
                                selection_reason=None, grafting_settings={}, kd_settings=None, repo_id=None))
    assert f"| ensemble of members 0, 2 (diverged members left out) | {kept['ensemble_top1']:g} |" in card
    assert f"ensemble {kept['ensemble_top1']:g} (members 0, 2, diverged left out)" in summary_lines(results, 3)[-1]


class _PoisonMember:
    """A TrainerCallback that fills one member's weights with nan after a step (a member diverging on its own)."""

    def __new__(cls, member: int, step: int):
        import torch
        from transformers import TrainerCallback

        class Poison(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step == step:
                    with torch.no_grad():
                        for p in getattr(model, "module", model).members[member].parameters():
                            p.fill_(float("nan"))

        return Poison()


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory):
    """A 2-epoch run (checkpoints at steps 4 and 8) whose member 1 diverges at step 2, with select_student 1:
    (output folder, exit status, the command's error lines)."""
    import contextlib
    import io

    import hf_graft.cli.train as train_cli

    build = train_cli.build_trainer
    out = tmp_path_factory.mktemp("diverged") / "run"
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        patch.setattr(train_cli, "build_trainer", lambda data_args, config, callbacks=None, **kwargs: build(
            data_args, config, callbacks=[_PoisonMember(member=1, step=2)], **kwargs))
        code = cli(out, "--num_train_epochs", "2", "--save_strategy", "epoch", "--select_student", "1")
    return out, code, [line for line in stderr.getvalue().splitlines() if line.startswith("hf-graft train:")]


def test_a_diverged_member_chosen_for_export_is_refused_and_the_results_are_written(diverged_run):
    out, code, lines = diverged_run
    assert code == 1 and len(lines) == 1
    assert ("no student written: select_student=1, but member 1 diverged at step 2 (non-finite weights or losses) "
            "and is not exported; the healthy members are 0") in lines[0]
    results = json.loads((out / "all_results.json").read_text())
    assert results["selected_member"] is None and results["diverged_members"] == {"1": 2}
    assert not (out / "student").exists()
    # the ensemble is member 0 alone, and says so
    assert results["eval_ensemble_members"] == [0]
    assert results["eval_ensemble_top1"] == results["eval_member0_top1"]


def test_export_of_a_member_with_nan_weights_names_the_tensors(diverged_run, tmp_path, capsys):
    out, _, _ = diverged_run
    assert export.main([str(out / "checkpoint-8"), "--member", "1", "--out", str(tmp_path / "student")]) == 2
    (line,) = error_lines(capsys, "hf-graft export")
    assert f"member 1 of {out / 'checkpoint-8'}: " in line and "tensors hold non-finite values (nan or inf): " in line
    assert "conv1.weight" in line and "it diverged and is not exported" in line
    assert not (tmp_path / "student").exists()
    assert export.main([str(out / "checkpoint-8"), "--member", "0", "--out", str(tmp_path / "student")]) == 0


# ----------------------------------------------------------------------------- tracebacks where one line is owed
def _interrupt_at(step: int, error: type[BaseException] = KeyboardInterrupt):
    """A TrainerCallback raising `error` at the end of optimizer step `step` (as Ctrl-C would, mid-run)."""
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise error()

    return Interrupt()


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    import errno

    import torch

    save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # the file system fills up while checkpoint-4 is written
        if "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    assert cli(out, "--save_strategy", "steps", "--save_steps", "2") == 1
    (line,) = error_lines(capsys)
    assert f"the disk is full: {out / 'checkpoint-4'} could not be written (" in line
    assert f"the previous checkpoint {out / 'checkpoint-2'} is intact" in line
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2"]  # nothing half-written left
    from hf_graft.run.output_dir import check_checkpoint_folder

    check_checkpoint_folder(out / "checkpoint-2")


def test_damaged_json_in_a_checkpoint_is_named_in_one_line(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = _files(out)
    for name in ("trainer_state.json", "graft_run.json", "graft_population.json"):
        file = out / "checkpoint-8" / name
        text = file.read_text()
        file.write_text(text[: len(text) // 2])  # truncated
        assert cli(out, "--resume_from_checkpoint", "true", "--replace_output_dir", "false") == 2
        (line,) = error_lines(capsys)
        assert f"resume_from_checkpoint: {file} cannot be read (" in line and "damaged (truncated?)" in line
        if name == "graft_population.json":
            assert export.main([str(out / "checkpoint-8"), "--member", "0", "--out", str(tmp_path / "x")]) == 2
            (line,) = error_lines(capsys, "hf-graft export")
            assert f"checkpoint: {file} cannot be read (" in line
            from hf_graft.population.students import PopulationSpec

            with pytest.raises(ValueError, match=f"{file}: cannot be read"):
                PopulationSpec.load(out / "checkpoint-8")
        file.write_text(text)
    assert {k: v[0] for k, v in _files(out).items()} == {k: v[0] for k, v in before.items()}


def test_ctrl_c_during_training_or_export_is_one_line_saying_what_was_kept(tmp_path, capsys, monkeypatch):
    import hf_graft.cli.train as train_cli
    import hf_graft.export.student_folder as student_folder

    build = train_cli.build_trainer
    monkeypatch.setattr(train_cli, "build_trainer", lambda data_args, config, callbacks=None, **kwargs: build(
        data_args, config, callbacks=[_interrupt_at(3)], **kwargs))
    out = tmp_path / "run"
    assert cli(out, "--save_strategy", "steps", "--save_steps", "2") == 130
    (line,) = error_lines(capsys)
    assert (f"hf-graft train: interrupted; the last complete checkpoint is {out / 'checkpoint-2'}: resume from it "
            "with the same command and --resume_from_checkpoint true --replace_output_dir false") in line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # the lock released
    from hf_graft.config import GraftingConfig

    empty = GraftingConfig(output_dir=str(tmp_path / "none"), use_cpu=True, report_to="none")
    assert train_cli._what_is_kept(empty).startswith(f"no checkpoint was written in {tmp_path / 'none'}, so there "
                                                     "is nothing to resume")
    monkeypatch.undo()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(student_folder, "_verify_folder", interrupted)
    target = tmp_path / "student"
    assert export.main([str(out / "checkpoint-2"), "--member", "0", "--out", str(target)]) == 130
    (line,) = error_lines(capsys, "hf-graft export")
    assert f"interrupted; --out {target} is as it was before (no partial export is left)" in line
    assert not target.exists()
    assert not any(p.name.startswith(".student") for p in tmp_path.iterdir())


def test_label_smoothing_smooths_every_members_cross_entropy(make_trainer):
    import torch
    import torch.nn.functional as F

    trainer = make_trainer(label_smoothing_factor=0.1, num_train_epochs=1)
    assert trainer.label_smoother is None and trainer.args.label_smoothing_factor == 0.1
    population = trainer.population.eval()
    assert population.label_smoothing == 0.1
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        expected = torch.stack([F.cross_entropy(m(x), y, label_smoothing=0.1) for m in population.members])
        plain = torch.stack([F.cross_entropy(m(x), y) for m in population.members])
        loop = population(pixel_values=x, labels=y)["member_ce"]
        population.set_execution(fused=True, model_name="cifar_resnet20")
        fused = population(pixel_values=x, labels=y)["member_ce"]
    torch.testing.assert_close(loop, expected, rtol=0, atol=0)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, plain)


# ----------------------------------------------------------------------------- messages that mislead
def test_resume_messages_say_what_is_true(finished_run, tmp_path, capsys):
    import shutil

    out = copy_run(finished_run, tmp_path / "run")
    for checkpoint in ("checkpoint-4", "checkpoint-8"):
        shutil.rmtree(out / checkpoint)  # results, but no checkpoint: a run that saved none
    before = _files(out)
    # with replace_output_dir (the quickstart's): a contradiction, said before anything is touched
    assert cli(out, "--resume_from_checkpoint", "true") == 2
    (line,) = error_lines(capsys)
    assert ("resume_from_checkpoint and replace_output_dir are both set, but a resume continues the run in "
            f"{out} and replace_output_dir deletes it") in line
    assert cli(out, "--resume_from_checkpoint", "true", "--replace_output_dir", "false") == 2
    (line,) = error_lines(capsys)
    assert (f"{out} holds another run's results (all_results.json, student, trainer_state.json) but no "
            "checkpoint-N") in line
    assert "resume_from_checkpoint: true)" not in line  # never the advice to pass what was passed
    assert cli(out, "--replace_output_dir", "false") == 2  # a fresh run: no advice to resume a run without checkpoints
    (line,) = error_lines(capsys)
    assert "resume it" not in line and "replace_output_dir: true" in line
    assert _files(out) == before


def test_an_unusable_hub_id_names_the_field_and_the_id(tmp_path, capsys):
    for field in ("student_model", "teacher_models"):
        assert cli(tmp_path / field, f"--{field}", "hf-hub:nobody/nothing") == 2
        (line,) = error_lines(capsys)
        assert (f"GraftingConfig.{field}: 'hf-hub:nobody/nothing': it is not in the local Hugging Face cache and "
                "HF_HUB_OFFLINE is set") in line


def test_a_stale_lock_of_a_live_unrelated_process_is_taken_over_and_said_so(tmp_path, caplog):
    import logging
    import socket

    from hf_graft.run.output_dir import LOCK_FILE, lock_output_dir

    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "started": 0}))
    with caplog.at_level(logging.INFO, logger="hf_graft.run.output_dir"):
        lock = lock_output_dir(tmp_path)
    lock.release()
    (message,) = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert "process 1 on" in message and "has ended" not in message
    assert "which no process holds any more (that process id now belongs to another process)" in message


def test_leftovers_of_interrupted_saves_are_removed_by_a_resume_and_by_replace(finished_run, tmp_path):
    import shutil

    from hf_graft.config import GraftingConfig
    from hf_graft.run.output_dir import OutputDirClaim

    def leave_leftovers(out):
        (out / "tmp-checkpoint-12").mkdir()  # a save killed before it wrote anything
        (out / ".student.tmp-k1ll3d").mkdir()  # an export killed while writing
        (out / ".student.tmp-k1ll3d" / "model.safetensors").write_bytes(b"partial")
        (out / ".student.old-k1ll3d").mkdir()  # student/ is back: the copy it replaced is garbage
        shutil.copytree(out / "checkpoint-8", out / "tmp-checkpoint-99" / "checkpoint-99",  # the only copy of 99
                        dirs_exist_ok=True)

    out = copy_run(finished_run, tmp_path / "run")
    leave_leftovers(out)
    assert cli(out, "--resume_from_checkpoint", str(out / "checkpoint-8"), "--replace_output_dir", "false",
               "--num_train_epochs", "3") == 0
    names = {p.name for p in out.iterdir()}
    assert not names & {"tmp-checkpoint-12", ".student.tmp-k1ll3d", ".student.old-k1ll3d"}
    assert {"checkpoint-8", "student", "tmp-checkpoint-99"} <= names
    # replace_output_dir removes them with the run it replaces
    leave_leftovers(out)
    config = GraftingConfig(output_dir=str(out), use_cpu=True, replace_output_dir=True, report_to="none")
    claim = OutputDirClaim(config, None)  # a claim changes nothing on disk until the run begins
    try:
        claim.clear_previous_run()
    finally:
        claim.release()
    assert sorted(p.name for p in out.iterdir()) == []


def test_evaluate_says_when_the_class_names_differ(finished_run, tmp_path, capsys):
    from datasets import ClassLabel

    from hf_graft.cli.evaluate import main as evaluate_main

    letters = ClassLabel(names=list("abcdefghij"))
    data = _saved_dataset(tmp_path / "letters", {"train": list(range(10)), "test": list(range(10))},
                          {"train": letters, "test": letters})
    report = tmp_path / "results.json"
    assert evaluate_main([str(finished_run / "student"), "--dataset_name", data, "--num_workers", "0",
                          "--no_progress", "--json", str(report)]) == 0
    (line,) = error_lines(capsys, "hf-graft evaluate")
    assert ("warning: the dataset's class names {'a', 'b', 'c', 'd', 'e', 'f', ... (10 in all)} are not the model's "
            "{'0', '1', '2', '3', '4', '5', ... (10 in all)} (10 of 10 are not among them): labels are compared by "
            "class index") in line
    assert json.loads(report.read_text())["warning"] in line
