"""Every TrainingArguments field is honoured or refused, and the reference pages are current."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
from transformers import TrainingArguments

from hf_graft.config import ConfigError, GraftingConfig
from hf_graft.trainer_fields import FIELD_NOTES, REFUSED

ROOT = Path(__file__).resolve().parents[1]

# one value each refused field cannot take
BAD_VALUES = {
    "optim_target_modules": ["attn"],
    "activation_checkpointing": True,
    "activation_checkpointing_kwargs": {"use_reentrant": False},
    "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "use_liger_kernel": True,
    "liger_kernel_config": {"rope": True},
    "use_cache": True,
    "neftune_noise_alpha": 5.0,
    "include_num_input_tokens_seen": "all",
    "prediction_loss_only": True,
    "eval_do_concat_batches": False,
    "batch_eval_metrics": True,
    "hub_strategy": "all_checkpoints",
    "parallelism_config": {"tp_size": 2},
    "label_names": ["target"],
    "train_sampling_strategy": "group_by_length",
    "deepspeed": "ds_config.json",
}


def test_every_field_of_the_installed_transformers_is_listed():
    names = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    missing = [n for n in names if n not in FIELD_NOTES]
    assert missing == [], f"TrainingArguments fields without an entry in hf_graft/trainer_fields.py: {missing}"


def test_refused_fields_have_a_refusal_rule():
    # a field marked refused refuses every value but the one that works; a working field may refuse some values
    refused = {name for name, (status, _) in FIELD_NOTES.items() if status == "refused"}
    assert refused <= set(REFUSED) and set(REFUSED) == set(BAD_VALUES)


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_a_refused_field_is_one_line_naming_it(name):
    if name not in {f.name for f in dataclasses.fields(TrainingArguments)}:
        pytest.skip(f"{name} is not a field of this transformers")
    with pytest.raises(ConfigError) as err:
        GraftingConfig(output_dir="unused", use_cpu=True, report_to="none", **{name: BAD_VALUES[name]})
    message = str(err.value)
    assert message.startswith(f"GraftingConfig.{name}: got ") and "\n" not in message


def test_the_defaults_and_the_working_values_are_accepted():
    GraftingConfig(output_dir="unused", use_cpu=True, report_to="none", hub_strategy="end",
                   train_sampling_strategy="sequential", label_names=["labels"])


def test_reference_pages_are_current():
    spec = importlib.util.spec_from_file_location("make_reference", ROOT / "scripts" / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, render in module.PAGES.items():
        page = ROOT / "docs" / "reference" / name
        assert page.read_text() == getattr(module, render)(), f"{page} is stale: run python scripts/make_reference.py"
