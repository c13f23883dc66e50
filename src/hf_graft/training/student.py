"""The trainer's side of the student: writing the selected member as a folder with its card, and the Hub.

A mixin of `GraftingTrainer` (listed before `Trainer`): the Trainer's `push_to_hub` and its repository
hooks are replaced so that only the student, never the population or a checkpoint, reaches the Hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from hf_graft.export.hub import check_upload_options, push_student
from hf_graft.export.writer import write_student
from hf_graft.run.records import trainer_records
from hf_graft.run.results import ensemble_metrics, member_metrics
from hf_graft.utils.files import STUDENT_DIR

__all__ = ["StudentExport"]


class StudentExport:
    """`save_student` and `push_to_hub` of a trainer with `population`, `results` and `student_dir`."""

    def save_student(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write the selected member (default: `output_dir/student`) as a folder that timm and transformers
        both load, with its model card (export/writer.py), from `self.results` (computed if `train()` has not run)."""
        results = self.results if self.results is not None else self.run_results()
        k = results["selected_member"]
        if k is None:
            raise ValueError(f"GraftingTrainer.save_student: {results['selection_reason']}")
        folder = Path(output_dir) if output_dir is not None else Path(self.args.output_dir) / STUDENT_DIR
        if self.is_world_process_zero():
            args = self.args
            write_student(self.population.members[k], folder, spec=self.population.spec,
                          architecture=args.student_model, model_kwargs=args.student_model_kwargs,
                          member_metrics=member_metrics(results, args.num_students),
                          ensemble_metrics=ensemble_metrics(results), selected_member=k,
                          selection_reason=results["selection_reason"], records=trainer_records(self),
                          license=args.license, repo_id=args.hub_model_id if args.push_to_hub else None)
        results["student_dir"] = str(folder)
        self.student_dir = folder
        return folder

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """No repo at the start of training: `push_to_hub` creates it when it uploads the student."""
        self.hub_model_id = self.args.hub_model_id

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Checkpoints (the whole population) stay local: only the student is ever pushed."""

    def push_to_hub(self, commit_message: str | None = None, blocking: bool = True, token: str | None = None,
                    revision: str | None = None, private: bool | None = None, **kwargs):
        """Upload only the student folder (written if need be) to `hub_model_id`, branch `revision` or `hub_revision`
        (made if missing). Returns the repo URL, or with blocking=False the upload's Future, as the Trainer does."""
        check_upload_options(kwargs, "GraftingTrainer.push_to_hub")  # before the student is written
        if not self.args.hub_model_id:
            raise ValueError("GraftingConfig.hub_model_id: required to push the student to the Hub")
        folder = self.student_dir if self.student_dir is not None else self.save_student()
        if not self.is_world_process_zero():
            return None
        return push_student(folder, self.args.hub_model_id, token=token or self.args.hub_token,
                            private=self.args.hub_private_repo if private is None else private,
                            commit_message=commit_message, revision=revision or self.args.hub_revision,
                            blocking=blocking, **kwargs)
