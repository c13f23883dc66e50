"""The public API (`from hf_graft import ...`), the README's Python example, and loading `cifar_*` models
in a process that did not `import hf_graft`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import hf_graft

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = ["GraftingConfig", "DataArguments", "GraftingTrainer", "StudentPopulation", "PopulationSpec", "graft_members",
          "layer_information", "adaptive_alpha", "kd_loss", "filter_report"]


# ----------------------------------------------------------------------------- from hf_graft import ...
def test_public_names_are_the_submodules_objects():
    import importlib

    namespace: dict = {}
    exec(f"from hf_graft import {', '.join(PUBLIC)}", namespace)
    assert sorted(hf_graft._PUBLIC) == sorted(PUBLIC) == sorted(hf_graft.__all__)
    for name, module in hf_graft._PUBLIC.items():  # the one table of where each name lives
        assert namespace[name] is getattr(importlib.import_module(f"hf_graft.{module}"), name), name
    assert set(PUBLIC) <= set(dir(hf_graft))
    with pytest.raises(AttributeError, match="no attribute 'GraftTrainer'"):
        hf_graft.GraftTrainer  # noqa: B018


def test_import_registers_the_cifar_models_and_loads_nothing_heavy():
    code = ("import sys, timm, hf_graft; "
            "print(sorted(timm.list_models('cifar_*'))); "
            "print(sorted(m for m in ('transformers', 'datasets', 'evaluate', 'accelerate') if m in sys.modules)); "
            "from hf_graft import GraftingTrainer; print('transformers' in sys.modules)")
    lines = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.splitlines()
    assert lines[0] == str(sorted(["cifar_mobilenetv2", "cifar_resnet110", "cifar_resnet20", "cifar_resnet32",
                                   "cifar_resnet56"]))
    assert lines[1] == "[]"  # the heavy libraries load with the first name that needs them
    assert lines[2] == "True"


# ----------------------------------------------------------------------------- the README example
def _readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


SAVE_MARKER = "# save and push: the selected member only\n"


def test_readme_python_example_trains_and_saves(tmp_path, monkeypatch):
    """Runs the README's example as written (in a temporary folder), its save and push lines too; the
    Hub is replaced by a recorder."""
    from huggingface_hub import HfApi

    example = _readme_example()
    assert SAVE_MARKER in example
    build_and_train, save_and_push = example.split(SAVE_MARKER)
    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: uploads.append(kw))
    monkeypatch.chdir(tmp_path)

    namespace: dict = {}
    exec(compile(build_and_train, "README.md", "exec"), namespace)
    trainer, metrics = namespace["trainer"], namespace["metrics"]
    assert trainer.state.global_step == 3 * len(trainer.get_train_dataloader())
    assert set(metrics) >= {"eval_member0_top1", "eval_member1_top1", "eval_ensemble_top1", "eval_top1"}
    assert metrics["eval_top1"] > 50.0  # 3 epochs of 1,437 digits: well above chance (10%)

    student = tmp_path / "out/python_api/student"
    exec(compile(save_and_push, "README.md", "exec"), namespace)
    assert sorted(p.name for p in student.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert [u["repo_id"] for u in uploads] == ["your-name/cifar_resnet20-digits-grafted"]
    assert Path(uploads[0]["folder_path"]).resolve() == student.resolve()
    model = timm.create_model(f"local-dir:{student}", pretrained=True)
    assert model.num_classes == 10


# ----------------------------------------------------------------------------- cifar_* without import hf_graft
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from hf_graft.export.model_card import build_model_card
    from hf_graft.export.student_folder import save_student

    folder = tmp_path_factory.mktemp("export") / "student"
    model = timm.create_model("cifar_resnet20", num_classes=3).eval()
    data_config = {"input_size": [3, 16, 16], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3,
                   "crop_pct": 1.0, "crop_mode": "center"}
    card = build_model_card(architecture="cifar_resnet20", label_names=["a", "b", "c"], dataset_name=None,
                            member_metrics={}, ensemble_metrics=None, selected_member=0, selection_reason=None,
                            grafting_settings={}, kd_settings=None, repo_id=None)
    return save_student(model, folder, architecture="cifar_resnet20", label_names=["a", "b", "c"],
                        data_config=data_config, card=card)


def test_export_says_import_hf_graft_first(exported, tmp_path):
    config_text = (exported / "config.json").read_text()
    config = json.loads(config_text)
    assert next(iter(config)) == "hf_graft_note"  # the first key of the file
    assert "import hf_graft" in config["hf_graft_note"] and "cifar_resnet20" in config["hf_graft_note"]
    card = (exported / "README.md").read_text()
    body = card.split("\n---\n", 1)[1].strip().splitlines()  # after the YAML front matter
    assert body[0].startswith("# ") and "import hf_graft" in body[2]
    # timm's own architectures get no such note
    from hf_graft.export.student_folder import build_student_config

    plain = build_student_config(timm.create_model("resnet10t", num_classes=3), architecture="resnet10t",
                                 data_config={"input_size": [3, 32, 32]})
    assert "hf_graft_note" not in plain


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message
    return message


def test_own_loaders_name_the_architecture_and_the_fix(exported, tmp_path, monkeypatch):
    import timm.models._registry as registry

    from hf_graft.cli.analyze import load_models
    from hf_graft.population.sources import resolve_model_source as resolve_source
    from hf_graft.population.students import PopulationSpec, StudentPopulation, load_checkpoint_members
    from hf_graft.models.registry import UnknownArchitectureError
    from hf_graft.population.sources import load_teacher

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    spec = PopulationSpec("cifar_resnet20", 2, 3)
    from safetensors.torch import save_file

    save_file(StudentPopulation.from_spec(spec).state_dict(), str(checkpoint / "model.safetensors"))
    spec.save(checkpoint)

    monkeypatch.delitem(registry._model_entrypoints, "cifar_resnet20")  # as in a process without hf_graft
    loaders = {
        "analyze": lambda: load_models(resolve_source(str(exported))),
        "teacher": lambda: load_teacher(str(exported)),
        "checkpoint": lambda: load_checkpoint_members(checkpoint, [0]),
    }
    for what, load in loaders.items():
        with pytest.raises(UnknownArchitectureError) as caught:
            load()
        message = _one_line(caught.value)
        assert "'cifar_resnet20'" in message and "import hf_graft" in message, (what, message)

    # an architecture from a newer timm: the fix is to upgrade timm
    future = tmp_path / "future"
    future.mkdir()
    config = json.loads((exported / "config.json").read_text())
    config.update(architecture="resnet_from_the_future")
    (future / "config.json").write_text(json.dumps(config))
    (future / "model.safetensors").write_bytes((exported / "model.safetensors").read_bytes())
    with pytest.raises(UnknownArchitectureError) as caught:
        load_models(resolve_source(str(future)))
    message = _one_line(caught.value)
    assert "'resnet_from_the_future'" in message and "upgrade timm" in message


def test_exported_cifar_student_still_loads_in_both_libraries(exported):
    from transformers import AutoModelForImageClassification

    x = torch.randn(2, 3, 16, 16)
    via_timm = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    via_transformers = AutoModelForImageClassification.from_pretrained(str(exported)).eval()
    with torch.no_grad():
        torch.testing.assert_close(via_transformers(x).logits, via_timm(x))
