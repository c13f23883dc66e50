"""The student's model card as the Hub reads it (license, base model, datasets, eval results), the same card
from training and from `hf-graft export`, and pushes that honour the branch, `blocking` and their options."""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path

import pytest
import timm
import torch

import hf_graft  # noqa: F401  (registers cifar_* architectures)
from hf_graft.config import ConfigError, GraftingConfig
from hf_graft.export.hub import PushOptionError, PushToHubError, push_student
from hf_graft.export.model_card import base_model_id
from hf_graft.export.writer import write_student
from hf_graft.population.students import PopulationSpec
from hf_graft.run.records import RunRecords, RunRecordsError, read_run_records
from hf_graft.utils.files import EXPORT_FILES, RUN_IDENTITY_FILE, TRAINER_STATE_FILE

DATA_CONFIG = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3,
               "crop_pct": 1.0, "crop_mode": "center"}
TINY_ARCH = "test_resnet"  # timm's own tiny network; its pretrained tag lives at timm/test_resnet.r160_in1k


def _card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def _section(text: str, start: str, end: str) -> str:
    assert start in text and end in text, (start, end)
    return text.split(start, 1)[1].split(end, 1)[0]


def _assert_no_install_command(folder: Path) -> None:
    for name in ("README.md", "config.json"):
        assert "pip install hf_graft" not in (folder / name).read_text(), name


# ----------------------------------------------------------------------------- a tiny run: training and export
@pytest.fixture
def tiny_run(make_trainer, tmp_path):
    """Two epochs of two steps, a checkpoint each epoch, the student written with a license."""
    out = tmp_path / "run"
    trainer = make_trainer(num_students=2, num_train_epochs=2, max_train_samples=32, output_dir=str(out),
                           save_strategy="epoch", export_student=True, license="apache-2.0")
    trainer.train()
    return trainer, out


def test_training_and_export_cards_carry_the_same_run(tiny_run, tmp_path, capsys):
    from hf_graft.cli import export

    trainer, out = tiny_run
    results, student = trainer.results, out / "student"
    card = _card(student)
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "timm" and card.data.pipeline_tag == "image-classification"
    assert card.data.metrics == ["accuracy"]
    assert card.data.datasets is None  # builtin:digits is not a Hub dataset
    assert card.data.base_model is None  # the members started from random weights
    top1, top5 = card.data.eval_results
    assert (top1.metric_type, top1.metric_name, top1.metric_value) == ("accuracy", "top-1 accuracy (%)",
                                                                      results["eval_top1"])
    assert top5.metric_name == "top-5 accuracy (%)" and top5.metric_value == results["eval_top5"]
    assert top1.task_type == "image-classification" and top1.dataset_type == "builtin:digits"
    assert top1.dataset_split == "test"

    # one row per evaluation the Trainer logged, with its numbers
    evaluations = [e for e in trainer.state.log_history if "eval_member0_top1" in e]
    assert len(evaluations) == 2
    table = _section(card.text, "### Every evaluation during training", "## Selected member")
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    selected = results["selected_member"]
    header = next(line for line in table.splitlines() if line.startswith("| epoch"))
    assert f"member {selected} (exported)" in header and "ensemble" in header
    for row, entry in zip(rows, evaluations, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[1]) == entry["step"]
        assert [float(c) for c in cells[2:]] == pytest.approx(
            [entry["eval_member0_top1"], entry["eval_member1_top1"], entry["eval_ensemble_top1"]], abs=5e-5)

    # the hyperparameters, the grafting settings and the versions of the libraries
    hyper = _section(card.text, "### Training hyperparameters", "### Filter grafting")
    for line in ("- learning_rate: 0.1", "- train_batch_size: 16", "- total_train_batch_size: 16", "- num_epochs: 2",
                 "- seed: 0", "- optimizer: sgd (momentum=0.9)", "- num_students: 2"):
        assert line in hyper.splitlines(), line
    assert "| graft_A | 0.4 |" in card.text and "| lr_multipliers | [1.0, 1.0] |" in card.text
    for library in ("hf_graft", "PyTorch", "timm", "Transformers", "Accelerate", "Datasets"):
        assert f"- {library} " in card.text, library
    _assert_no_install_command(student)

    # hf-graft export of the last checkpoint, member `selected`: the same card, as far as the checkpoint records it
    checkpoint = out / f"checkpoint-{trainer.state.global_step}"
    exported = tmp_path / "exported"
    assert export.main([str(checkpoint), "--member", str(selected), "--out", str(exported),
                        "--license", "apache-2.0"]) == 0, capsys.readouterr().err
    again = _card(exported)
    assert again.data.eval_results == card.data.eval_results
    assert (again.data.license, again.data.datasets, again.data.base_model) == ("apache-2.0", None, None)
    for start, end in (("## Evaluation results", "## Selected member"), ("## Training procedure", "## How to use")):
        assert _section(again.text, start, end) == _section(card.text, start, end), start
    _assert_no_install_command(exported)


# ----------------------------------------------------------------------------- the writer, without a run
def _spec(dataset: str | None = "uoft-cs/cifar10", eval_split: str | None = "test") -> PopulationSpec:
    return PopulationSpec(student_model=TINY_ARCH, num_students=2, num_classes=3, label_names=["a", "b", "c"],
                          data_config=DATA_CONFIG, dataset_name=dataset, eval_split=eval_split)


@pytest.mark.parametrize("pretrained", [True, False])
def test_card_of_a_pretrained_student_names_its_base_model_and_hub_dataset(tmp_path, pretrained):
    torch.manual_seed(0)
    member = timm.create_model(TINY_ARCH, num_classes=3).eval()
    records = RunRecords(identity={"student_model": TINY_ARCH, "student_pretrained": pretrained, "num_students": 2,
                                   "teacher_models": ["resnet50"], "kd_temperature": 4.0, "kd_weight": 1.0,
                                   "ce_weight": 0.5})
    folder = write_student(member, tmp_path / "s", spec=_spec(), selected_member=1, selection_reason="chosen",
                           member_metrics={0: {"top1": 61.5, "top5": 90.0}, 1: {"top1": 63.25, "top5": 91.5}},
                           records=records)
    card = _card(folder)
    assert card.data.base_model == ("timm/test_resnet.r160_in1k" if pretrained else None)
    assert card.data.datasets == ["uoft-cs/cifar10"] and card.data.license is None
    assert [(r.dataset_type, r.dataset_split, r.metric_value) for r in card.data.eval_results] == [
        ("uoft-cs/cifar10", "test", 63.25), ("uoft-cs/cifar10", "test", 91.5)]
    assert "knowledge-distillation" in card.data.tags and "| kd_temperature | 4 |" in card.text
    assert "import hf_graft" not in card.text  # a timm architecture needs nothing else
    assert "nothing else installed" in card.text


def test_base_model_ids():
    assert base_model_id("resnet18.a1_in1k", {"hf_hub_id": "timm/resnet18.a1_in1k"}) == "timm/resnet18.a1_in1k"
    assert base_model_id("hf-hub:someone/backbone", {}) == "someone/backbone"
    assert base_model_id("local-dir:/models/x", {}) is None
    assert base_model_id("./models/x", None) is None


def test_held_out_evaluation_is_described_not_given_as_a_split(tmp_path):
    member = timm.create_model("cifar_resnet20", num_classes=3).eval()
    held_out = "10% of 'train' held out (seed 0)"
    folder = write_student(member, tmp_path / "s", spec=PopulationSpec(
        student_model="cifar_resnet20", num_students=1, num_classes=3, data_config=DATA_CONFIG,
        dataset_name=str(tmp_path), eval_split=held_out), selected_member=0, selection_reason="the only one",
        member_metrics={0: {"top1": 50.0}})
    card = _card(folder)
    (result,) = card.data.eval_results
    assert result.dataset_split is None and result.dataset_name == tmp_path.name  # a local folder, by its name
    assert held_out in card.text and card.data.datasets is None
    assert "import hf_graft" in card.text
    _assert_no_install_command(folder)
    assert "source repository" in json.loads((folder / "config.json").read_text())["hf_graft_note"]


def test_records_of_a_checkpoint(tmp_path):
    assert read_run_records(tmp_path) == RunRecords()  # an older checkpoint: nothing recorded
    (tmp_path / RUN_IDENTITY_FILE).write_text(json.dumps({"learning_rate": 0.2, "lr_spread": ["cosine"],
                                                          "num_students": 3, "lr_decay_epochs": [2, 4],
                                                          "lr_decay_gamma": 0.1, "lr_scheduler_type": "cosine"}))
    (tmp_path / TRAINER_STATE_FILE).write_text(json.dumps({
        "global_step": 8, "train_batch_size": 32, "num_train_epochs": 4, "unknown_future_key": 1,
        "log_history": [{"loss": 1.0, "step": 4}, {"eval_member0_top1": 10.0, "eval_ensemble_top1": 12.0,
                                                    "eval_runtime": 1.0, "epoch": 2.0, "step": 8}]}))
    records = read_run_records(tmp_path)
    assert records.hyperparameters() == {"learning_rate": 0.2, "train_batch_size": 32, "num_epochs": 4,
                                         "num_students": 3}
    settings = records.grafting_settings()
    assert settings["lr_schedule"] == "step x0.1 at epochs [2, 4]"
    assert settings["lr_multipliers"] == pytest.approx([0.25, 0.75, 1.0])  # the authors' cosine spread, K = 3
    assert records.evaluations() == [{"epoch": 2.0, "step": 8, "member0_top1": 10.0, "ensemble_top1": 12.0}]
    assert records.evaluation()["eval_member0_top1"] == 10.0 and records.kd_settings() is None
    (tmp_path / TRAINER_STATE_FILE).write_text("{not json")
    with pytest.raises(RunRecordsError, match=TRAINER_STATE_FILE) as caught:
        read_run_records(tmp_path)
    assert "\n" not in str(caught.value)


def test_license_is_checked_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^GraftingConfig\.license: got ' '; allowed: null, or a Hub license id"):
        GraftingConfig(output_dir=str(tmp_path), license=" ", use_cpu=True)
    assert GraftingConfig(output_dir=str(tmp_path), license="mit", use_cpu=True).license == "mit"


# ----------------------------------------------------------------------------- pushes
@pytest.fixture
def student_folder(tmp_path):
    member = timm.create_model(TINY_ARCH, num_classes=3).eval()
    return write_student(member, tmp_path / "student", spec=_spec(), selected_member=0, selection_reason="chosen")


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi with its repo, branch and upload calls recorded (no network)."""
    from huggingface_hub import CommitInfo, HfApi, RepoUrl

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}", endpoint="https://huggingface.co")

    def create_branch(self, repo_id, *, branch, **kwargs):
        calls.append(("create_branch", repo_id, dict(branch=branch, **kwargs)))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, dict(folder_path=folder_path, **kwargs)))
        if kwargs.get("commit_message") == "fail":
            raise OSError("connection reset by peer")
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123", commit_message="m",
                          commit_description="", oid="abc123")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_a_branch_creates_it_and_commits_there(student_folder, fake_hub):
    url = push_student(student_folder, "someone/grafted", revision="dev", commit_message="v1",
                       commit_description="first")
    assert url == "https://huggingface.co/someone/grafted"
    (_, _, _), (branch_call, repo, branch), (upload_call, _, upload) = fake_hub
    assert (branch_call, repo, branch["branch"], branch["exist_ok"]) == ("create_branch", "someone/grafted", "dev", True)
    assert upload_call == "upload_folder" and upload["revision"] == "dev" and upload["commit_message"] == "v1"
    assert upload["commit_description"] == "first" and sorted(upload["allow_patterns"]) == sorted(EXPORT_FILES)
    fake_hub.clear()
    push_student(student_folder, "someone/grafted")  # no revision: the default branch, none created
    assert [c[0] for c in fake_hub] == ["create_repo", "upload_folder"] and fake_hub[1][2]["revision"] is None


def test_push_without_blocking_returns_the_uploads_future(student_folder, fake_hub):
    future = push_student(student_folder, "someone/grafted", blocking=False)
    assert isinstance(future, Future)
    assert future.result(timeout=60).oid == "abc123"  # the upload's CommitInfo, as the Trainer's future gives
    failed = push_student(student_folder, "someone/grafted", blocking=False, commit_message="fail")
    error = failed.exception(timeout=60)
    assert isinstance(error, PushToHubError) and "\n" not in str(error)
    assert "someone/grafted" in str(error) and "connection reset by peer" in str(error)


def test_push_refuses_unknown_options_in_one_line(student_folder, fake_hub):
    with pytest.raises(PushOptionError, match=r"push_student: unexpected argument\(s\) tags; allowed .*create_pr"):
        push_student(student_folder, "someone/grafted", tags=["x"])
    assert fake_hub == []


def test_trainer_push_honours_hub_revision_and_blocking(make_trainer, tmp_path, fake_hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # else refused before training
    out = tmp_path / "run"
    trainer = make_trainer(num_students=2, num_train_epochs=1, max_train_samples=16, output_dir=str(out),
                           eval_strategy="no", select_student="0", push_to_hub=True, hub_model_id="someone/grafted",
                           hub_revision="experiments")
    with pytest.raises(PushOptionError, match="GraftingTrainer.push_to_hub: unexpected argument\\(s\\) language"):
        trainer.push_to_hub(language="en")
    assert not (out / "student").exists() and fake_hub == []  # refused before the student was written
    future = trainer.push_to_hub(commit_message="grafted", blocking=False, private=True)
    assert future.result(timeout=60).oid == "abc123"
    create_repo, create_branch, upload = fake_hub
    assert create_repo[2]["private"] is True and create_branch[2]["branch"] == "experiments"
    assert upload[2]["revision"] == "experiments" and upload[2]["commit_message"] == "grafted"
    assert Path(upload[2]["folder_path"]) == out / "student"
    fake_hub.clear()
    assert trainer.push_to_hub(revision="other") == "https://huggingface.co/someone/grafted"
    assert fake_hub[1][2]["branch"] == "other" and fake_hub[2][2]["revision"] == "other"


def test_export_cli_pushes_to_a_branch(fake_hub, tmp_path, capsys):
    from safetensors.torch import save_file

    from hf_graft.cli import export
    from hf_graft.population.students import StudentPopulation

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    population = StudentPopulation.from_spec(_spec(), seed=3)
    save_file({k: v.contiguous() for k, v in population.state_dict().items()}, str(checkpoint / "model.safetensors"))
    _spec().save(checkpoint)
    args = [str(checkpoint), "--member", "1", "--out", str(tmp_path / "o")]
    assert export.main([*args, "--revision", "dev"]) == 2
    assert "--revision: only with --push_to_hub" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert export.main([*args, "--push-to-hub", "someone/grafted", "--revision", "dev"]) == 0
    assert [c[0] for c in fake_hub] == ["create_repo", "create_branch", "upload_folder"]
    assert fake_hub[1][2]["branch"] == "dev" and fake_hub[2][2]["revision"] == "dev"
    assert "pushed to https://huggingface.co/someone/grafted" in capsys.readouterr().out
