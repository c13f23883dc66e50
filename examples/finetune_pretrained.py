"""Fine-tune an ImageNet-pretrained timm model on a `datasets` dataset with filter grafting.

Two members start from the same pretrained backbone (each with its own new classifier head), train at
different learning rates (the authors' cosine spread) and are grafted at every epoch boundary; the
best member is exported as a timm / transformers model and, with `--hub_model_id`, pushed to the Hub.

    python examples/finetune_pretrained.py                                   # resnet18.a1_in1k on beans
    python examples/finetune_pretrained.py --student_model convnext_nano.in12k_ft_in1k \\
        --dataset_name uoft-cs/cifar10 --input_size 224 --output_dir out/convnext_cifar10
    accelerate launch examples/finetune_pretrained.py --hub_model_id your-name/resnet18-beans-grafted

Every `DataArguments` / `GraftingConfig` field is a flag (`--help` lists them); the defaults below
replace the papers' from-scratch CIFAR settings with a short fine-tuning schedule.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from transformers import HfArgumentParser

from hf_graft import DataArguments, GraftingConfig, GraftingTrainer
from hf_graft.training.builder import build_run

logger = logging.getLogger("finetune_pretrained")

FINETUNE_DEFAULTS = dict(
    dataset_name="AI-Lab-Makerere/beans",  # 1,034 training images of bean leaves, 3 classes, with a validation split
    student_model="resnet18.a1_in1k",
    student_pretrained=True,  # the backbone from timm's ImageNet weights; the head is new, seeded per member
    num_students=2,
    lr_spread=["cosine"],  # member i (1-based) of K starts at lr * (1 + cos(pi (K - i) / K)) / 2
    num_train_epochs=5,
    learning_rate=0.01,  # a tenth of the from-scratch rate: the pretrained filters are kept, not relearnt
    weight_decay=1e-4,
    warmup_steps=0.1,  # a float below 1 is a share of the steps
    per_device_train_batch_size=32,
    per_device_eval_batch_size=64,
    logging_steps=10,
    output_dir="out/finetune_pretrained",
)


def parse_arguments(argv: Sequence[str]) -> tuple[DataArguments, GraftingConfig]:
    parser = HfArgumentParser((DataArguments, GraftingConfig))
    parser.set_defaults(**FINETUNE_DEFAULTS)
    data_args, config = parser.parse_args_into_dataclasses(args=list(argv))
    if config.hub_model_id and not config.push_to_hub:
        # a repo id asks for the push: parsed again with push_to_hub, so that the model card names the repo
        # and an offline run is refused before training rather than at the upload
        data_args, config = parser.parse_args_into_dataclasses(args=[*argv, "--push_to_hub", "true"])
    return data_args, config


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    data_args, config = parse_arguments(sys.argv[1:] if argv is None else argv)

    # the data (columns detected, the dataset's validation split for evaluation), the members built from the
    # pretrained weights, and their datasets with the model's own timm transforms
    parts = build_run(config, data_args)
    trainer = GraftingTrainer(args=config, **parts.trainer_kwargs())

    # trains, grafts at every epoch boundary, evaluates every member and their ensemble after each epoch,
    # selects the best member and writes it to output_dir/student with its model card
    trainer.train()
    final = {key: value for key, value in trainer.results.items() if key.startswith("eval_")}
    trainer.log_metrics("eval", final)  # every member's, the ensemble's and the selected student's top-1/top-5

    if config.hub_model_id:  # the student folder only, never the population or a checkpoint
        url = trainer.push_to_hub()
        logger.info("pushed to %s", url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
