"""One rank of the 2-process CPU/gloo GraftingTrainer run of tests/test_distributed.py.

Launched as `torchrun --standalone --nproc_per_node 2 tests/_dist_worker.py OUT_DIR [EPOCHS]`
(CPU processes and gloo; with GRAFT_TEST_CUDA=1, one GPU per process and NCCL).
The run trains 3 epochs (grafts at the start of epochs 1 and 2) with a checkpoint every 2 steps,
then a second run resumes from the first one's checkpoint-6 (mid-epoch 1). Every rank writes
OUT_DIR/rank{r}.json with: the world it ran in, for both runs a sha256 digest of every member's
weights (parameters and buffers) right before and after each graft and at the end, and the
training examples it read in every epoch; and the end-of-run results of the first run (its final
evaluation, the selected member, the student folder that process 0 wrote).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

torch.set_num_threads(1)

import hf_graft  # noqa: E402,F401  (registers the cifar_* models in timm)
from hf_graft.training.builder import build_population_and_datasets  # noqa: E402
from hf_graft.config import DataArguments, GraftingConfig  # noqa: E402
from hf_graft.data.sampling import MemberOrderDataset  # noqa: E402
from hf_graft.data.loading import load_image_data  # noqa: E402
from hf_graft.training.trainer import GraftingTrainer  # noqa: E402


def member_digests(population) -> list[str]:
    """sha256 of each member's full state dict (names, dtypes, shapes and bytes of every tensor)."""
    digests = []
    for member in population.members:
        h = hashlib.sha256()
        for name, tensor in sorted(member.state_dict().items()):
            t = tensor.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        digests.append(h.hexdigest())
    return digests


class RecordingDataset(MemberOrderDataset):
    """Remembers which (epoch, example) pairs this rank read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: dict[int, list[int]] = {}  # epoch -> example indices, in the order read

    def __getitem__(self, index):
        epoch, i = divmod(int(index), len(self))
        self.seen.setdefault(epoch, []).append(i)
        return super().__getitem__(index)


class DigestTrainer(GraftingTrainer):
    """Records the digest of every member right before and right after each graft."""

    graft_digests: list[dict]

    def graft(self, step: int):
        before = member_digests(self.population)
        report = super().graft(step)
        self.graft_digests.append({
            "graft": step, "global_step": self.state.global_step, "before": before,
            "digests": member_digests(self.population),
        })
        return report


def train_once(data_args, data, output_dir: str, epochs: int, resume: str | None = None):
    """One GraftingTrainer run (a checkpoint every 2 steps); returns what this rank saw and held."""
    config = GraftingConfig(
        output_dir=output_dir, student_model="cifar_resnet20", num_students=2,
        num_train_epochs=epochs, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        use_cpu=os.environ.get("GRAFT_TEST_CUDA") != "1", dataloader_num_workers=0,
        save_strategy="steps", save_steps=2, save_total_limit=None,
        eval_strategy="epoch", logging_steps=1, seed=0, report_to="none", disable_tqdm=True, learning_rate=0.05,
        lr_spread=["cosine"], filter_thresholds=[0.1], student_model_kwargs={"drop_rate": 0.2},
    )
    population, train_dataset, eval_dataset = build_population_and_datasets(
        config, data_args, data=data, train_dataset_cls=RecordingDataset)
    trainer = DigestTrainer(model=population, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset)
    trainer.graft_digests = []
    initial = member_digests(trainer.population)
    trainer.train(resume_from_checkpoint=resume)
    record = {
        "initial_digests": initial,
        "graft_digests": trainer.graft_digests,
        "final_digests": member_digests(trainer.population),
        "grafts_done": trainer.graft_callback.grafts_done,
        "global_step": trainer.state.global_step,
        "seen": {str(e): v for e, v in train_dataset.seen.items()},
    }
    return trainer, record


def main(out_dir: str, epochs: int = 3) -> None:
    import torch.distributed as dist

    data_args = DataArguments(dataset_name="builtin:digits", max_train_samples=64, max_eval_samples=32, input_size=16)
    data = load_image_data(data_args, seed=0)
    trainer, full = train_once(data_args, data, os.path.join(out_dir, "run"), epochs)
    metrics = trainer.results  # the end of the run, on every rank: final evaluation, selection, student
    config = trainer.args
    # a second run resumed mid-epoch 1 (after global step 6) from the first run's checkpoint
    _, resumed = train_once(data_args, data, os.path.join(out_dir, "resumed"), epochs,
                            resume=os.path.join(out_dir, "run", "checkpoint-6"))
    record = {
        "rank": config.process_index,
        "world_size": config.world_size,
        "dist_world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "num_train": len(trainer.train_dataset),
        "eval_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "student_dir": metrics.get("student_dir"),
        "full": full,
        "resumed": resumed,
    }
    with open(os.path.join(out_dir, f"rank{config.process_index}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
