"""hf_graft.cli.export: one folder that timm (`local-dir:`) and transformers (TimmWrapper, pipeline) both load."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import hf_graft  # noqa: F401  (registers cifar_* architectures)
from hf_graft.cli import export
from hf_graft.export import student_folder
from hf_graft.export.hub import PushToHubError, push_student
from hf_graft.export.model_card import PAPER_BIBTEX, build_model_card
from hf_graft.export.student_folder import save_student
from hf_graft.run.results import select_member
from hf_graft.utils.files import EXPORT_FILES
from hf_graft.population.students import PopulationSpec, StudentPopulation

TINY_ARCH = "test_resnet"  # timm's own ~0.5M-parameter test network
LABELS = ["airplane", "bird", "cat"]
DATA_CONFIG = {
    "input_size": [3, 32, 32],
    "interpolation": "bilinear",
    "mean": [0.4914, 0.4822, 0.4465],
    "std": [0.247, 0.2435, 0.2616],
    "crop_pct": 1.0,
    "crop_mode": "center",
}
FAKE_TOKEN = "hf_FakeTokenForTestsOnly0123456789abcdef"
HAS_CIFAR = bool(timm.list_models("cifar_*"))


def _tiny_model(seed: int, arch: str = TINY_ARCH, num_classes: int = len(LABELS)) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=num_classes)
    # non-trivial BatchNorm statistics, so that a wrong buffer load would show in the logits
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _image(seed: int = 0, size=(45, 37)) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _assert_same_logits(folder: Path, model: torch.nn.Module, input_size) -> None:
    from transformers import AutoModelForImageClassification

    x = torch.randn(3, *input_size, generator=torch.Generator().manual_seed(1))
    via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    via_transformers, info = AutoModelForImageClassification.from_pretrained(folder, output_loading_info=True)
    via_transformers.eval()
    assert type(via_transformers).__name__ == "TimmWrapperForImageClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(via_timm(x), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(via_transformers(pixel_values=x).logits, expected, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _tiny_model(seed=0)
    folder = tmp_path_factory.mktemp("export") / "student"
    save_student(model, folder, architecture=TINY_ARCH, label_names=LABELS, data_config=DATA_CONFIG)
    return model, folder


# ------------------------------------------------------------------------------------------ folder layout


def test_folder_holds_exactly_the_three_files(exported):
    _, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == sorted(EXPORT_FILES)
    assert [p.name for p in folder.parent.iterdir()] == ["student"]  # no temporary folder left behind


def test_round_trip_gives_identical_logits_in_timm_and_transformers(exported):
    model, folder = exported
    _assert_same_logits(folder, model, DATA_CONFIG["input_size"])


def test_config_json_content(exported):
    model, folder = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == TINY_ARCH
    assert config["num_classes"] == 3
    assert config["num_features"] == model.num_features
    assert config["label_names"] == LABELS
    assert config["model_type"] == "timm_wrapper"
    assert config["architectures"] == ["TimmWrapperForImageClassification"]
    assert config["id2label"] == {"0": "airplane", "1": "bird", "2": "cat"}
    assert config["label2id"] == {"airplane": 0, "bird": 1, "cat": 2}
    # transformers passes num_classes itself: it must not be repeated in model_args
    assert isinstance(config["model_args"], dict) and "num_classes" not in config["model_args"]
    pretrained_cfg = config["pretrained_cfg"]
    for key, value in DATA_CONFIG.items():
        assert pretrained_cfg[key] == pytest.approx(value), key
    assert pretrained_cfg["num_classes"] == 3
    # timm validates pretrained_cfg against its dataclass
    timm.models.PretrainedCfg(**pretrained_cfg)
    text = (folder / "config.json").read_text() + (folder / "README.md").read_text()
    assert "hf_" + "FakeToken" not in text


def test_timm_loader_keeps_the_training_preprocessing(exported):
    _, folder = exported
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    data = timm.data.resolve_model_data_config(model)
    assert tuple(data["input_size"]) == tuple(DATA_CONFIG["input_size"])
    assert tuple(data["mean"]) == pytest.approx(DATA_CONFIG["mean"])
    assert tuple(data["std"]) == pytest.approx(DATA_CONFIG["std"])
    assert data["interpolation"] == "bilinear" and data["crop_pct"] == 1.0
    assert list(model.pretrained_cfg["label_names"]) == LABELS


def test_pipeline_labels_preprocessing_and_scores(exported):
    from transformers import pipeline

    model, folder = exported
    classifier = pipeline("image-classification", model=str(folder))
    image = _image()
    predictions = classifier(image)
    assert {p["label"] for p in predictions} == set(LABELS)

    # the pipeline's preprocessing is timm's eval transform with the training input size / mean / std
    processor = classifier.image_processor
    assert tuple(processor.data_config["input_size"]) == tuple(DATA_CONFIG["input_size"])
    assert tuple(processor.data_config["mean"]) == pytest.approx(DATA_CONFIG["mean"])
    assert tuple(processor.data_config["std"]) == pytest.approx(DATA_CONFIG["std"])
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert tuple(pixel_values.shape) == (1, *DATA_CONFIG["input_size"])
    training_eval_transform = timm.data.create_transform(**DATA_CONFIG, is_training=False)
    torch.testing.assert_close(pixel_values[0], training_eval_transform(image))

    with torch.no_grad():
        probabilities = model(pixel_values).softmax(-1)[0]
    top = int(probabilities.argmax())
    assert predictions[0]["label"] == LABELS[top]
    assert predictions[0]["score"] == pytest.approx(float(probabilities[top]), abs=1e-5)


@pytest.mark.skipif(not HAS_CIFAR, reason="cifar_* architectures are not registered in timm yet")
@pytest.mark.parametrize("arch", ["cifar_resnet20", "cifar_mobilenetv2"])
def test_cifar_round_trip(tmp_path, arch):
    from transformers import pipeline

    labels = [f"class_{i}" for i in range(10)]
    model = _tiny_model(seed=3, arch=arch, num_classes=10)
    folder = save_student(model, tmp_path / "cifar", architecture=arch, label_names=labels, data_config=DATA_CONFIG)
    _assert_same_logits(folder, model, DATA_CONFIG["input_size"])
    predictions = pipeline("image-classification", model=str(folder))(_image(2, (32, 32)))
    assert predictions[0]["label"] in labels
    card = (folder / "README.md").read_text()
    assert "import hf_graft" in card


@pytest.mark.parametrize("arch,kwargs,recorded", [
    ("cifar_resnet20", {}, {"shortcut": "A"}),  # the default is recorded too
    ("cifar_resnet20", {"shortcut": "B"}, {"shortcut": "B"}),
    ("cifar_wrn28_10", {"depth": 10, "widen_factor": 1}, {"depth": 10, "widen_factor": 1}),
], ids=["resnet-A", "resnet-B", "small-wrn"])
def test_cifar_construction_arguments_are_recorded(tmp_path, arch, kwargs, recorded):
    torch.manual_seed(6)
    model = timm.create_model(arch, num_classes=10, **kwargs).eval()
    folder = save_student(model, tmp_path / "s", architecture=arch, data_config=DATA_CONFIG)
    model_args = json.loads((folder / "config.json").read_text())["model_args"]
    assert recorded.items() <= model_args.items()
    _assert_same_logits(folder, model, DATA_CONFIG["input_size"])


def _projection_convs(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if name.endswith("shortcut.0") and isinstance(m, torch.nn.Conv2d)]


def test_export_saved_before_shortcuts_were_recorded_loads_as_option_b(tmp_path):
    """A folder exported when option B was the only CIFAR ResNet: B weights, config.json without
    `shortcut`. timm rebuilds it as B by itself; transformers with `saved_model_args`."""
    from transformers import AutoModelForImageClassification

    from hf_graft.models import saved_model_args

    torch.manual_seed(7)
    model = timm.create_model("cifar_resnet20", num_classes=10, shortcut="B").eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    folder = save_student(model, tmp_path / "old", architecture="cifar_resnet20", data_config=DATA_CONFIG)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    del config["model_args"]["shortcut"]
    assert config["model_args"] == {"global_pool": "avg"}  # what an export wrote before
    config_file.write_text(json.dumps(config, indent=2))

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        assert _projection_convs(via_timm) == ["layer2.0.shortcut.0", "layer3.0.shortcut.0"]
        torch.testing.assert_close(via_timm(x), expected, rtol=1e-6, atol=1e-6)
        # the architecture alone (no weights loaded) is B as well
        assert _projection_convs(timm.create_model(f"local-dir:{folder}")) == _projection_convs(via_timm)
        # an explicit argument still wins
        assert _projection_convs(timm.create_model(f"local-dir:{folder}", shortcut="A")) == []

        assert saved_model_args(folder) == {"global_pool": "avg", "shortcut": "B"}
        via_transformers, info = AutoModelForImageClassification.from_pretrained(
            folder, model_args=saved_model_args(folder), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        torch.testing.assert_close(via_transformers.eval()(pixel_values=x).logits, expected, rtol=1e-6, atol=1e-6)

    # hf_graft's own loaders take the timm path
    from hf_graft.cli.evaluate import load_model

    loaded = load_model(str(folder))
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(x), expected, rtol=1e-6, atol=1e-6)


def test_folder_without_shortcut_record_follows_its_weights(tmp_path):
    """An option-A folder whose config does not name the shortcut (hand-written model_args) loads as
    A: a saved config without `shortcut` means B only where the weights hold projection convs."""
    from hf_graft.models import saved_model_args

    torch.manual_seed(8)
    model = timm.create_model("cifar_resnet20", num_classes=10).eval()
    folder = save_student(model, tmp_path / "a", architecture="cifar_resnet20", data_config=DATA_CONFIG)
    config = json.loads((folder / "config.json").read_text())
    del config["model_args"]["shortcut"]
    (folder / "config.json").write_text(json.dumps(config))
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert _projection_convs(reloaded) == [] and reloaded.shortcut_type == "A"
    assert saved_model_args(folder)["shortcut"] == "A"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=1e-6, atol=1e-6)


def test_architecture_kwargs_reach_both_loaders(tmp_path):
    # transformers never reads pretrained_cfg to build the network: the kwargs must travel in model_args
    kwargs = {"global_pool": "max", "drop_rate": 0.1}
    torch.manual_seed(4)
    model = timm.create_model(TINY_ARCH, num_classes=3, **kwargs).eval()
    folder = save_student(model, tmp_path / "s", architecture=TINY_ARCH, model_kwargs=kwargs, data_config=DATA_CONFIG)
    model_args = json.loads((folder / "config.json").read_text())["model_args"]
    assert model_args["global_pool"] == "max" and "drop_rate" not in model_args
    _assert_same_logits(folder, model, DATA_CONFIG["input_size"])


def test_default_labels_and_bad_labels(tmp_path):
    model = _tiny_model(seed=1)
    folder = save_student(model, tmp_path / "s", architecture=TINY_ARCH, data_config=DATA_CONFIG, verify=False)
    assert json.loads((folder / "config.json").read_text())["label_names"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    with pytest.raises(ValueError, match="2 label_names for a model with 3 classes"):
        save_student(model, tmp_path / "t", architecture=TINY_ARCH, label_names=["a", "b"], data_config=DATA_CONFIG)
    with pytest.raises(ValueError, match="not in timm's registry"):
        save_student(model, tmp_path / "u", architecture="no_such_net", data_config=DATA_CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


# ------------------------------------------------------------------------------------------ atomic write


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failure_after_writing_keeps_the_previous_folder(tmp_path, monkeypatch):
    out = tmp_path / "student"
    save_student(_tiny_model(seed=0), out, architecture=TINY_ARCH, label_names=LABELS, data_config=DATA_CONFIG)
    before = _snapshot(out)

    def fail(*args, **kwargs):
        raise RuntimeError("simulated crash after the files were written")

    monkeypatch.setattr(student_folder, "_verify_folder", fail)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_student(_tiny_model(seed=5), out, architecture=TINY_ARCH, label_names=LABELS, data_config=DATA_CONFIG)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


def test_failure_mid_weights_keeps_the_previous_folder(tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "student"
    save_student(_tiny_model(seed=0), out, architecture=TINY_ARCH, label_names=LABELS, data_config=DATA_CONFIG)
    before = _snapshot(out)

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="No space left"):
        save_student(_tiny_model(seed=5), out, architecture=TINY_ARCH, label_names=LABELS, data_config=DATA_CONFIG)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["student"]

    # a first save that fails leaves nothing at all
    with pytest.raises(OSError):
        save_student(_tiny_model(seed=5), tmp_path / "fresh", architecture=TINY_ARCH, data_config=DATA_CONFIG)
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


def test_failed_final_rename_restores_the_previous_folder(tmp_path, monkeypatch):
    out = tmp_path / "student"
    save_student(_tiny_model(seed=0), out, architecture=TINY_ARCH, label_names=LABELS, data_config=DATA_CONFIG)
    before = _snapshot(out)
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError("simulated rename failure")
        return real_replace(src, dst)

    monkeypatch.setattr(student_folder.os, "replace", replace)
    with pytest.raises(OSError, match="simulated rename"):
        save_student(_tiny_model(seed=5), out, architecture=TINY_ARCH, label_names=LABELS, data_config=DATA_CONFIG)
    monkeypatch.undo()
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


def test_successful_save_replaces_a_previous_export(tmp_path):
    out = tmp_path / "student"
    save_student(_tiny_model(seed=0), out, architecture=TINY_ARCH, label_names=LABELS, data_config=DATA_CONFIG)
    newer = _tiny_model(seed=7)
    save_student(newer, out, architecture=TINY_ARCH, label_names=LABELS, data_config=DATA_CONFIG)
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), newer(x))
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


def test_refuses_to_replace_an_unrelated_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a student export"):
        save_student(_tiny_model(seed=0), tmp_path, architecture=TINY_ARCH, data_config=DATA_CONFIG)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------ selection, card


def test_select_member():
    metrics = {0: {"top1": 90.0, "loss": 0.5}, 1: {"top1": 92.5, "loss": 0.4}, 2: {"top1": 92.5, "loss": 0.3}}
    index, reason = select_member(metrics, "best")
    assert index == 1 and "top1" in reason and "92.5" in reason  # tie -> lowest index
    assert select_member(metrics, "best", metric="loss")[0] == 2  # losses: lower is better
    assert select_member(metrics, 2)[0] == 2
    assert select_member(metrics, "0")[0] == 0
    assert "explicit" in select_member(metrics, "0")[1]
    with pytest.raises(ValueError, match="select_student=3: no such member .*0..2"):
        select_member(metrics, 3)
    with pytest.raises(ValueError, match="no such member"):
        select_member(metrics, -1)
    with pytest.raises(ValueError, match="'best' or a member index"):
        select_member(metrics, "worst")
    with pytest.raises(ValueError, match="top5.*available metrics: loss, top1"):
        select_member(metrics, "best", metric="top5")
    assert select_member({}, 4, num_members=5)[0] == 4


def _card(kd: bool, dataset: str | None = "uoft-cs/cifar10", arch: str = TINY_ARCH):
    return build_model_card(
        architecture=arch,
        label_names=LABELS,
        dataset_name=dataset,
        member_metrics={0: {"top1": 91.2345, "top5": 99.12}, 1: {"top1": 92.875, "top5": 99.5}},
        ensemble_metrics={"top1": 93.4567, "top5": 99.8},
        selected_member=1,
        selection_reason="member 1 has the highest eval top1 (92.875) of the 2 evaluated members",
        grafting_settings={"num_students": 2, "graft_alpha": 100.0, "graft_c": 500.0},
        kd_settings={"teacher_models": ["resnet50"], "kd_temperature": 2.0} if kd else None,
        repo_id="someone/grafted-student",
        license="apache-2.0",
    )


def test_model_card_metadata_and_text():
    from huggingface_hub import ModelCard

    card = ModelCard(str(_card(kd=False)))  # survives a write / read round trip
    data = card.data.to_dict()
    assert data["library_name"] == "timm"
    assert data["pipeline_tag"] == "image-classification"
    assert data["tags"] == ["image-classification", "timm", "filter-grafting"]
    assert data["datasets"] == ["uoft-cs/cifar10"]
    assert data["license"] == "apache-2.0"
    text = card.text
    for number in ("91.2345", "99.12", "92.875", "99.5", "93.4567", "99.8"):
        assert number in text, number
    table_rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert any("member 0" in row and "91.2345" in row for row in table_rows)
    assert any("member 1" in row and "exported" in row and "92.875" in row for row in table_rows)
    assert any("ensemble" in row and "93.4567" in row for row in table_rows)
    assert "highest eval top1" in text
    assert "graft_alpha" in text and "graft_c" in text
    assert 'timm.create_model("hf-hub:someone/grafted-student", pretrained=True)' in text
    assert "local-dir:" not in text or "hf-hub:" in text
    assert 'AutoModelForImageClassification.from_pretrained("someone/grafted-student")' in text
    assert 'pipeline("image-classification", model="someone/grafted-student")' in text
    assert "2004.12311" in text and PAPER_BIBTEX in text
    for author in ("Cheng, Hao", "Meng, Fanxu", "Li, Ke", "Gao, Yuting", "Lu, Guangming", "Sun, Xing", "Ji, Rongrong"):
        assert author in PAPER_BIBTEX


def test_model_card_with_distillation_local_dataset_and_cifar_note(tmp_path):
    card = _card(kd=True, dataset=str(tmp_path), arch="cifar_resnet20")
    data = card.data.to_dict()
    assert data["tags"] == [
        "image-classification", "timm", "filter-grafting", "grafting-plus", "knowledge-distillation"
    ]
    assert "datasets" not in data  # a local folder is not a Hub dataset id
    assert "kd_temperature" in card.text and "resnet50" in card.text
    assert "import hf_graft" in card.text

    local = build_model_card(
        architecture=TINY_ARCH, label_names=None, dataset_name=None, member_metrics={}, ensemble_metrics=None,
        selected_member=None, selection_reason=None, grafting_settings={}, kd_settings=None, repo_id=None,
    )
    assert "local-dir:" in local.text and "import hf_graft" not in local.text


# ------------------------------------------------------------------------------------------ push


def test_push_uploads_only_the_export_folder(exported, monkeypatch):
    from huggingface_hub import HfApi, RepoUrl

    _, folder = exported
    calls = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = dict(repo_id=repo_id, token=self.token, **kwargs)
        return RepoUrl(f"https://huggingface.co/{repo_id}", endpoint="https://huggingface.co")

    def fake_upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir() if p.is_file())
        if allow_patterns:
            files = [f for f in files if any(fnmatch.fnmatch(f, pattern) for pattern in allow_patterns)]
        calls["upload_folder"] = dict(repo_id=repo_id, folder_path=folder_path, files=files, **kwargs)
        return None

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    url = push_student(folder, "someone/grafted-student", token=FAKE_TOKEN, private=True)
    assert url == "https://huggingface.co/someone/grafted-student"
    assert calls["create_repo"]["repo_id"] == "someone/grafted-student"
    assert calls["create_repo"]["exist_ok"] is True and calls["create_repo"]["private"] is True
    assert calls["create_repo"]["token"] == FAKE_TOKEN
    assert calls["upload_folder"]["repo_id"] == "someone/grafted-student"
    assert Path(calls["upload_folder"]["folder_path"]) == folder
    assert calls["upload_folder"]["files"] == sorted(EXPORT_FILES)


def test_push_error_is_one_line_names_the_repo_and_hides_the_token(exported, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import get_session

    _, folder = exported
    # the HTTP client huggingface_hub uses: httpx (1.x) or httpx2 (2.x)
    client = sys.modules[type(get_session()).__module__.split(".")[0]]

    def unauthorised(self, repo_id, **kwargs):
        request = client.Request("POST", "https://huggingface.co/api/repos/create")
        raise HfHubHTTPError(
            f"401 Client Error: Unauthorized\nInvalid credentials in Authorization header (Bearer {FAKE_TOKEN})",
            response=client.Response(401, request=request),
        )

    monkeypatch.setattr(HfApi, "create_repo", unauthorised)
    with pytest.raises(PushToHubError) as caught:
        push_student(folder, "someone/grafted-student", token=FAKE_TOKEN)
    message = str(caught.value)
    assert "\n" not in message
    assert "someone/grafted-student" in message and "401" in message
    assert FAKE_TOKEN not in message


# ------------------------------------------------------------------------------------------ checkpoint + CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("checkpoint")
    spec = PopulationSpec(
        student_model=TINY_ARCH, num_students=2, num_classes=3, label_names=LABELS, data_config=DATA_CONFIG
    )
    population = StudentPopulation.from_spec(spec, seed=11).eval()
    save_file({k: v.contiguous() for k, v in population.state_dict().items()}, str(folder / "model.safetensors"))
    spec.save(folder)
    return folder, population


def test_export_from_checkpoint(checkpoint, tmp_path):
    folder, population = checkpoint
    out = export.export_from_checkpoint(folder, member=1, out=tmp_path / "student",
                                        member_metrics={0: {"top1": 71.5}, 1: {"top1": 73.25}})
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES)
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), population.members[1](x), rtol=1e-6, atol=1e-6)
    card = (out / "README.md").read_text()
    assert "73.25" in card and "member 1" in card
    assert json.loads((out / "config.json").read_text())["label_names"] == LABELS


def test_cli_rejects_bad_input_before_loading(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint
    assert export.main([str(tmp_path / "missing"), "--member", "0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such checkpoint folder" in err

    assert export.main([str(folder), "--member", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "member 2: out of range" in err and "0..1" in err

    assert export.main([str(folder), "--member", "0", "--out", str(tmp_path / "o"), "--push-to-hub", "a/b/c"]) == 2
    assert "not a valid repo id" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_export_writes_the_folder(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint
    assert export.main([str(folder), "--member", "0", "--out", str(tmp_path / "o")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(EXPORT_FILES)


def test_cli_push_to_unreachable_hub_fails_cleanly(checkpoint, tmp_path):
    folder, _ = checkpoint
    out = tmp_path / "student"
    env = dict(os.environ)
    env.pop("HF_HUB_OFFLINE", None)  # reach the (dead) endpoint rather than the offline guard
    env.pop("HF_TOKEN", None)
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    command = [sys.executable, "-m", "hf_graft.cli.export", str(folder), "--member", "1", "--out", str(out),
               "--push-to-hub", "someone/grafted-student", "--token", FAKE_TOKEN]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1, result.stderr
    assert "someone/grafted-student" in error_lines[0]
    assert FAKE_TOKEN not in result.stdout + result.stderr
    # the local export is complete and kept
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES)
    timm.create_model(f"local-dir:{out}", pretrained=True)
    for path in [*out.iterdir(), *folder.iterdir()]:
        assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_cli_hub_flags_in_both_spellings_and_the_old_ones_with_a_note(checkpoint, tmp_path, capsys, monkeypatch):
    """`--push_to_hub` / `--hub_token` / `--hub_private_repo` as in `train` (and `--push-to-hub`, ...); the earlier
    `--token` and `--private` still reach the push, each with one note naming the new spelling."""
    folder, population = checkpoint
    pushes = []

    def fake_push(exported, repo_id, *, token=None, private=None, **kwargs):
        pushes.append({"folder": Path(exported), "repo_id": repo_id, "token": token, "private": private})
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(export, "push_student", fake_push)
    spellings = {
        "new": ["--push_to_hub", "someone/m", "--hub_token", FAKE_TOKEN, "--hub_private_repo"],
        "dashes": ["--push-to-hub", "someone/m", "--hub-token", FAKE_TOKEN, "--hub-private-repo", "true"],
        "old": ["--push-to-hub", "someone/m", "--token", FAKE_TOKEN, "--private"],
        "old=": ["--push-to-hub=someone/m", f"--token={FAKE_TOKEN}", "--private"],
    }
    for name, flags in spellings.items():
        out = tmp_path / name
        assert export.main([str(folder), "--member", "1", "--out", str(out), *flags]) == 0, capsys.readouterr().err
        notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
        assert pushes[-1] == {"folder": out, "repo_id": "someone/m", "token": FAKE_TOKEN, "private": True}, name
        if name.startswith("old"):
            assert notes == [
                "hf-graft export: note: --token is now --hub_token; the old spelling works in this release only",
                "hf-graft export: note: --private is now --hub_private_repo; the old spelling works in this release "
                "only",
            ]
        else:
            assert notes == []
        reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x), population.members[1](x), rtol=1e-6, atol=1e-6)
    # unset: the Hub's default visibility (None), as before
    assert export.main([str(folder), "--member", "0", "--out", str(tmp_path / "default"), "--push_to_hub",
                        "someone/m"]) == 0
    assert pushes[-1]["private"] is None and pushes[-1]["token"] is None


def test_cli_argument_errors_are_one_line_and_hide_tokens(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint
    cases = [
        ([str(folder), "--member", "zero", "--out", "o"], "argument --member: invalid int value: 'zero'"),
        ([str(folder), "--out", "o"], "the following arguments are required: --member"),
        (["--member", "0", "--out", "o"], "the following arguments are required: CHECKPOINT_DIR"),
        ([str(folder), "--checkpoint_dir", str(folder), "--member", "0", "--out", "o"], "CHECKPOINT_DIR is given twice"),
        ([str(folder), "--member", "0", "--out", "o", "--bogus", FAKE_TOKEN], "unrecognized arguments: --bogus"),
    ]
    for argv, expected in cases:
        assert export.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("hf-graft export: error: ") and expected in err, err
        assert FAKE_TOKEN not in err
    # the checkpoint may come after the flags, and as --checkpoint-dir
    assert export.main(["--member", "0", "--out", str(tmp_path / "a"), str(folder)]) == 0
    assert export.main(["--checkpoint-dir", str(folder), "--member", "0", "--out", str(tmp_path / "b")]) == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(EXPORT_FILES)
