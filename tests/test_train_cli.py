"""The training entry point: recipes, overrides, early errors, and one end-to-end CLI run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import hf_graft  # noqa: F401
from hf_graft.cli.train import RecipeError, main, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _parse_in(tmp_path: Path, recipe: Path, *overrides: str):
    """Parse a recipe from inside tmp_path, where the teacher folders it names are created (with the
    two files that make a folder a model folder; their content is read only when training starts)."""
    content = yaml.safe_load(recipe.read_text())
    for folder in content.get("teacher_models") or []:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            (tmp_path / folder / name).touch()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        return parse_recipe(recipe, list(overrides))
    finally:
        os.chdir(cwd)


def test_overrides_win_over_the_recipe(tmp_path):
    data_args, config = _parse_in(
        tmp_path, ROOT / "recipes/quickstart.yaml", "--num_students", "3", "--output_dir", "out/q3",
        "--lr_spread", "cosine", "--max_train_samples", "64",
    )
    assert config.num_students == 3 and config.output_dir == "out/q3" and data_args.max_train_samples == 64
    assert config.lr_multipliers == pytest.approx([0.25, 0.75, 1.0])


def test_unknown_recipe_key_fails_before_any_work(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("student_model: cifar_resnet20\nnum_studnets: 3\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: unknown key\(s\) 'num_studnets'.*; did you mean "
                                          r"'num_students' for 'num_studnets'\?$"):
        parse_recipe(recipe)
    with pytest.raises(RecipeError, match="unknown option --graft_sorce"):
        parse_recipe(None, ["--graft_sorce", "noise"])


def test_recipe_syntax_errors_and_repeated_keys_name_the_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("student_model: cifar_resnet20\nnum_students: 2\nlearning_rate: 0.1\nnum_students: 3\n")
    with pytest.raises(RecipeError) as err:  # YAML itself keeps the last value without a word
        parse_recipe(recipe)
    assert str(err.value) == f"{recipe}: not valid YAML at line 4, column 1 ('num_students' is given twice)"
    recipe.write_text("student_model: cifar_resnet20\nlr_spread: [1.0, 2.0\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: not valid YAML at line 3, column 1 \(expected ',' or ']'"):
        parse_recipe(recipe)


def test_a_wrong_boolean_on_the_command_line_is_said_as_in_a_recipe(tmp_path):
    with pytest.raises(RecipeError) as err:
        parse_recipe(ROOT / "recipes/quickstart.yaml", ["--torch_compile_dynamic", "none"])
    assert str(err.value) == "command line: --torch_compile_dynamic: got 'none'; allowed: true, false or null"
    with pytest.raises(RecipeError) as err:
        parse_recipe(ROOT / "recipes/quickstart.yaml", ["--export-student", "maybe"])
    assert str(err.value) == "command line: --export_student: got 'maybe'; allowed: true or false"


def test_null_on_the_command_line_means_null_as_in_a_recipe(tmp_path):
    """`--field null` sets a field that may be null to null, over the recipe's value, as `field: null`
    does in the YAML; argparse alone would refuse the word for a boolean field."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'o'}\ncudnn_benchmark: false\nchannels_last: true\nmax_train_samples: 64\n")
    data_args, config = parse_recipe(recipe)
    assert (config.cudnn_benchmark, config.channels_last, config.torch_compile_dynamic) == (False, True, False)
    assert data_args.max_train_samples == 64
    data_args, config = parse_recipe(recipe, ["--cudnn_benchmark", "null", "--channels_last=NULL",
                                              "--torch-compile-dynamic", "null", "--max_train_samples", "null"])
    assert (config.cudnn_benchmark, config.channels_last, config.torch_compile_dynamic) == (None, None, None)
    assert data_args.max_train_samples is None
    _, config = parse_recipe(recipe, ["--torch_compile_dynamic"])  # a bare boolean flag still means true
    assert config.torch_compile_dynamic is True
    _, config = parse_recipe(recipe, ["--cudnn_benchmark", "--channels_last", "false"])  # true / false / null too
    assert (config.cudnn_benchmark, config.channels_last) == (True, False)
    _, config = parse_recipe(recipe, ["--channels_last"])
    assert config.channels_last is True
    with pytest.raises(RecipeError, match="^command line: argument --num_students"):  # not a field that may be null
        parse_recipe(recipe, ["--num_students", "null"])


def test_a_refused_value_names_where_it_was_written(tmp_path):
    """A value of the right type that a field refuses names the recipe file when the file set it, the
    command line when an override did, and both when the error names no single field."""
    recipe = tmp_path / "wide.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'o'}\nmember_execution: wide\n")
    with pytest.raises(RecipeError) as err:
        parse_recipe(recipe)
    assert str(err.value) == f"{recipe}: GraftingConfig.member_execution: got 'wide'; allowed: loop, fused"
    with pytest.raises(RecipeError) as err:  # the override is the refused value, not the file's
        parse_recipe(recipe, ["--member_execution", "fused", "--num_students", "0"])
    assert str(err.value).startswith("command line: GraftingConfig.num_students: got 0")
    with pytest.raises(RecipeError) as err:  # TrainingArguments' own check names no field
        parse_recipe(ROOT / "recipes/quickstart.yaml", ["--fp16", "true", "--bf16", "true"])
    assert str(err.value).startswith(f"{ROOT / 'recipes/quickstart.yaml'} with the command line: ")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--graft_source", "bogus"], "GraftingConfig.graft_source: got 'bogus'; allowed: external, noise, internal, none"),
        (["--num_students", "0"], "GraftingConfig.num_students: got 0"),
        (["--lr_spread", "1.0", "2.0", "3.0"], "GraftingConfig.lr_spread"),
        (["--select_student", "5"], "GraftingConfig.select_student: got '5'; allowed: best, or a member index 0..1"),
        (["--student_model", "resnet_does_not_exist"], "GraftingConfig.student_model: got 'resnet_does_not_exist'"),
        (["--teacher_models", "out/missing/student"], "GraftingConfig.teacher_models: got 'out/missing/student'"),
        (["--kd_temperature", "0"], "GraftingConfig.kd_temperature: got 0.0; allowed: a number > 0"),
        (["--lr_decay_epochs", "-3"], "GraftingConfig.lr_decay_epochs"),
        (["--train_augmentation", "mixup"], "DataArguments.train_augmentation: got 'mixup'"),
        # torch.compile's settings: refused here, not when the Trainer starts or the first step compiles
        (["--torch_compile_backend", "nonsense"], "GraftingConfig.torch_compile_backend: got 'nonsense'; allowed: eager"),
        (["--torch_compile", "true", "--torch_compile_mode", "bogus"],
         "GraftingConfig.torch_compile_mode: got 'bogus'; allowed: default"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_field(overrides, message, tmp_path, capsys):
    recipe = ROOT / "recipes/quickstart.yaml"
    with pytest.raises(ValueError) as err:
        parse_recipe(recipe, ["--output_dir", str(tmp_path / "o"), *overrides])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("command line: ")  # where the refused value was written
    # the CLI prints it as one line and exits 2
    assert main([str(recipe), "--output_dir", str(tmp_path / "o"), *overrides]) == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-graft train:")]
    assert len(err_lines) == 1 and message.split(":")[0] in err_lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ('num_students: "two"\n', "bad.yaml: num_students: got 'two'; allowed: an integer"),
        ("num_students: 2.5\n", "bad.yaml: num_students: got 2.5; allowed: an integer"),
        ("num_students:\n", "bad.yaml: num_students: got null (a blank value); allowed: an integer"),
        ("num_students: null\n", "bad.yaml: num_students: got null (a blank value); allowed: an integer"),
        ("output_dir:\n", "bad.yaml: output_dir: got null (a blank value); allowed: a string"),
        ("use_cpu: maybe\n", "bad.yaml: use_cpu: got 'maybe'; allowed: true or false"),
        ("channels_last: auto\n", "bad.yaml: channels_last: got 'auto'; allowed: true, false or null"),
        ("filter_thresholds: [0.1, low]\n",
         "bad.yaml: filter_thresholds: got [0.1, 'low']; allowed: a list of numbers"),
        ("student_model_kwargs: [1, 2]\n", "bad.yaml: student_model_kwargs: got [1, 2]; allowed: a mapping or a string"),
        ("", "bad.yaml: empty recipe; a recipe is a flat mapping of field: value"),
        ("# only a comment\n", "bad.yaml: empty recipe"),
        ("- num_students\n", "bad.yaml: a recipe is a flat mapping of field: value"),
    ],
)
def test_a_wrong_type_or_missing_value_is_one_line_naming_the_key(tmp_path, capsys, content, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(content)
    with pytest.raises(RecipeError) as err:
        parse_recipe(recipe)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert main([str(recipe), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "usage" not in err  # no argparse usage dump
    assert not (tmp_path / "o").exists()


def test_command_line_type_errors_are_one_line(tmp_path, capsys):
    expected = r"^command line: argument --num_students(/--num-students)?: invalid int value: 'two'"
    with pytest.raises(RecipeError, match=expected):
        parse_recipe(ROOT / "recipes/quickstart.yaml", ["--num_students", "two"])
    assert main([str(ROOT / "recipes/quickstart.yaml"), "--num_students", "two"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num_students" in err and "'two'" in err


def test_recipe_values_are_read_like_the_command_line(tmp_path):
    """YAML leaves 1e-3 a string and the command line reads it as a number; null keeps a field's
    meaning where it has one (save_total_limit: keep every checkpoint)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1e-3\nnum_train_epochs: 2\nsave_total_limit: null\nlr_spread: cosine\n"
                      "student_model_kwargs: {drop_rate: 0.1}\nuse_cpu: true\noutput_dir: out/x\n")
    data_args, config = parse_recipe(recipe, ["--num_students", "3"])
    assert config.learning_rate == 1e-3 and config.num_train_epochs == 2.0 and config.save_total_limit is None
    assert config.lr_spread == ["cosine"] and config.num_students == 3
    assert config.student_model_kwargs == {"drop_rate": 0.1} and config.output_dir == "out/x"
    _, again = parse_recipe(recipe, ["--learning_rate", "0.5"])
    assert again.learning_rate == 0.5  # the command line wins


def test_missing_dataset_fails_before_training_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    code = main([str(ROOT / "recipes/quickstart.yaml"), "--dataset_name", str(tmp_path / "nowhere"), "--output_dir", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hf-graft train: DataArguments.dataset_name:") and "nowhere" in err
    assert not out.exists()


def test_step_decay_schedule_keeps_member_rates(tmp_path):
    from hf_graft.config import GraftingConfig
    from hf_graft.population.students import PopulationSpec, StudentPopulation
    from hf_graft.training.trainer import GraftingTrainer

    config = GraftingConfig(
        output_dir=str(tmp_path), num_students=2, lr_spread=["cosine"], learning_rate=0.1, num_train_epochs=3,
        lr_decay_epochs=[1, 2], lr_decay_gamma=0.1, use_cpu=True, report_to="none", eval_strategy="no",
    )
    spec = PopulationSpec("cifar_resnet20", num_students=2, num_classes=10)
    trainer = GraftingTrainer(model=StudentPopulation.from_spec(spec, seed=0), args=config)
    trainer.create_optimizer_and_scheduler(num_training_steps=30)  # 10 steps per epoch
    rates = []
    for step in range(30):
        rates.append(sorted({(g["member"], round(g["lr"], 10)) for g in trainer.optimizer.param_groups}))
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert rates[0] == [(0, 0.05), (1, 0.1)]
    assert rates[9] == [(0, 0.05), (1, 0.1)]
    assert rates[10] == [(0, 0.005), (1, 0.01)]
    assert rates[20] == [(0, 0.0005), (1, 0.001)] and rates[29] == rates[20]


@pytest.mark.slow
def test_quickstart_end_to_end_from_the_console_script(tmp_path):
    """`hf-graft train recipes/quickstart.yaml` reaches >= 90% top-1 and leaves a student that timm,
    transformers and the pipeline load with the same logits and the dataset's label names."""
    out = tmp_path / "quick"
    exe = Path(sys.executable).with_name("hf-graft")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "hf_graft.cli.main"]
    proc = subprocess.run(
        [*cmd, "train", str(ROOT / "recipes/quickstart.yaml"), "--output_dir", str(out)],
        env=ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    for k in (0, 1):
        assert 0 <= results[f"eval_member{k}_top1"] <= 100 and f"eval_member{k}_top5" in results
        assert set(results["filters"][f"member{k}"]) == {"invalid_ratio@0.01", "invalid_ratio@0.1", "total_entropy"}
    selected = results["selected_member"]
    assert results["eval_top1"] == results[f"eval_member{selected}_top1"] == max(
        results["eval_member0_top1"], results["eval_member1_top1"])
    assert results["eval_top1"] >= 90.0, results
    assert "eval_ensemble_top1" in results and results["grafting"]["num_students"] == 2
    # grafted after epochs 1..5, never after the last one; filter health logged at each graft and evaluation
    state = json.loads((out / "trainer_state.json").read_text())
    grafts = [entry for entry in state["log_history"] if "graft/count" in entry]
    assert [e["graft/count"] for e in grafts] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert all("graft/member1_invalid_ratio@0.1" in e and "graft/member0_alpha_mean" in e for e in grafts)
    # one evaluation per epoch: the last one is also the run's final evaluation
    evals = [e for e in state["log_history"] if "eval_member0_top1" in e]
    assert len(evals) == 6 and all("eval_member0_total_entropy" in e for e in evals)
    assert results["eval_member0_top1"] == evals[-1]["eval_member0_top1"]
    # the run ends with where the student is, which member and why, the top-1s and the wall time
    closing = [line.split(" hf_graft.training.trainer: ", 1)[1] for line in proc.stderr.splitlines()
               if " hf_graft.training.trainer: " in line]
    assert closing[0] == f"student: member {selected}, written to {out / 'student'}"
    assert closing[1].startswith(f"selected because member {selected} has the highest eval top1")
    assert closing[2].startswith("eval top-1 (%): member 0 ") and closing[3].startswith("wall time: ")
    assert proc.stderr.rstrip().splitlines()[-1].endswith(closing[3])
    assert ".tmp-" not in proc.stderr + proc.stdout

    # the exported student: timm, transformers, pipeline agree
    import timm
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline

    from hf_graft.data.loading import load_builtin_digits

    student = out / "student"
    assert sorted(p.name for p in student.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    timm_model = timm.create_model(f"local-dir:{student}", pretrained=True).eval()
    hf_model = AutoModelForImageClassification.from_pretrained(student).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        a = timm_model(x)
        b = hf_model(pixel_values=x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert hf_model.config.id2label[3] == "3"

    digits = load_builtin_digits(seed=0)["test"]
    image = digits[0]["image"]
    label = digits.features["label"].int2str(digits[0]["label"])
    classifier = pipeline("image-classification", model=str(student), device="cpu")
    top = classifier(image.convert("RGB") if isinstance(image, Image.Image) else image, top_k=3)
    assert all(p["label"] in [str(d) for d in range(10)] for p in top)
    assert top[0]["label"] == label
    card = (student / "README.md").read_text()
    assert "member 0" in card.lower() or "| 0 |" in card
    assert "filter-grafting" in card and "library_name: timm" in card


def test_push_failure_keeps_the_student_and_hides_the_token(tmp_path):
    """An unreachable Hub: the local student is complete, one line names the repo, exit status 1."""
    out = tmp_path / "run"
    secret = "hf_NotARealTokenButSecret123"
    proc = subprocess.run(
        [sys.executable, "-m", "hf_graft.train", str(ROOT / "recipes/quickstart.yaml"), "--output_dir", str(out),
         "--max_train_samples", "64", "--max_eval_samples", "32", "--num_train_epochs", "1",
         "--push_to_hub", "true", "--hub_model_id", "someone/grafted-digits", "--hub_token", secret],
        env={**ENV, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hf-graft train:") and "someone/grafted-digits" in last
    assert secret not in proc.stdout + proc.stderr
    student = out / "student"
    assert sorted(p.name for p in student.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for path in (out / "all_results.json", student / "README.md", student / "config.json"):
        assert secret not in path.read_text()
    # nothing of the population was meant for the Hub: the Trainer's own push stayed off
    assert json.loads((out / "all_results.json").read_text())["selected_member"] in (0, 1)
