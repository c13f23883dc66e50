"""The recipes: each parses, names the row of the paper it reproduces (or controls), and builds its
population and datasets offline, on a small stand-in of its dataset with the real one's schema; the
controls are what scripts/make_controls.py writes and differ from their recipe by the graft alone
(and, with one network, by K and member 0's rate), member 0 starting from the same weights and
reading the same batches."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml

import hf_graft  # noqa: F401  (registers the cifar_* architectures)
from hf_graft.cli.recipe import parse_recipe
from hf_graft.graft.schedule import cosine_lr_multipliers
from hf_graft.training.builder import build_run

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.relative_to(ROOT).parts)
# person re-identification recipes (Table 7) build on a re-identification folder: tests/test_reid_training.py
REID = {p for p in RECIPES if p.stem.startswith(("market1501_", "dukemtmc_reid_"))}
FIRST_LINE = re.compile(r"^# (Reproduces: |Control (without the graft|with one network) for )Table \d+, .+ \(paper\)$")
WRN_MISSING = "cifar_wrn28_10" not in timm.list_models("cifar_wrn*")

# the real datasets' schemas: (image column, label column, classes, splits, image size)
STAND_INS = {
    "uoft-cs/cifar10": ("img", "label", 10, ("train", "test"), (32, 32)),
    "uoft-cs/cifar100": ("img", "fine_label", 100, ("train", "test"), (32, 32)),
    "imagefolder": ("image", "label", 1000, ("train", "validation"), (96, 72)),  # ImageNet, as imagefolder loads it
}
TRAIN_IMAGES, EVAL_IMAGES = 8, 4


def _load(text: str):
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml when installed


def _script():
    spec = importlib.util.spec_from_file_location("make_controls", ROOT / "scripts" / "make_controls.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


make_controls = _script()
HAND_WRITTEN = make_controls.hand_written()


def _write_stand_in(folder: Path, schema) -> None:
    """A DatasetDict with the schema of a real dataset and a few random images per split."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    image_column, label_column, classes, splits, (width, height) = schema
    features = {image_column: Image(), label_column: ClassLabel(names=[f"class{i}" for i in range(classes)])}
    if label_column == "fine_label":  # CIFAR-100 has both label columns
        features["coarse_label"] = ClassLabel(names=[f"super{i}" for i in range(20)])
    rng = np.random.default_rng(0)
    parts = {}
    for split, n in zip(splits, (TRAIN_IMAGES, EVAL_IMAGES)):
        columns = {image_column: [PILImage.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
                                  for _ in range(n)],
                   label_column: [int(c) for c in rng.integers(0, classes, n)]}
        if "coarse_label" in features:
            columns["coarse_label"] = [c % 20 for c in columns[label_column]]
        parts[split] = Dataset.from_dict(columns, features=Features(features))
    DatasetDict(parts).save_to_disk(str(folder))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding the stand-in datasets and every teacher folder a recipe names (the two files that
    make a folder a model folder; a teacher is loaded only when training starts)."""
    folder = tmp_path_factory.mktemp("recipes")
    for name, schema in STAND_INS.items():
        _write_stand_in(folder / name.replace("/", "_"), schema)
    for path in RECIPES:
        for teacher in _load(path.read_text()).get("teacher_models") or []:
            (folder / teacher).mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "model.safetensors"):
                (folder / teacher / name).touch()
    return folder


def _overrides(path: Path, workdir: Path) -> list[str]:
    """The recipe's data pointed at its stand-in (the Hub and ImageNet are not reachable in tests)."""
    dataset = _load(path.read_text()).get("dataset_name")
    out = ["--output_dir", str(workdir / "out" / path.stem), "--max_train_samples", str(TRAIN_IMAGES),
           "--max_eval_samples", str(EVAL_IMAGES)]
    if dataset in STAND_INS:
        out = ["--dataset_name", str(workdir / dataset.replace("/", "_")), *out]
    if dataset == "imagefolder":
        out += ["--data_dir", "null"]
    return out


@contextlib.contextmanager
def _inside(folder: Path):
    """Run from `folder`: the teacher folders a recipe names are relative to where a run starts."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)


@functools.lru_cache(maxsize=None)
def _parsed(path: Path, workdir: Path):
    """(data_args, config) of a recipe, its data pointed at the stand-in."""
    with _inside(workdir):
        return parse_recipe(path, _overrides(path, workdir))


# what build_run reads: recipes that agree on these build the same population and datasets
_BUILD_FIELDS = ("student_model", "student_model_kwargs", "num_students", "seed", "data_seed", "shared_init",
                 "student_pretrained", "data_order", "member_execution", "teacher_models", "extra_metrics")


def _build(path: Path, workdir: Path):
    data_args, config = _parsed(path, workdir)
    with _inside(workdir):
        return build_run(config, data_args)


_BUILT: dict[str, dict] = {}


def _built(path: Path, workdir: Path) -> dict:
    """What a recipe builds, in numbers; recipes that agree on what build_run reads share one build (only
    the numbers are kept: the populations would hold gigabytes)."""
    data_args, config = _parsed(path, workdir)
    key = json.dumps([dataclasses.asdict(data_args), [getattr(config, f) for f in _BUILD_FIELDS]], default=str)
    if key not in _BUILT:
        parts = _build(path, workdir)
        _BUILT[key] = {
            "members": parts.population.num_members,
            "classes": [m.num_classes for m in parts.population.members],
            "input_size": tuple(parts.population.spec.data_config["input_size"]),
            "train": len(parts.train_dataset), "eval": len(parts.eval_dataset),
            "train_item": tuple(parts.train_dataset[0]["pixel_values"].shape),
            "eval_item": tuple(parts.eval_dataset[0]["pixel_values"].shape),
        }
    return _BUILT[key]


def _recipe_ids(paths):
    return [str(p.relative_to(ROOT / "recipes").with_suffix("")) for p in paths]


def _uses_wrn(path: Path) -> bool:
    return _load(path.read_text()).get("student_model") == "cifar_wrn28_10"


CLASSIFICATION = [p for p in RECIPES if p not in REID]
RECIPE_PARAMS = [
    pytest.param(p, marks=pytest.mark.skipif(WRN_MISSING and _uses_wrn(p), reason="cifar_wrn28_10 not registered"))
    for p in CLASSIFICATION
]


def test_the_recipe_set_is_complete():
    names = {str(p.relative_to(ROOT / "recipes").with_suffix("")) for p in RECIPES}
    for ds in ("cifar10", "cifar100"):
        for arch in ("resnet32", "resnet56", "resnet110", "mobilenetv2"):
            assert {f"{ds}_{arch}_baseline", f"{ds}_{arch}_grafting", f"{ds}_{arch}_l1_slr",
                    f"{ds}_{arch}_entropy_slr"} <= names  # Tables 3 and 4
        assert {f"{ds}_wrn28_10_baseline", f"{ds}_wrn28_10_grafting"} <= names  # Table 4
        assert {f"{ds}_mobilenetv2_grafting_k{k}" for k in (3, 4, 6, 8)} <= names  # Table 5
        assert {f"{ds}_mobilenetv2_noise", f"{ds}_mobilenetv2_internal", f"{ds}_resnet56_distillation"} <= names
    assert {"quickstart"} | {f"imagenet_r{d}{b}" for d in (18, 34, 50) for b in ("", "_baseline")} <= names
    assert {"cifar100_resnet32_distillation", "cifar100_mobilenetv2_distillation",
            "cifar10_graftingplus_resnet56_t1s2"} <= names  # Tables 9 and 10
    assert {f"cifar100_graftingplus_mobilenetv2_t{t}s{s}" for t, s in ((1, 2), (1, 4), (1, 6), (2, 2), (3, 2))} <= names
    # every table with numbers is reproduced, but Table 7 (person re-identification, not in recipes/)
    tables = {int(row["table"]) for recipe in HAND_WRITTEN for row in recipe.rows}
    assert tables == {2, 3, 4, 5, 6, 8, 9, 10, 11}
    accelerate = {p.name for p in (ROOT / "recipes" / "accelerate").glob("*.yaml")}
    assert {"1node_8gpu_bf16.yaml", "2node_8gpu_bf16.yaml"} <= accelerate
    for path in (ROOT / "recipes" / "accelerate").glob("*.yaml"):
        cfg = _load(path.read_text())
        assert cfg["mixed_precision"] == "bf16" and cfg["num_processes"] == 8 * cfg["num_machines"]


def test_the_controls_and_the_index_are_what_the_script_writes():
    """`python scripts/make_controls.py --check`: no control or index line is stale, missing or orphaned."""
    assert make_controls.stale(make_controls.render()) == []


def test_every_published_row_is_read_from_the_first_lines():
    rows = {(int(r["table"]), r["row"]): r["number"] for recipe in HAND_WRITTEN for r in recipe.rows}
    assert rows[4, "CIFAR-10 ResNet-56, filter grafting (2 networks)"] == "94.73 top-1"
    assert rows[2, "CIFAR-100 MobileNetV2, noise as scions"] == "72.34 top-1"
    assert rows[6, "ImageNet ResNet-50, baseline"] == "75.92 top-1, 92.81 top-5"
    assert rows[9, "CIFAR-100 MobileNetV2 student, ResNet-110 teacher, grafting+"] == "75.55 +- 0.03 top-1"
    assert rows[11, "CIFAR-100, teacher*3, student*2"] == "76.44 +- 0.29 top-1"
    # the paper's tables, row for row: Table 4 without its two other methods, Table 5 without its ensemble
    # (the ensemble of a control), Table 10 its accuracies
    per_table = {}
    for table, _ in rows:
        per_table[table] = per_table.get(table, 0) + 1
    assert per_table == {2: 8, 3: 24, 4: 20, 5: 12, 6: 6, 8: 6, 9: 12, 10: 4, 11: 5}


@pytest.mark.parametrize("recipe", RECIPE_PARAMS, ids=_recipe_ids(CLASSIFICATION))
def test_every_recipe_parses_names_its_row_and_builds_offline(recipe, workdir):
    data_args, config = _parsed(recipe, workdir)
    text = recipe.read_text()
    content = _load(text)
    # every key of the file reached the dataclasses (but those pointing the data at the stand-in)
    overridden = {name.removeprefix("--") for name in _overrides(recipe, workdir) if name.startswith("--")}
    for key, value in content.items():
        if key in overridden:
            continue
        target = data_args if hasattr(data_args, key) else config
        got = getattr(target, key)
        if key == "lr_spread":
            assert got == ([value] if isinstance(value, str) else [str(v) for v in value])
            continue
        if key in ("eval_strategy", "save_strategy", "lr_scheduler_type", "optim", "report_to"):
            got = [getattr(g, "value", g) for g in got] if isinstance(got, list) else getattr(got, "value", got)
            value = [value] if key == "report_to" and not isinstance(value, list) else value
        if key == "select_student":
            value = str(value)
        assert got == value, (recipe.name, key, got, value)
    assert config.push_to_hub is False

    first = text.splitlines()[0]
    if recipe.stem == "quickstart":
        assert first.startswith("# Quickstart:")
    else:
        assert FIRST_LINE.match(first), first
        # a reproduction reports the first network, trained with the paper's SGD (every parameter decayed)
        assert config.select_student == "0" and config.weight_decay_scope == "all"
    if recipe.stem.endswith("_baseline"):
        assert config.num_students == 1 and not config.grafting_enabled
        assert config.lr_decay_epochs == ([30, 60] if recipe.stem.startswith("imagenet") else [60, 120, 180])
    if recipe.parent.name == "recipes" and re.search(r"_grafting(_k\d)?$|^imagenet_r\d+$", recipe.stem):
        assert config.graft_source == "external" and config.lr_multipliers == cosine_lr_multipliers(config.num_students)
    if recipe.stem.endswith("_slr"):  # Table 3: one learning rate, the baseline's step decay
        assert config.lr_multipliers == [1.0, 1.0] and config.lr_decay_epochs == [60, 120, 180]
        assert config.graft_criterion == recipe.stem.split("_")[-2]
    if "graftingplus" in recipe.stem:
        t, s = re.search(r"_t(\d)s(\d)", recipe.stem).groups()
        assert len(config.teacher_models) == int(t)
        assert config.num_students == (1 if recipe.stem.endswith("_single") else int(s))
        assert config.kd_settings()["kd_temperature"] == 2.0 and config.kd_weight == 1.0 == config.ce_weight
    if recipe.stem.endswith("_distillation"):
        assert config.num_students == 1 and config.graft_source == "none" and len(config.teacher_models) == 1
    if recipe.stem.startswith("cifar100"):
        assert data_args.label_column == "fine_label"

    # the population and its datasets, built offline on the stand-in without training
    built = _built(recipe, workdir)
    size, k = data_args.input_size, config.num_students
    classes = STAND_INS[content["dataset_name"]][2] if content["dataset_name"] in STAND_INS else 10
    per_member = k > 1 and config.data_order == "independent"  # one image per member in every item
    assert built == {
        "members": k, "classes": [classes] * k, "input_size": (3, size, size),
        "train": TRAIN_IMAGES, "eval": EVAL_IMAGES,
        "train_item": (k, 3, size, size) if per_member else (3, size, size), "eval_item": (3, size, size),
    }


def _pairs():
    controls, _ = make_controls.plan(HAND_WRITTEN)
    out = []
    for entry in controls:
        for kind, name in entry.names.items():
            source = ROOT / "recipes" / f"{entry.source.name}.yaml"
            marks = pytest.mark.skipif(WRN_MISSING and _uses_wrn(source), reason="cifar_wrn28_10 not registered")
            out.append(pytest.param(source, kind, ROOT / "recipes" / name, marks=marks,
                                    id=f"{entry.source.name}-{kind}"))
    return out


def _settings(data_args, config) -> dict:
    out = {k: getattr(v, "value", v) for k, v in config.to_dict().items()}
    out.update(dataclasses.asdict(data_args))
    return out


@pytest.mark.parametrize("source, kind, control", _pairs())
def test_a_control_differs_from_its_recipe_by_the_graft_alone(source, kind, control, workdir):
    src, ctl = _parsed(source, workdir)[1], _parsed(control, workdir)[1]
    a, b = _settings(*_parsed(source, workdir)), _settings(*_parsed(control, workdir))
    allowed = {"output_dir", "logging_dir", "run_name", "graft_source", "bn_recalibration_batches"}
    allowed |= {k for k in a if k.startswith("graft_")}
    if kind == "single":  # one network: K, member 0's rate, nothing to spread or fuse
        allowed |= {"num_students", "learning_rate", "lr_spread", "member_execution"}
    assert {k: (a[k], b.get(k)) for k in a if k not in allowed and a[k] != b.get(k)} == {}
    assert src.grafting_enabled and ctl.graft_source == "none" and not ctl.grafting_enabled
    if kind == "independent":
        assert ctl.num_students == src.num_students and ctl.lr_multipliers == src.lr_multipliers
    else:
        assert ctl.num_students == 1 and ctl.lr_multipliers == [1.0]
        assert ctl.learning_rate == pytest.approx(src.learning_rate * src.lr_multipliers[0], rel=1e-12)


@pytest.mark.parametrize("name", ["cifar10_resnet32_grafting", "cifar100_mobilenetv2_grafting_k3"])
def test_member_zero_is_one_network_in_a_recipe_and_its_controls(name, workdir):
    """The grafting run's member 0, its `_independent` control's member 0 and its `_single` control's one
    network start from the same weights and read the same augmented images in the same order."""
    runs = {kind: _build(ROOT / "recipes" / path, workdir) for kind, path in
            [("grafting", f"{name}.yaml"), ("independent", f"controls/{name}_independent.yaml"),
             ("single", f"controls/{name}_single.yaml")]}
    grafting, independent, single = runs["grafting"], runs["independent"], runs["single"]
    assert single.population.num_members == 1 < grafting.population.num_members == independent.population.num_members
    for k, member in enumerate(grafting.population.members):  # the independent run: every member the same
        others = [independent.population.members[k]] + ([single.population.members[0]] if k == 0 else [])
        for other in others:
            theirs = other.state_dict()
            assert all(torch.equal(v, theirs[key]) for key, v in member.state_dict().items())
    # member 1 is another network: no control starts every member from one initialisation
    first_weight = [next(iter(m.parameters())) for m in independent.population.members[:2]]
    assert not torch.equal(*first_weight)
    n = TRAIN_IMAGES
    for index in (0, 3, n + 2, 5 * n + 7):  # epoch-tagged indices, as the sampler yields them
        ours, theirs, alone = grafting.train_dataset[index], independent.train_dataset[index], single.train_dataset[index]
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"]) and torch.equal(ours["labels"], theirs["labels"])
        assert torch.equal(ours["pixel_values"][0], alone["pixel_values"])
        assert int(ours["labels"][0]) == int(alone["labels"])
    # and the augmentation does change between epochs, so the comparison above sees it
    assert not torch.equal(single.train_dataset[0]["pixel_values"], single.train_dataset[n]["pixel_values"])
