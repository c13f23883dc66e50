"""Train a grafted population from a flat YAML recipe:

    accelerate launch -m hf_graft.train recipes/imagenet_r50.yaml
    python -m hf_graft.train recipes/quickstart.yaml --num_students 3 --output_dir out/q3
    hf-graft train --config recipes/quickstart.yaml     # TRL's spelling of the recipe

The script in TRL's style: parse, build, train (which evaluates, selects and writes the student),
push. Everything a run does lives in `GraftingTrainer`; a Python user gets the same run with
`build_population_and_datasets` + `GraftingTrainer(...).train()`.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any, Sequence

from hf_graft.config import DataArguments, GraftingConfig
from hf_graft.cli.recipe import RecipeError, parse_recipe, recipe_argument
from hf_graft.errors import HfGraftError, debug_enabled, one_line

__all__ = ["RecipeError", "SetupError", "build_trainer", "main", "parse_recipe", "run_training"]

logger = logging.getLogger("hf_graft.train")


class SetupError(HfGraftError, RuntimeError):
    """Data, model or teachers could not be prepared; raised before any training step."""


def build_trainer(data_args: DataArguments, config: GraftingConfig, callbacks=None, *, inputs_checked: bool = False):
    """Load the data, build the population (and teachers) and the `GraftingTrainer` (with the extra
    `TrainerCallback`s `callbacks`, if any).

    A refusal here (bad data, an unknown model, a setting that does not fit) is a `SetupError` with a
    one-line message: nothing has been trained or written yet. Anything else is a bug and keeps its traceback.
    """
    from hf_graft.training.builder import build_run
    from hf_graft.training.trainer import GraftingTrainer

    try:
        parts = build_run(config, data_args, inputs_checked=inputs_checked)
        return GraftingTrainer(args=config, callbacks=callbacks, **parts.trainer_kwargs())
    except (HfGraftError, ValueError, OSError) as err:
        raise SetupError(one_line(err)) from err


def run_training(data_args: DataArguments, config: GraftingConfig, callbacks=None, *,
                 inputs_checked: bool = False) -> dict[str, Any]:
    """Build, train (the trainer evaluates, selects and exports the student), push; returns the results.
    `callbacks` are extra `TrainerCallback`s (they may define the graft events).

    The trainer's own checks that need no data (settings this device cannot honour; the output folder
    locked, writable, free of another run unless resuming) run first here too, so that a refused run
    loads no data; the claim goes to the trainer, and the lock is held until the push is done. With
    `replace_output_dir`, the previous run's files are removed only when the trainer starts training: a
    run refused while its data, population or trainer is being built leaves them as they were."""
    from hf_graft.run.output_dir import OutputDirClaim
    from hf_graft.run.preflight import check_run_settings

    check_run_settings(config)
    with OutputDirClaim(config, config.resume_from_checkpoint) as claim:
        trainer = build_trainer(data_args, config, callbacks=callbacks, inputs_checked=inputs_checked)
        trainer.train(output_dir_claim=claim)
        if config.push_to_hub:
            trainer.results["hub_url"] = trainer.push_to_hub()
    return trainer.results


def _what_is_kept(config: GraftingConfig) -> str:
    """After an interrupted run: the checkpoint it can resume from (and the command-line flags that resume),
    or that there is none."""
    from hf_graft.run.output_dir import last_complete_checkpoint

    checkpoint = last_complete_checkpoint(config.output_dir, world_size=config.world_size)
    if checkpoint is None:
        return f"no checkpoint was written in {config.output_dir}, so there is nothing to resume: run it again"
    flags = "--resume_from_checkpoint true" + (" --replace_output_dir false" if config.replace_output_dir else "")
    return (f"the last complete checkpoint is {checkpoint}: resume from it with the same command and {flags} "
            "(a checkpoint whose save was interrupted is skipped)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)  # HF_GRAFT_DEBUG=1 or --debug: a refusal's traceback too
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in ("-h", "--help"):
        from transformers import HfArgumentParser

        HfArgumentParser((DataArguments, GraftingConfig), prog="hf-graft train",
                         usage="hf-graft train RECIPE.yaml | --config RECIPE.yaml [--field value ...]").print_help()
        return 0
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        recipe, argv = recipe_argument(argv)
        data_args, config = parse_recipe(recipe, argv)
    except (RecipeError, ValueError) as err:
        return _refused(err, 2, debug)
    _set_log_levels(config)
    from hf_graft.data.checks import CorruptImageError
    from hf_graft.training.divergence import DivergenceError
    from hf_graft.export.hub import PushToHubError
    from hf_graft.run.preflight import PreflightError
    from hf_graft.run.checkpoints import CheckpointSaveError
    from hf_graft.run.output_dir import OutputDirError

    try:
        results = run_training(data_args, config, inputs_checked=True)  # parse_recipe checked models, metrics
    except KeyboardInterrupt:  # Ctrl-C: what is kept and how to go on, not a traceback
        print(f"hf-graft train: interrupted; {_what_is_kept(config)}", file=sys.stderr)
        return 130
    except (SetupError, OutputDirError, PreflightError) as err:  # refused before any training step
        return _refused(err, 2, debug)
    except DivergenceError as err:  # all_results.json holds what was measured
        return _refused(err, 1, debug)
    except CorruptImageError as err:
        return _refused(err, 1, debug, err.one_line())
    except PushToHubError as err:  # the local student is complete; only the upload failed
        return _refused(err, 1, debug, f"{err}; the student folder is kept")
    except CheckpointSaveError as err:  # the disk is full: where, and which checkpoint is intact
        return _refused(err, 1, debug)
    if config.export_student and results.get("selected_member") is None:  # e.g. the chosen member diverged
        print(f"hf-graft train: no student written: {results.get('selection_reason')}; the results are in "
              f"{config.output_dir}", file=sys.stderr)
        return 1
    return 0


def _set_log_levels(config: GraftingConfig) -> None:
    """`log_level` on the main process, `log_level_replica` on the others, as transformers' example scripts
    do; with the default "passive", hf_graft logs at INFO on the main process and transformers keeps its own."""
    import transformers

    passive = config.log_level == "passive" and config.should_log
    level = logging.INFO if passive else config.get_process_log_level()
    logging.getLogger("hf_graft").setLevel(level)
    if not passive:
        transformers.utils.logging.set_verbosity(level)
        try:
            import datasets

            datasets.utils.logging.set_verbosity(level)
        except ImportError:
            pass


def _refused(error: BaseException, status: int, debug: bool, message: str | None = None) -> int:
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    print(f"hf-graft train: {message if message is not None else error}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
