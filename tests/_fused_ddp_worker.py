"""One rank of the 2-process CPU/gloo DDP run of tests/test_fused.py::test_fused_members_under_ddp.

Launched as `torchrun --standalone --nproc_per_node 2 tests/_fused_ddp_worker.py OUT_DIR`: trains
the same float64 population (cifar_resnet20, K = 2, 32 16-px digits, 2 epochs of 2 steps, a graft)
once with member_execution loop and once fused, and writes OUT_DIR/rank{r}.json with every member
tensor of both runs at the end (as lists), so the test compares modes and ranks.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

torch.set_num_threads(1)

import hf_graft  # noqa: E402,F401
from hf_graft.config import DataArguments, GraftingConfig  # noqa: E402
from hf_graft.data.loading import load_image_data  # noqa: E402
from hf_graft.data.populations import population_datasets  # noqa: E402
from hf_graft.data.transforms import resolve_student_data_config  # noqa: E402
from hf_graft.population.students import PopulationSpec, StudentPopulation  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _float64 import Float64Trainer  # noqa: E402


def run(out: str, mode: str) -> tuple[dict[str, list], int]:
    data_args = DataArguments(dataset_name="builtin:digits", max_train_samples=32, max_eval_samples=16,
                              input_size=16)
    data = load_image_data(data_args, seed=0)
    config = GraftingConfig(
        output_dir=os.path.join(out, mode), num_students=2, num_train_epochs=2, per_device_train_batch_size=8,
        use_cpu=True, dataloader_num_workers=0, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, seed=0, learning_rate=0.05, lr_spread=["cosine"], max_grad_norm=1.0,
        member_execution=mode,
    )
    spec = PopulationSpec(config.student_model, 2, data.num_classes)
    population = StudentPopulation.from_spec(spec, seed=0)
    spec.data_config = resolve_student_data_config(population.members[0], data_args.input_size)
    train, _ = population_datasets(data, data_args, spec.data_config, num_members=2, order="independent", seed=0)
    trainer = Float64Trainer(model=population, args=config, train_dataset=train)
    trainer.train()
    state = {k: v.detach().double().reshape(-1).tolist() for k, v in trainer.population.state_dict().items()}
    return state, trainer.graft_callback.grafts_done


def main() -> None:
    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    result = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"])}
    for mode in ("loop", "fused"):
        result[mode], result[f"{mode}_grafts"] = run(out, mode)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
