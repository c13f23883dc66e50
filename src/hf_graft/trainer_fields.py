"""Every `transformers.TrainingArguments` field, and what it does in a `GraftingTrainer`: honoured, or refused.

`GraftingConfig` is a `TrainingArguments`, so every field of the Trainer is accepted by construction; a
few cannot work with a population of image classifiers (they need token ids, a language model's layers,
checkpoint uploads, or a model with a single set of weights) and are refused in one line when set to
anything but the value that works. `docs/reference/training_arguments.md` is generated from this table
(`scripts/make_reference.py`), and tests/test_trainer_fields.py fails on a field of the installed
transformers that the table does not list, so a new release's fields are noticed.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["FIELD_NOTES", "REFUSED", "refused_field"]

WORKS = "works"
REFUSED_STATUS = "refused"

# name -> (status, what hf_graft does with it). Fields not named here are not in this transformers version.
FIELD_NOTES: dict[str, tuple[str, str]] = {
    "output_dir": (WORKS, "the run's folder: locked for the run, checkpoints, results, `student/`"),
    "per_device_train_batch_size": (WORKS, "images per member per device; each member sees its own order of them"),
    "num_train_epochs": (WORKS, "epochs; a graft at every epoch boundary after `graft_start_epoch`"),
    "max_steps": (WORKS, "overrides the epochs; the step decay's epochs are counted in steps of an epoch"),
    "learning_rate": (WORKS, "the base rate; member k starts at it times its `lr_spread` multiplier"),
    "lr_scheduler_type": (WORKS, "every member's schedule (replaced by `lr_decay_epochs` when that is set)"),
    "lr_scheduler_kwargs": (WORKS, "passed to the scheduler, as in the Trainer"),
    "warmup_steps": (WORKS, "also before the papers' step decay"),
    "optim": (WORKS, "the optimizer class, with one pair of parameter groups per member"),
    "optim_args": (WORKS, "as in the Trainer"),
    "weight_decay": (WORKS, "which parameters: `weight_decay_scope` (the Trainer's rule, or all as the papers)"),
    "adam_beta1": (WORKS, "as in the Trainer"),
    "adam_beta2": (WORKS, "as in the Trainer"),
    "adam_epsilon": (WORKS, "as in the Trainer"),
    "optim_target_modules": (REFUSED_STATUS, "GaLore / APOLLO target a language model's modules"),
    "gradient_accumulation_steps": (WORKS, "as in the Trainer"),
    "average_tokens_across_devices": (WORKS, "no tokens here: each member's loss is its batch mean either way"),
    "max_grad_norm": (WORKS, "clips every member's gradient norm on its own (one global clip would couple them)"),
    "label_smoothing_factor": (WORKS, "every member's cross-entropy (loop and fused), not the KD term"),
    "bf16": (WORKS, "autocast; refused on a GPU without bfloat16"),
    "fp16": (WORKS, "autocast with loss scaling; refused on the CPU, where it would train in float32"),
    "bf16_full_eval": (WORKS, "as in the Trainer"),
    "fp16_full_eval": (WORKS, "as in the Trainer; refused on the CPU"),
    "tf32": (WORKS, "as in the Trainer"),
    "activation_checkpointing": (REFUSED_STATUS, "the population is K timm models: set timm's "
                                 "`set_grad_checkpointing` per member instead"),
    "activation_checkpointing_kwargs": (REFUSED_STATUS, "see activation_checkpointing"),
    "gradient_checkpointing": (REFUSED_STATUS, "the population has no `gradient_checkpointing_enable`; timm's "
                               "`set_grad_checkpointing` per member is the way"),
    "gradient_checkpointing_kwargs": (REFUSED_STATUS, "see gradient_checkpointing"),
    "torch_compile": (WORKS, "compiles the population (loop or fused); static graphs per batch size by default"),
    "torch_compile_backend": (WORKS, "checked with the config"),
    "torch_compile_mode": (WORKS, "checked with the config"),
    "use_liger_kernel": (REFUSED_STATUS, "Liger kernels replace a language model's layers"),
    "liger_kernel_config": (REFUSED_STATUS, "see use_liger_kernel"),
    "use_cache": (REFUSED_STATUS, "a language model's key/value cache"),
    "neftune_noise_alpha": (REFUSED_STATUS, "noise on a language model's token embeddings"),
    "torch_empty_cache_steps": (WORKS, "as in the Trainer"),
    "auto_find_batch_size": (WORKS, "as in the Trainer: the per-member batch is halved on out-of-memory"),
    "logging_strategy": (WORKS, "training logs also carry every member's CE, KD, gradient norm and rate"),
    "logging_steps": (WORKS, "as in the Trainer"),
    "logging_first_step": (WORKS, "as in the Trainer"),
    "log_on_each_node": (WORKS, "as in the Trainer"),
    "logging_nan_inf_filter": (WORKS, "off by default here (a non-finite batch shows as nan); on CUDA the filter "
                               "runs on the device"),
    "include_num_input_tokens_seen": (REFUSED_STATUS, "counts a language model's input tokens"),
    "log_level": (WORKS, "hf_graft's and transformers' loggers on the main process (`hf-graft train`)"),
    "log_level_replica": (WORKS, "the same on the other processes"),
    "disable_tqdm": (WORKS, "as in the Trainer"),
    "report_to": (WORKS, "as in the Trainer; TensorBoard also gets the graft's alpha histograms"),
    "run_name": (WORKS, "as in the Trainer"),
    "project": (WORKS, "as in the Trainer (trackio)"),
    "trackio_space_id": (WORKS, "as in the Trainer"),
    "trackio_bucket_id": (WORKS, "as in the Trainer"),
    "trackio_static_space_id": (WORKS, "as in the Trainer"),
    "eval_strategy": (WORKS, "every member and the ensemble are evaluated"),
    "eval_steps": (WORKS, "as in the Trainer"),
    "eval_delay": (WORKS, "as in the Trainer"),
    "per_device_eval_batch_size": (WORKS, "as in the Trainer"),
    "prediction_loss_only": (REFUSED_STATUS, "without the members' logits there is no top-1 to select the student by"),
    "eval_on_start": (WORKS, "as in the Trainer"),
    "eval_do_concat_batches": (REFUSED_STATUS, "the population metrics need the evaluation's logits as one array"),
    "eval_use_gather_object": (WORKS, "as in the Trainer"),
    "eval_accumulation_steps": (WORKS, "as in the Trainer"),
    "include_for_metrics": (WORKS, "accepted; the population metrics use the logits and labels"),
    "batch_eval_metrics": (REFUSED_STATUS, "the population metrics and the selection need the whole evaluation"),
    "save_only_model": (WORKS, "as in the Trainer (such a checkpoint cannot be resumed)"),
    "save_strategy": (WORKS, "checkpoints hold the whole population"),
    "save_steps": (WORKS, "as in the Trainer"),
    "save_on_each_node": (WORKS, "as in the Trainer"),
    "save_total_limit": (WORKS, "as in the Trainer"),
    "enable_jit_checkpoint": (WORKS, "as in the Trainer"),
    "push_to_hub": (WORKS, "pushes the selected student folder at the end, never the population or a checkpoint"),
    "hub_token": (WORKS, "never written to a file"),
    "hub_private_repo": (WORKS, "as in the Trainer"),
    "hub_model_id": (WORKS, "the student's repo; required with push_to_hub"),
    "hub_strategy": (REFUSED_STATUS, "'checkpoint' / 'all_checkpoints' would upload the population's checkpoints: "
                     "only the student is pushed (end / every_save work)"),
    "hub_always_push": (WORKS, "no effect: checkpoints are never pushed"),
    "hub_revision": (WORKS, "the branch the student is pushed to"),
    "load_best_model_at_end": (WORKS, "with metric_for_best_model eval_top1 or eval_ensemble_top1"),
    "metric_for_best_model": (WORKS, "any logged eval metric"),
    "greater_is_better": (WORKS, "as in the Trainer"),
    "ignore_data_skip": (WORKS, "as in the Trainer"),
    "restore_callback_states_from_checkpoint": (WORKS, "the grafting counter is restored either way"),
    "full_determinism": (WORKS, "as in the Trainer; refuses cudnn_benchmark: true"),
    "seed": (WORKS, "member k is initialised with seed + 1000 k"),
    "data_seed": (WORKS, "the members' data orders and the held-out split"),
    "use_cpu": (WORKS, "as in the Trainer"),
    "accelerator_config": (WORKS, "as in the Trainer"),
    "parallelism_config": (REFUSED_STATUS, "tensor / context parallelism split one model's layers; a population is "
                           "data-parallel (DDP) or sharded with FSDP"),
    "dataloader_drop_last": (WORKS, "as in the Trainer"),
    "dataloader_num_workers": (WORKS, "0 with data_on_device"),
    "dataloader_pin_memory": (WORKS, "off with data_on_device; on CUDA, pinned batches are copied on a side stream"),
    "dataloader_persistent_workers": (WORKS, "as in the Trainer"),
    "dataloader_prefetch_factor": (WORKS, "as in the Trainer"),
    "dataloader_multiprocessing_context": (WORKS, "as in the Trainer"),
    "dataloader_in_order": (WORKS, "as in the Trainer"),
    "remove_unused_columns": (WORKS, "no effect: the datasets yield pixel_values and labels only"),
    "label_names": (REFUSED_STATUS, "the batches' labels are `labels`"),
    "train_sampling_strategy": (WORKS, "random: hf_graft's per-epoch, per-member sampler; sequential works; "
                                "group_by_length and batch_rebalance are refused (images have no length)"),
    "length_column_name": (WORKS, "no effect: see train_sampling_strategy"),
    "ddp_find_unused_parameters": (WORKS, "as in the Trainer"),
    "ddp_bucket_cap_mb": (WORKS, "as in the Trainer"),
    "ddp_broadcast_buffers": (WORKS, "as in the Trainer; BatchNorm statistics are also broadcast before a graft"),
    "ddp_static_graph": (WORKS, "as in the Trainer"),
    "ddp_backend": (WORKS, "as in the Trainer"),
    "ddp_timeout": (WORKS, "as in the Trainer"),
    "fsdp": (WORKS, "FSDP shards the members (member_execution: loop); grafting reads the shards without gathering"),
    "fsdp_config": (WORKS, "as in the Trainer"),
    "deepspeed": (REFUSED_STATUS, "not tested with a population; FSDP is the sharded set-up hf_graft supports"),
    "debug": (WORKS, "as in the Trainer"),
    "skip_memory_metrics": (WORKS, "as in the Trainer"),
    "do_train": (WORKS, "no effect, as in the Trainer (for scripts); `hf-graft train` always trains"),
    "do_eval": (WORKS, "no effect, as in the Trainer (for scripts)"),
    "do_predict": (WORKS, "no effect, as in the Trainer (for scripts)"),
    "resume_from_checkpoint": (WORKS, "read by `hf-graft train`: a folder, or true for the newest complete one"),
    "local_rank": (WORKS, "set by the launcher"),
}


def _falsy(value: Any) -> bool:
    return value in (None, False, "", [], {}, 0, "no")


# refused fields: the values that work (anything else is refused)
REFUSED: dict[str, Callable[[Any], bool]] = {
    "optim_target_modules": _falsy,
    "activation_checkpointing": _falsy,
    "activation_checkpointing_kwargs": _falsy,
    "gradient_checkpointing": _falsy,
    "gradient_checkpointing_kwargs": _falsy,
    "use_liger_kernel": _falsy,
    "liger_kernel_config": _falsy,
    "use_cache": _falsy,
    "neftune_noise_alpha": _falsy,
    "include_num_input_tokens_seen": _falsy,
    "prediction_loss_only": _falsy,
    "eval_do_concat_batches": lambda v: v is True,
    "batch_eval_metrics": _falsy,
    "hub_strategy": lambda v: str(getattr(v, "value", v)) in ("end", "every_save"),
    "parallelism_config": _falsy,
    "label_names": lambda v: v in (None, ["labels"]),
    "train_sampling_strategy": lambda v: str(v) in ("random", "sequential"),
    "deepspeed": _falsy,
}


def refused_field(args) -> tuple[str, Any, str] | None:
    """The first field of `args` set to a value that cannot work with a population: (name, value, why)."""
    for name, works in REFUSED.items():
        if hasattr(args, name) and not works(getattr(args, name)):
            return name, getattr(args, name), FIELD_NOTES[name][1]
    return None
