"""`hf-graft export`: one member of a training checkpoint as a student folder (and, optionally, on the Hub).

The folder and its card are written by `hf_graft.export.writer.write_student` (as at the end of
training), the upload by `hf_graft.export.hub.push_student`.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from hf_graft.cli.arguments import ArgumentsError, CommandLineParser, command_parser, parse_arguments
from hf_graft.export.hub import PushToHubError, scrub_secrets, push_student
from hf_graft.errors import HfGraftError
from hf_graft.export.writer import write_student
from hf_graft.utils.files import WEIGHTS_FILE

__all__ = ["ExportArguments", "build_parser", "export_from_checkpoint", "main"]

PROG = "hf-graft export"


def _load_member_metrics(path: str | os.PathLike) -> dict[int, dict[str, float]]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {int(k): {str(m): float(v) for m, v in metrics.items()} for k, metrics in data.items()}


def _check_member(checkpoint_dir: Path, member: int):
    """The checkpoint's spec, after the cheap checks (files present, member in range)."""
    from hf_graft.population.students import PopulationSpec
    from hf_graft.utils.files import POPULATION_FILE

    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint_dir}: no such checkpoint folder")
    from hf_graft.run.output_dir import check_checkpoint_folder

    check_checkpoint_folder(checkpoint_dir, what="checkpoint")  # no leftover of an interrupted save, readable weights
    if not (checkpoint_dir / POPULATION_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: no {POPULATION_FILE}; is it a hf_graft training checkpoint?")
    if not (checkpoint_dir / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: no {WEIGHTS_FILE}")
    spec = PopulationSpec.load(checkpoint_dir)
    if isinstance(member, bool) or not 0 <= int(member) < spec.num_students:
        raise ValueError(f"member {member}: out of range, {checkpoint_dir} holds members 0..{spec.num_students - 1}")
    _check_finite(checkpoint_dir, int(member))
    return spec


def _check_finite(checkpoint_dir: Path, member: int) -> None:
    """Refuse a member whose weights hold nan or inf (it diverged), naming the tensors."""
    from safetensors import safe_open

    from hf_graft.export.student_folder import describe_non_finite, non_finite_tensors

    prefix = f"members.{member}."
    with safe_open(str(checkpoint_dir / WEIGHTS_FILE), framework="pt") as handle:
        state = {name[len(prefix):]: handle.get_tensor(name) for name in handle.keys() if name.startswith(prefix)}
    broken = non_finite_tensors(state)
    if broken:
        raise ValueError(f"member {member} of {checkpoint_dir}: {describe_non_finite(broken, len(state))}; it "
                         "diverged and is not exported: export another member")


def _export_member(
    checkpoint_dir: Path,
    member: int,
    out: str | os.PathLike,
    repo_id: str | None,
    member_metrics: Mapping[int, Mapping[str, float]] | None,
    overwrite: bool = False,
    license: str | None = None,
) -> Path:
    from hf_graft.export.target import check_export_target, checkpoint_source
    from hf_graft.population.students import load_checkpoint_members
    from hf_graft.run.records import read_run_records
    from hf_graft.run.results import ensemble_metrics, member_metrics as logged_member_metrics

    spec = _check_member(checkpoint_dir, member)
    check_export_target(out, checkpoint_dir, overwrite)
    records = read_run_records(checkpoint_dir)  # the settings and evaluations, as training's card shows them
    evaluation = records.evaluation() or {}  # of the weights in this checkpoint, when it was evaluated
    _, (model,) = load_checkpoint_members(checkpoint_dir, [int(member)])
    return write_student(
        model, out, spec=spec, selected_member=int(member),
        member_metrics=member_metrics or logged_member_metrics(evaluation, spec.num_students),
        ensemble_metrics=None if member_metrics else ensemble_metrics(evaluation),
        selection_reason=f"chosen explicitly when exporting the checkpoint {checkpoint_dir.name} (--member {member})",
        records=records, license=license, repo_id=repo_id,
        replace=True,  # check_export_target decided
        source=checkpoint_source(checkpoint_dir, int(member)),
    )


def export_from_checkpoint(
    checkpoint_dir: str | os.PathLike,
    *,
    member: int,
    out: str | os.PathLike,
    push_to_hub: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    member_metrics: Mapping[int, Mapping[str, float]] | None = None,
    overwrite: bool = False,
    license: str | None = None,
) -> Path:
    """Export member `member` of a training checkpoint to `out`, and push it when `push_to_hub` names a repo
    (to the branch `revision`, created if missing).

    The model card shows what the checkpoint records: the run's settings (graft_run.json), every logged
    evaluation (trainer_state.json; `member_metrics` replaces the one of this checkpoint's step) and the
    dataset (graft_population.json); `license` is its license line.
    A non-empty `out` is replaced only if it holds an export of this same checkpoint, or, with `overwrite`,
    an earlier export of another one (see `export.target`).
    A failed push raises `PushToHubError` and leaves the written folder in place.
    """
    folder = _export_member(Path(checkpoint_dir), member, out, push_to_hub, member_metrics, overwrite, license)
    if push_to_hub:
        push_student(folder, push_to_hub, token=token, private=private, revision=revision)
    return folder


@dataclass
class ExportArguments:
    """The arguments of `hf-graft export` (the Hub flags are named as in `train`)."""

    member: int = field(metadata={"help": "index of the member to export"})
    out: str = field(metadata={"help": "folder to write (replaced if it holds an export of the same checkpoint)"})
    checkpoint_dir: str | None = field(default=None, metadata={
        "help": "training checkpoint folder (model.safetensors + graft_population.json)",
        "metavar": "CHECKPOINT_DIR"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace --out when it holds an earlier export of another checkpoint (never a folder holding "
        "anything else)"})
    push_to_hub: str | None = field(default=None, metadata={
        "help": "Hub model repo id to upload the folder to", "metavar": "REPO"})
    hub_token: str | None = field(default=None, metadata={
        "help": "Hub token (default: $HF_TOKEN or the cached `hf auth login`; prefer those, a command-line token is "
        "visible to other processes)"})
    hub_private_repo: bool | None = field(default=None, metadata={
        "help": "create the Hub repo as private (unset: the account's default)"})
    revision: str | None = field(default=None, metadata={
        "help": "branch of the Hub repo to push to (created from the default branch if missing)", "metavar": "BRANCH"})
    license: str | None = field(default=None, metadata={
        "help": "the model's license, a Hub license id such as apache-2.0 or mit (the card's metadata)"})
    member_metrics: str | None = field(default=None, metadata={
        "help": "optional JSON file {member: {metric: value}} shown in the model card", "metavar": "JSON"})


# the flags of an earlier release, kept for one release
RENAMED_FLAGS = {"--token": "--hub_token", "--private": "--hub_private_repo"}


def build_parser(prog: str = PROG) -> CommandLineParser:
    return command_parser(
        ExportArguments, prog=prog, positional="checkpoint_dir",
        description="Export one member of a hf_graft training checkpoint as a timm + transformers model folder, "
        "optionally pushing it to the Hugging Face Hub.",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, debug = parse_arguments(build_parser(), ExportArguments, argv, positional="checkpoint_dir",
                                      renamed=RENAMED_FLAGS)
    except ArgumentsError as error:
        print(f"{PROG}: error: {scrub_secrets(str(error), [])}", file=sys.stderr)
        return 2
    token = args.hub_token

    def fail(code: int, message: str, error: BaseException | None = None) -> int:
        if debug and error is not None:
            traceback.print_exception(error, file=sys.stderr)
        print(f"{PROG}: error: {scrub_secrets(' '.join(str(message).split()), [token])}", file=sys.stderr)
        return code

    # bad input is reported before any model is loaded
    try:
        from hf_graft.export.target import check_export_target

        _check_member(Path(args.checkpoint_dir), args.member)
        check_export_target(args.out, args.checkpoint_dir, args.overwrite)
        if args.push_to_hub:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(args.push_to_hub)
            except HFValidationError as e:
                raise ValueError(f"--push_to_hub {args.push_to_hub!r}: not a valid repo id ({e})") from None
        if args.license is not None and not args.license.strip():
            raise ValueError("--license: empty; give a Hub license id such as apache-2.0 or mit, or leave it out")
        if args.revision is not None and not args.push_to_hub:
            raise ValueError("--revision: only with --push_to_hub")
        metrics = _load_member_metrics(args.member_metrics) if args.member_metrics else None
    except (HfGraftError, OSError, ValueError) as e:
        return fail(2, str(e), e)

    try:
        folder = _export_member(Path(args.checkpoint_dir), args.member, args.out, args.push_to_hub, metrics,
                                args.overwrite, args.license)
    except KeyboardInterrupt:  # the folder is replaced in one rename at the end: nothing partial is left
        return fail(130, f"interrupted; --out {args.out} is as it was before (no partial export is left)")
    except (HfGraftError, OSError, ValueError) as e:
        return fail(1, f"export failed: {e}", e)
    print(f"wrote {folder}")
    if args.push_to_hub:
        try:
            url = push_student(folder, args.push_to_hub, token=token, private=args.hub_private_repo,
                               revision=args.revision)
        except KeyboardInterrupt:
            return fail(130, f"interrupted while uploading; {folder} is complete: push it again with --push_to_hub")
        except PushToHubError as e:
            return fail(1, f"{e}; the exported folder is kept", e)
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
