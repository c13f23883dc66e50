"""One command-line convention: every subcommand takes `--field_name` and `--field-name` (HfArgumentParser
over a dataclass, as `train`), its input with or without its flag, and refuses a bad argument in one line;
`train --config RECIPE` (TRL's spelling); `hf-graft env`; `analyze --plot` without matplotlib."""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch
import transformers

import hf_graft  # noqa: F401  (registers the cifar_* architectures)
from hf_graft.cli import analyze, evaluate, export
from hf_graft.cli.arguments import ArgumentsError, parse_arguments
from hf_graft.cli.main import main as cli_main
from hf_graft.cli.recipe import parse_recipe, recipe_argument
from hf_graft.export.student_folder import save_student

from _cli_run import QUICKSTART, TINY, error_lines

DATA_CONFIG = {"input_size": [3, 16, 16], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3,
               "crop_pct": 1.0, "crop_mode": "center"}


def _dashed(argv: list[str]) -> list[str]:
    """`--a_b` as `--a-b` (values unchanged)."""
    return [token.replace("_", "-") if token.startswith("--") else token for token in argv]


# ----------------------------------------------------------------------------- both spellings, every subcommand
SPELLED = {
    "export": (export, "checkpoint_dir", [
        "ckpt", "--member", "1", "--out", "o", "--overwrite", "--push_to_hub", "me/m", "--hub_token", "t",
        "--hub_private_repo", "--member_metrics", "m.json"],
        {"checkpoint_dir": "ckpt", "member": 1, "out": "o", "overwrite": True, "push_to_hub": "me/m",
         "hub_token": "t", "hub_private_repo": True, "member_metrics": "m.json"}),
    "evaluate": (evaluate, "model", [
        "m", "--dataset_name", "builtin:digits", "--dataset_config_name", "c", "--data_dir", "d", "--split", "s",
        "--image_column", "img", "--label_column", "lab", "--extra_metrics", "f1", "./mine", "--extra_metric_kwargs",
        "{}", "--json", "r.json", "--batch_size", "8", "--max_samples", "4", "--num_workers", "0", "--seed", "3",
        "--no_progress"],
        {"model": "m", "dataset_name": "builtin:digits", "dataset_config_name": "c", "data_dir": "d", "split": "s",
         "image_column": "img", "label_column": "lab", "extra_metrics": ["f1", "./mine"], "extra_metric_kwargs": "{}",
         "json": "r.json", "batch_size": 8, "max_samples": 4, "num_workers": 0, "seed": 3, "progress": False}),
    "analyze": (analyze, "paths", [
        "a", "b", "--reference", "r", "--thresholds", "0.1", "1", "--bins", "4", "--json", "x.json", "--plot",
        "x.png", "--pretrained"],
        {"paths": ["a", "b"], "reference": "r", "thresholds": [0.1, 1.0], "bins": 4, "json": "x.json",
         "plot": "x.png", "pretrained": True}),
}


ARGUMENTS = {"export": export.ExportArguments, "evaluate": evaluate.EvaluateArguments,
             "analyze": analyze.AnalyzeArguments}


@pytest.mark.parametrize("command", sorted(SPELLED))
def test_every_flag_in_both_spellings(command):
    module, positional, argv, expected = SPELLED[command]
    parsed = {}
    for name, tokens in {"underscores": argv, "dashes": _dashed(argv)}.items():
        args, debug = parse_arguments(module.build_parser(), ARGUMENTS[command], tokens, positional=positional)
        assert not debug
        parsed[name] = args
        for field, value in expected.items():
            assert getattr(args, field) == value, (name, field)
    assert parsed["underscores"] == parsed["dashes"]
    # the input may also be given with its flag, before or after the others
    flagged = [f"--{positional}", *([argv[0]] if positional != "paths" else argv[:2])]
    rest = argv[1:] if positional != "paths" else argv[2:]
    args, _ = parse_arguments(module.build_parser(), ARGUMENTS[command], [*rest, *flagged], positional=positional)
    assert args == parsed["underscores"]


@pytest.mark.parametrize("command", sorted(SPELLED))
def test_bad_arguments_are_one_line(command):
    module, positional, argv, _ = SPELLED[command]
    for tokens, expected in [([*argv, "--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
                             ([token for token in argv[2 if positional == "paths" else 1:]],
                              "the following arguments are required: "),
                             ([*argv, f"--{positional}", "again"], "is given twice")]:
        with pytest.raises(ArgumentsError) as caught:
            parse_arguments(module.build_parser(), ARGUMENTS[command], tokens, positional=positional)
        assert expected in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch_size: got 0; allowed: a positive integer"),
    (["--num-workers", "-1"], "--num_workers: got -1; allowed: an integer >= 0"),
    (["--batch_size", "two"], "argument --batch_size/--batch-size: invalid int value: 'two'"),
])
def test_evaluate_refuses_bad_values_before_loading(argv, message, capsys):
    assert evaluate.main(["no_such_model_anywhere", "--dataset-name", "builtin:digits", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hf-graft evaluate: error: ") and message in err, err


def test_evaluate_end_to_end_in_both_spellings(tmp_path, capsys):
    """The same model, data and settings, spelled both ways: the same results (and --dataset-name is taken)."""
    torch.manual_seed(0)
    folder = save_student(timm.create_model("cifar_resnet20", num_classes=10).eval(), tmp_path / "student",
                          architecture="cifar_resnet20", data_config=DATA_CONFIG)
    results = {}
    for name, argv in {"underscores": ["--dataset_name", "builtin:digits", "--max_samples", "16", "--batch_size", "8",
                                       "--num_workers", "0", "--no_progress"],
                       "dashes": ["--dataset-name", "builtin:digits", "--max-samples", "16", "--batch-size", "8",
                                  "--num-workers", "0", "--no-progress"]}.items():
        out = tmp_path / f"{name}.json"
        assert cli_main(["evaluate", str(folder), *argv, "--json", str(out)]) == 0, capsys.readouterr().err
        results[name] = json.loads(out.read_text())
    assert results["underscores"] == results["dashes"]
    assert results["dashes"]["num_examples"] == 16 and 0.0 <= results["dashes"]["top1"] <= 100.0


# ----------------------------------------------------------------------------- train --config
def test_train_config_flag_reads_the_recipe_as_the_positional_does():
    positional = parse_recipe(*recipe_argument([str(QUICKSTART), "--seed", "3"]))
    for argv in (["--config", str(QUICKSTART), "--seed", "3"], ["--seed", "3", f"--config={QUICKSTART}"]):
        recipe, rest = recipe_argument(argv)
        assert recipe == str(QUICKSTART) and rest == ["--seed", "3"]
        data_args, config = parse_recipe(recipe, rest)
        assert data_args == positional[0]
        assert config.to_dict() == positional[1].to_dict() and config.seed == 3


def test_train_with_config_runs_the_quickstart(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", "--config", str(QUICKSTART), "--output_dir", str(out), *TINY]) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert (out / "student" / "model.safetensors").is_file() and "eval_ensemble_top1" in json.dumps(results)


@pytest.mark.parametrize("argv, message", [
    ([str(QUICKSTART), "--config", str(QUICKSTART)], "the recipe is given twice"),
    (["--config"], "--config: expected a recipe file"),
    (["--config", "no_such_recipe.yaml"], "no_such_recipe.yaml: recipe file not found"),
])
def test_train_config_refusals_are_one_line(argv, message, tmp_path, capsys):
    from hf_graft.cli.train import main as train_main

    out = tmp_path / "run"
    assert train_main([*argv, "--output_dir", str(out)] if argv != ["--config"] else argv) == 2
    (line,) = error_lines(capsys)
    assert message in line
    assert not out.exists()


# ----------------------------------------------------------------------------- env
def test_env_prints_what_a_bug_report_needs(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli_main(["env"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("- ")]
    values = dict(line[2:].split(": ", 1) for line in lines)
    assert len(values) == len(lines)  # one `- name: value` per line, each name once
    assert list(values)[:3] == ["hf_graft", "Python", "Platform"]
    assert {"torch", "torch CUDA", "torch cuDNN", "GPU", "timm", "transformers", "accelerate", "datasets",
            "huggingface_hub", "safetensors", "evaluate", "numpy", "HF_HUB_OFFLINE"} <= set(values)
    assert values["hf_graft"] == hf_graft.__version__ and values["torch"] == torch.__version__
    assert values["transformers"] == transformers.__version__ and values["timm"] == timm.__version__
    assert values["Python"] == ".".join(map(str, sys.version_info[:3]))
    assert values["HF_HUB_OFFLINE"] == "set (1)"
    expected_gpu = f"{torch.cuda.device_count()} x " if torch.cuda.is_available() else "none"
    assert values["GPU"].startswith(expected_gpu)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert cli_main(["env"]) == 0
    assert "- HF_HUB_OFFLINE: not set" in capsys.readouterr().out
    assert cli_main(["env", "--bogus"]) == 2


# ----------------------------------------------------------------------------- the plot extra
def test_analyze_plot_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, as when not installed
    png = tmp_path / "f.png"
    # refused before any model is looked up or loaded: the model name does not even exist
    assert analyze.main(["no_such_model_anywhere", "--plot", str(png)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hf-graft analyze: error: --plot needs matplotlib")
    assert 'pip install -e ".[plot]"' in err and not png.exists()
    # without --plot, analyze needs no matplotlib
    assert analyze.main(["resnet10t", "--thresholds", "0.1", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())[0]["name"] == "resnet10t"
    from hf_graft.cli.plots import plot_reports

    with pytest.raises(ImportError, match=r"hf_graft\[plot\]"):
        plot_reports([], png)
