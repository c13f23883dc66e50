"""One set of rules for what a model name or folder refers to: GraftingConfig's student and teachers,
the teachers the trainer loads, and `hf-graft analyze` all resolve names with `model_sources`."""

from __future__ import annotations

import pytest

import hf_graft  # noqa: F401  (registers the cifar_* architectures)
from hf_graft.config import GraftingConfig
from hf_graft.population.sources import ModelSourceError, check_model_name, resolve_model_source


@pytest.fixture
def folders(tmp_path):
    model = tmp_path / "student"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "graft_population.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    return tmp_path


def test_every_kind_of_name(folders):
    assert (resolve_model_source("cifar_resnet20").kind, resolve_model_source("cifar_resnet20").timm_name) == (
        "timm", "cifar_resnet20")
    assert resolve_model_source("hf-hub:timm/resnet18.a1_in1k").timm_name == "hf-hub:timm/resnet18.a1_in1k"
    for name in (str(folders / "student"), f"local-dir:{folders / 'student'}"):
        source = resolve_model_source(name)
        assert source.kind == "folder" and source.timm_name == f"local-dir:{folders / 'student'}"
    source = resolve_model_source(f"{folders / 'checkpoint-4'}#member1")
    assert (source.kind, source.member, source.location) == ("checkpoint", 1, str(folders / "checkpoint-4"))
    assert resolve_model_source(f"{folders / 'checkpoint-4'}#2").member == 2


@pytest.mark.parametrize("name, problem", [
    ("hf-hub:", "empty hf-hub id"),
    ("not_a_model_xyz", "not a folder, a known timm model name or an hf-hub: id"),
    ("{}/missing/student", "no such folder"),
    ("local-dir:{}/missing", "no such folder"),
    ("{}/empty", "folder holds neither graft_population.json nor config.json + model.safetensors"),
    ("{}/file.txt", "is a file, not a folder"),
    ("{}/student#member1", "'#memberK' needs a training checkpoint folder"),
    ("{}/checkpoint-4#first", "the part after '#' must be memberK"),
])
def test_what_is_not_a_model_says_why(folders, name, problem):
    name = name.format(folders)
    with pytest.raises(ModelSourceError) as err:
        resolve_model_source(name)
    assert err.value.problem.startswith(problem) and str(err.value).startswith(repr(name))


def test_config_fields_use_the_same_rules(folders):
    # a plain model folder is a student architecture too, read through timm's local-dir:; the config
    # keeps what it was given (it does no I/O) and the builder resolves it
    from hf_graft.training.builder import student_model_name

    config = GraftingConfig(output_dir=str(folders / "o"), use_cpu=True, student_model=str(folders / "student"),
                            teacher_models=[str(folders / "student"), "cifar_resnet20"])
    assert config.student_model == str(folders / "student")
    assert student_model_name(config) == f"local-dir:{folders / 'student'}"
    assert config.teacher_models == [str(folders / "student"), "cifar_resnet20"]
    for field in ("student_model", "teacher_models"):
        value = str(folders / "checkpoint-4")
        with pytest.raises(ValueError) as err:
            student_model_name(GraftingConfig(output_dir=str(folders / "o"), use_cpu=True,
                                              **{field: [value] if field == "teacher_models" else value}))
        message = str(err.value)
        assert message.startswith(f"GraftingConfig.{field}: got {value!r}; a training checkpoint")
        assert "\n" not in message
    expected = r"^Owner\.field: got 'nope_xyz'; not a folder, .*; allowed: a timm model name"
    with pytest.raises(ValueError, match=expected):
        check_model_name("Owner", "field", "nope_xyz")
