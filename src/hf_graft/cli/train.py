"""Train a grafted population from a flat YAML recipe:

    accelerate launch -m hf_graft.train recipes/imagenet_r50.yaml
    python -m hf_graft.train recipes/quickstart.yaml --num_students 3 --output_dir out/q3

The script in TRL's style: parse, build, train (which evaluates, selects and writes the student),
push. Everything a run does lives in `GraftingTrainer`; a Python user gets the same run with
`build_population_and_datasets` + `GraftingTrainer(...).train()`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Sequence

from hf_graft.config import DataArguments, GraftingConfig
from hf_graft.cli.recipe import RecipeError, parse_recipe

__all__ = ["RecipeError", "SetupError", "build_trainer", "main", "parse_recipe", "run_training"]

logger = logging.getLogger("hf_graft.train")


class SetupError(RuntimeError):
    """Data, model or teachers could not be prepared; raised before any training step."""


def build_trainer(data_args: DataArguments, config: GraftingConfig, callbacks=None):
    """Load the data, build the population (and teachers) and the `GraftingTrainer` (with the extra
    `TrainerCallback`s `callbacks`, if any).

    Any failure here is a `SetupError` with a one-line message: nothing has been trained or written yet.
    """
    from hf_graft.training.builder import build_population_and_datasets
    from hf_graft.training.trainer import GraftingTrainer

    try:
        population, train_dataset, eval_dataset = build_population_and_datasets(config, data_args)
        return GraftingTrainer(model=population, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
                               callbacks=callbacks)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError, KeyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SetupError(message) from err


def run_training(data_args: DataArguments, config: GraftingConfig, callbacks=None) -> dict[str, Any]:
    """Build, train (the trainer evaluates, selects and exports the student), push; returns the results.
    `callbacks` are extra `TrainerCallback`s (they may define the graft events).

    The trainer's own checks that need no data (settings this device cannot honour; the output folder
    locked, writable, free of another run unless resuming) run first here too, so that a refused run
    loads no data; the lock is held until the push is done. With `replace_output_dir`, the previous
    run's files are removed only when the trainer starts training: a run refused while its data,
    population or trainer is being built leaves them as they were."""
    from hf_graft.run.preflight import check_run_settings
    from hf_graft.run.output_dir import OutputDirClaim

    check_run_settings(config)
    with OutputDirClaim(config, config.resume_from_checkpoint, clear=False) as claim:
        trainer = build_trainer(data_args, config, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=claim.resume)
        if config.push_student_to_hub:
            trainer.results["hub_url"] = trainer.push_to_hub()
    return trainer.results


def _what_is_kept(config: GraftingConfig) -> str:
    """After an interrupted run: the checkpoint it can resume from (and the command-line flags that resume),
    or that there is none."""
    from hf_graft.run.output_dir import last_checkpoint

    checkpoint = last_checkpoint(config.output_dir)
    if checkpoint is None:
        return f"no checkpoint was written in {config.output_dir}, so there is nothing to resume: run it again"
    flags = "--resume_from_checkpoint true" + (" --replace_output_dir false" if config.replace_output_dir else "")
    return (f"the last complete checkpoint is {checkpoint}: resume from it with the same command and {flags} "
            "(an interrupted save leaves no half-written checkpoint)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        from transformers import HfArgumentParser

        HfArgumentParser((DataArguments, GraftingConfig), prog="hf-graft train",
                         usage="hf-graft train RECIPE.yaml [--field value ...]").print_help()
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
    from hf_graft.data.checks import CorruptImageError
    from hf_graft.training.divergence import DivergenceError
    from hf_graft.export.hub import PushToHubError
    from hf_graft.run.preflight import PreflightError
    from hf_graft.run.checkpoints import CheckpointSaveError
    from hf_graft.run.output_dir import OutputDirError

    try:
        results = run_training(data_args, config)
    except KeyboardInterrupt:  # Ctrl-C: what is kept and how to go on, not a traceback
        print(f"hf-graft train: interrupted; {_what_is_kept(config)}", file=sys.stderr)
        return 130
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
        print(f"hf-graft train: {err}; the student folder is kept", file=sys.stderr)
        return 1
    except CheckpointSaveError as err:  # the disk is full: where, and which checkpoint is intact
        print(f"hf-graft train: {err}", file=sys.stderr)
        return 1
    if config.export_student and results.get("selected_member") is None:  # e.g. the chosen member diverged
        print(f"hf-graft train: no student written: {results.get('selection_reason')}; the results are in "
              f"{config.output_dir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
