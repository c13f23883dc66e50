"""Train a grafted population from a flat YAML recipe:

    accelerate launch -m hf_graft.train recipes/imagenet_r50.yaml
    python -m hf_graft.train recipes/quickstart.yaml --num_students 3 --output_dir out/q3
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from .config import DataArguments, GraftingConfig

__all__ = ["RecipeError", "SetupError", "build_trainer", "main", "parse_recipe", "run_training"]

logger = logging.getLogger("hf_graft.train")


class RecipeError(ValueError):
    """A recipe or override that cannot be used; the message names the file and the field."""


def _field_names(*classes) -> dict[str, Any]:
    fields = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.init:
                fields[f.name] = f
    return fields


def _to_argv(key: str, value: Any) -> list[str]:
    """One YAML entry as command-line tokens that HfArgumentParser understands."""
    if value is None:
        return []
    if isinstance(value, bool):
        return [f"--{key}", "true" if value else "false"]
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value)]
    if isinstance(value, (list, tuple)):
        return [f"--{key}", *[json.dumps(v) if isinstance(v, dict) else str(v) for v in value]] if value else []
    return [f"--{key}", str(value)]


def parse_recipe(recipe: str | os.PathLike | None, overrides: Sequence[str] = ()) -> tuple[DataArguments, GraftingConfig]:
    """Recipe YAML (flat keys, as in TRL / alignment-handbook recipes) + `--key value` overrides.

    Unknown keys fail here, before any data or model is touched, naming the key and the file.
    """
    from transformers import HfArgumentParser

    known = _field_names(DataArguments, GraftingConfig)
    argv: list[str] = []
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"{recipe}: recipe file not found")
        try:
            content = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"{recipe}: not valid YAML ({str(err).splitlines()[0]})") from err
        if not isinstance(content, dict):
            raise RecipeError(f"{recipe}: a recipe is a flat mapping of field: value")
        unknown = sorted(k for k in content if k not in known)
        if unknown:
            raise RecipeError(
                f"{recipe}: unknown key(s) {', '.join(map(repr, unknown))} "
                "(not a field of DataArguments or GraftingConfig; see `hf-graft train --help`)"
            )
        for key, value in content.items():
            argv += _to_argv(key, value)
    for token in overrides:
        if token.startswith("--"):
            key = token[2:].split("=", 1)[0]
            if key not in known:
                raise RecipeError(f"command line: unknown option --{key} (not a field of DataArguments or GraftingConfig)")
    argv += list(overrides)
    parser = HfArgumentParser((DataArguments, GraftingConfig))
    try:
        data_args, config, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except SystemExit as err:  # argparse already printed what was wrong
        raise RecipeError(f"{recipe or 'command line'}: invalid value (see the message above)") from err
    if remaining:
        raise RecipeError(f"command line: could not use {' '.join(remaining)!r}")
    return data_args, config


class SetupError(RuntimeError):
    """Data, model or teachers could not be prepared; raised before any training step."""


def build_trainer(data_args: DataArguments, config: GraftingConfig):
    """Load the data, build the population (and teachers) and the `GraftingTrainer`.

    Returns `(trainer, data, spec)`. Any failure here is a `SetupError` with a one-line message:
    nothing has been trained or written yet.
    """
    import timm  # noqa: F401  (import before hf_graft.models registers into it)

    from .data import load_image_data, population_datasets, resolve_student_data_config
    from .population import PopulationSpec, StudentPopulation
    from .trainer import GraftingTrainer

    try:
        data = load_image_data(data_args, seed=config.data_seed if config.data_seed is not None else config.seed)
        spec = PopulationSpec(
            student_model=config.student_model,
            num_students=config.num_students,
            num_classes=data.num_classes,
            student_model_kwargs=config.student_model_kwargs,
            label_names=data.label_names,
        )
        population = StudentPopulation.from_spec(
            spec, seed=config.seed, pretrained=config.student_pretrained, shared_init=config.shared_init
        )
        spec.data_config = resolve_student_data_config(population.members[0], data_args.input_size)
        train_dataset, eval_dataset = population_datasets(
            data, data_args, spec.data_config, num_members=config.num_students, order=config.data_order,
            seed=config.seed,
        )
        trainer = GraftingTrainer(model=population, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError, KeyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SetupError(message) from err
    return trainer, data, spec


def run_training(data_args: DataArguments, config: GraftingConfig) -> dict[str, Any]:
    """Load data, build the population, train, evaluate, export the selected student.

    The settings this device cannot honour and the output folder (locked for the whole run, writable,
    free of another run unless resuming or `replace_output_dir`) are checked before any data is loaded.
    """
    from .preflight import check_run_settings
    from .run_dir import OutputDirClaim

    check_run_settings(config)
    with OutputDirClaim(config, config.resume_from_checkpoint):
        return _train_and_export(data_args, config)


def _train_and_export(data_args: DataArguments, config: GraftingConfig) -> dict[str, Any]:
    from transformers.trainer_utils import get_last_checkpoint

    from .export import build_model_card, save_student, select_member
    from .filters import filter_report

    trainer, data, spec = build_trainer(data_args, config)

    resume = config.resume_from_checkpoint
    if resume in ("true", "True", "last"):
        resume = get_last_checkpoint(config.output_dir)
        if resume is None:
            logger.warning("resume_from_checkpoint: no checkpoint in %s; starting from scratch", config.output_dir)
    train_result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(train_result.metrics)
    eval_metrics = trainer.evaluate()
    metrics.update(eval_metrics)

    member_metrics = {
        k: {"top1": eval_metrics[f"eval_member{k}_top1"], "top5": eval_metrics[f"eval_member{k}_top5"]}
        for k in range(config.num_students)
    }
    selected, reason = select_member(member_metrics, config.select_student, metric="top1")
    metrics["selected_member"] = selected
    metrics["selection_reason"] = reason
    metrics["grafting"] = config.grafting_settings()
    if config.kd_settings():
        metrics["distillation"] = config.kd_settings()
    # each member's filter health at the end of training (the paper's "Reason", Table 8 style)
    metrics["filters"] = {
        f"member{k}": filter_report(member, thresholds=config.filter_thresholds, bins=config.graft_bins).summary()
        for k, member in enumerate(trainer.population.members)
    }
    results = metrics
    if trainer.diverged_members:  # members that went on alone with non-finite weights (never scions)
        results["diverged_members"] = {str(k): step for k, step in trainer.diverged_members.items()}

    student_dir = None
    if config.export_student and trainer.is_world_process_zero():
        student_dir = Path(config.output_dir) / "student"
        card = build_model_card(
            architecture=config.student_model,
            label_names=data.label_names,
            dataset_name=data_args.dataset_name,
            member_metrics=member_metrics,
            ensemble_metrics={"top1": eval_metrics["eval_ensemble_top1"], "top5": eval_metrics["eval_ensemble_top5"]},
            selected_member=selected,
            selection_reason=reason,
            grafting_settings=config.grafting_settings(),
            kd_settings=config.kd_settings(),
            repo_id=config.hub_model_id if config.push_student_to_hub else None,
            data_config=spec.data_config,
        )
        save_student(
            trainer.population.members[selected].eval(),
            student_dir,
            architecture=config.student_model,
            model_kwargs=config.student_model_kwargs,
            label_names=data.label_names,
            data_config=spec.data_config,
            card=card,
        )
        results["student_dir"] = str(student_dir)
    if trainer.is_world_process_zero():
        trainer.save_metrics("all", results, combined=False)
        trainer.save_state()
    if config.push_student_to_hub and student_dir is not None:
        from .export import push_student

        url = push_student(student_dir, config.hub_model_id, token=config.hub_token, private=config.hub_private_repo)
        logger.info("pushed the selected student to %s", url)
        results["hub_url"] = url
    trainer.accelerator.wait_for_everyone()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        from transformers import HfArgumentParser

        HfArgumentParser((DataArguments, GraftingConfig)).print_help()
        return 0
    recipe = None
    if argv and not argv[0].startswith("-"):
        recipe, argv = argv[0], argv[1:]
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        data_args, config = parse_recipe(recipe, argv)
    except (RecipeError, ValueError) as err:
        print(f"hf-graft train: {err}", file=sys.stderr)
        return 2
    from .data_checks import CorruptImageError
    from .divergence import DivergenceError
    from .export import PushToHubError
    from .preflight import PreflightError
    from .run_dir import OutputDirError

    try:
        run_training(data_args, config)
    except (SetupError, OutputDirError, PreflightError) as err:  # refused before any training step
        print(f"hf-graft train: {err}", file=sys.stderr)
        return 2
    except DivergenceError as err:  # all_results.json holds what was measured
        print(f"hf-graft train: {err}", file=sys.stderr)
        return 1
    except CorruptImageError as err:
        print(f"hf-graft train: {err.one_line()}", file=sys.stderr)
        return 1
    except PushToHubError as err:  # the local student is complete; only the upload failed
        print(f"hf-graft train: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
