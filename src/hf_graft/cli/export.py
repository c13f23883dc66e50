"""`hf-graft export`: one member of a training checkpoint as a student folder (and, optionally, on the Hub).

The folder itself is written by `student_folder.save_student`, its card by `model_card`, the upload
by `hub.push_student`; those names are importable from here too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

from hf_graft.export.hub import PushToHubError, scrub_secrets, push_student
from hf_graft.export.model_card import PAPER_BIBTEX, build_model_card
from hf_graft.run.results import select_member
from hf_graft.export.student_folder import (
    CONFIG_FILE, EXPORT_FILES, MODEL_CARD_FILE, WEIGHTS_FILE, build_student_config, save_student,
)

__all__ = [
    "CONFIG_FILE",
    "EXPORT_FILES",
    "MODEL_CARD_FILE",
    "PAPER_BIBTEX",
    "PushToHubError",
    "WEIGHTS_FILE",
    "build_model_card",
    "build_student_config",
    "export_from_checkpoint",
    "main",
    "push_student",
    "save_student",
    "select_member",
]


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
) -> Path:
    from hf_graft.export.target import check_export_target, checkpoint_source
    from hf_graft.population.students import load_checkpoint_members

    spec = _check_member(checkpoint_dir, member)
    check_export_target(out, checkpoint_dir, overwrite)
    _, (model,) = load_checkpoint_members(checkpoint_dir, [int(member)])
    metrics = {int(k): dict(v) for k, v in (member_metrics or {}).items()}
    card = build_model_card(
        architecture=spec.student_model,
        label_names=spec.label_names,
        dataset_name=None,
        member_metrics=metrics,
        ensemble_metrics=None,
        selected_member=int(member),
        selection_reason=f"chosen explicitly when exporting the checkpoint {checkpoint_dir.name} (--member {member})",
        grafting_settings={"population size": spec.num_students, "checkpoint": checkpoint_dir.name},
        kd_settings=None,
        repo_id=repo_id,
        data_config=spec.data_config,
    )
    return save_student(
        model,
        out,
        architecture=spec.student_model,
        model_kwargs=spec.student_model_kwargs,
        label_names=spec.label_names,
        data_config=spec.data_config,
        card=card,
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
    member_metrics: Mapping[int, Mapping[str, float]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Export member `member` of a training checkpoint to `out`, and push it when `push_to_hub` names a repo.

    A non-empty `out` is replaced only if it holds an export of this same checkpoint, or, with `overwrite`,
    an earlier export of another one (see `export.target`).
    A failed push raises `PushToHubError` and leaves the written folder in place.
    """
    folder = _export_member(Path(checkpoint_dir), member, out, push_to_hub, member_metrics, overwrite)
    if push_to_hub:
        push_student(folder, push_to_hub, token=token, private=private)
    return folder


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + error; keep it to one line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "hf-graft export") -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog=prog,
        description="Export one member of a hf_graft training checkpoint as a timm + transformers model folder, "
        "optionally pushing it to the Hugging Face Hub.",
    )
    parser.add_argument("checkpoint_dir", help="training checkpoint folder (model.safetensors + graft_population.json)")
    parser.add_argument("--member", type=int, required=True, help="index of the member to export")
    parser.add_argument("--out", required=True,
                        help="folder to write (replaced if it holds an export of the same checkpoint)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out when it holds an earlier export of another checkpoint (never a folder "
                        "holding anything else)")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="Hub model repo id to upload the folder to")
    parser.add_argument("--private", action="store_true", default=None, help="create the Hub repo as private")
    parser.add_argument(
        "--token", default=None,
        help="Hub token (default: $HF_TOKEN or the cached `hf auth login`; prefer those, a command-line token is "
        "visible to other processes)",
    )
    parser.add_argument("--member-metrics", default=None, metavar="JSON",
                        help="optional JSON file {member: {metric: value}} shown in the model card")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    token = args.token

    def fail(code: int, message: str) -> int:
        print(f"{prog}: error: {scrub_secrets(' '.join(str(message).split()), [token])}", file=sys.stderr)
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
                raise ValueError(f"--push-to-hub {args.push_to_hub!r}: not a valid repo id ({e})") from None
        metrics = _load_member_metrics(args.member_metrics) if args.member_metrics else None
    except (OSError, ValueError) as e:
        return fail(2, str(e))

    try:
        folder = _export_member(Path(args.checkpoint_dir), args.member, args.out, args.push_to_hub, metrics,
                                args.overwrite)
    except KeyboardInterrupt:  # the folder is replaced in one rename at the end: nothing partial is left
        return fail(130, f"interrupted; --out {args.out} is as it was before (no partial export is left)")
    except (OSError, ValueError, RuntimeError) as e:
        return fail(1, f"export failed: {e}")
    print(f"wrote {folder}")
    if args.push_to_hub:
        try:
            url = push_student(folder, args.push_to_hub, token=token, private=args.private)
        except KeyboardInterrupt:
            return fail(130, f"interrupted while uploading; {folder} is complete: push it again with --push-to-hub")
        except PushToHubError as e:
            return fail(1, f"{e}; the exported folder is kept")
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
