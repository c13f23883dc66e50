"""The selected student as a folder that both timm and transformers load, its model card, and the Hub push.

Folder layout written by `save_student` (exactly three files)::

    config.json        timm's hub config + the keys transformers' TimmWrapper reads
    model.safetensors  the plain timm state dict (no key prefix)
    README.md          the model card

Why one folder satisfies both loaders (timm 1.0.x, transformers 5.x):

* timm (`create_model("local-dir:DIR" | "hf-hub:REPO", pretrained=True)`) reads `architecture`,
  `num_classes`, `label_names`, `model_args` and `pretrained_cfg` from config.json. `model_args` must be a
  dict when present (timm calls `.get` on it, so the `"model_args": null` written by transformers'
  `save_pretrained` breaks it), and every key of `pretrained_cfg` must be a `timm.models.PretrainedCfg`
  field. The weights file is loaded with `load_state_dict(strict=True)`, so its keys must be the bare
  timm keys (transformers' `save_pretrained` writes them under `timm_model.`).
* transformers (`TimmWrapperForImageClassification`) builds `timm.create_model(architecture,
  num_classes=num_labels, **model_args)`: it passes `num_classes` itself, so `model_args` must NOT contain
  `num_classes` (timm's `save_for_hf` puts it there, which raises "got multiple values for keyword
  argument 'num_classes'"). It never reads `pretrained_cfg` for the architecture, so anything that changes
  the network (in_chans, global_pool, img_size of fixed-size models, the training kwargs) must be in
  `model_args`. Weights without a prefix are fine: its conversion mapping adds `timm_model.` on load.
  `model_type: timm_wrapper` selects the class; `label_names` gives `id2label`/`label2id` (written too).
* the image-classification pipeline finds `TimmWrapperImageProcessor` through `model_type`, reads
  config.json (never a preprocessor_config.json) and builds timm's eval transform from `pretrained_cfg`
  (input_size, interpolation, mean, std, crop_pct, crop_mode), the same transform the training evaluation
  used.

`save_student` checks this on the folder it writes (reloaded both ways, logits compared) before moving the
folder into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from hf_graft.data.transforms import DATA_CONFIG_KEYS
from hf_graft.export.model_card import build_model_card
from hf_graft.models.registry import architecture_note, check_architecture
from hf_graft.utils.files import (
    CONFIG_FILE, EXPORT_BACKUP_TAG, EXPORT_FILES, EXPORT_STAGING_TAG, MODEL_CARD_FILE, WEIGHTS_FILE,
)
from hf_graft.utils.serialization import to_json_value
from hf_graft import _compat

__all__ = [
    "CONFIG_FILE", "EXPORT_FILES", "MODEL_CARD_FILE", "WEIGHTS_FILE", "build_student_config", "describe_non_finite",
    "non_finite_tensors", "save_student",
]


TRANSFORMERS_CLASS = "TimmWrapperForImageClassification"

# timm.create_model arguments that describe how to build or load, not the network itself
_FACTORY_ONLY_ARGS = (
    "num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args",
    "checkpoint_path", "cache_dir", "scriptable", "exportable", "no_jit", "device", "dtype",
)


# ---------------------------------------------------------------------------------------------------- config


def _is_training_only_arg(name: str) -> bool:
    # drop rates change training, never inference; timm's own export leaves them out too
    return name in ("drop_rate", "drop_path_rate", "drop_block_rate") or name.endswith("_drop_rate")


def _registry_name(architecture: str) -> str:
    from timm.models import parse_model_name, split_model_name_tag

    source, name = parse_model_name(architecture)
    if source is not None:
        raise ValueError(f"architecture must be a timm registry name, not a {source}: id ({architecture!r})")
    name, _tag = split_model_name_tag(name)
    check_architecture(name, "export")
    return name


def _reconstruction_args(model: nn.Module, model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """timm.create_model kwargs (besides num_classes) that rebuild this exact network."""
    # timm records the factory kwargs and post-construction changes (reset_classifier, resizes)
    args: dict[str, Any] = _compat.model_args(model)
    for name, value in (model_kwargs or {}).items():
        args.setdefault(name, value)
    args = {k: v for k, v in args.items() if k not in _FACTORY_ONLY_ARGS and not _is_training_only_arg(k)}
    if args.get("features_only"):
        raise ValueError("a features_only model has no classifier to export")
    return {k: to_json_value(v, f"model_args.{k}") for k, v in sorted(args.items())}


def build_student_config(
    model: nn.Module,
    *,
    architecture: str,
    model_kwargs: Mapping[str, Any] | None = None,
    label_names: Sequence[str] | None = None,
    data_config: Mapping[str, Any],
) -> dict[str, Any]:
    """The config.json content (see the module docstring for what each loader needs from it)."""
    from timm.data import resolve_data_config

    name = _registry_name(architecture)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes <= 0:
        raise ValueError(f"{name}: the model has no classifier head (num_classes={num_classes})")
    if label_names is None:
        label_names = [f"LABEL_{i}" for i in range(num_classes)]
    label_names = [str(n) for n in label_names]
    if len(label_names) != num_classes:
        raise ValueError(f"{len(label_names)} label_names for a model with {num_classes} classes")

    # gaps in the training data config are filled from the model's own pretrained_cfg, as timm does
    data = resolve_data_config(
        {k: data_config[k] for k in DATA_CONFIG_KEYS if data_config.get(k) is not None}, model=model
    )
    input_size = [int(v) for v in data["input_size"]]
    traits = _compat.model_input_config(model)
    if traits["fixed_input_size"] and list(traits["input_size"][1:]) != input_size[1:]:
        raise ValueError(
            f"{name} takes fixed {tuple(traits['input_size'][1:])} inputs, data_config says {tuple(input_size[1:])}"
        )
    source_cfg = getattr(model, "pretrained_cfg", {}) or {}
    pretrained_cfg: dict[str, Any] = {
        "input_size": input_size,
        "fixed_input_size": bool(traits["fixed_input_size"]),
        "interpolation": str(data["interpolation"]),
        "crop_pct": float(data["crop_pct"]),
        "crop_mode": str(data["crop_mode"]),
        "mean": [float(v) for v in data["mean"]],
        "std": [float(v) for v in data["std"]],
        "num_classes": num_classes,
        # kept so that timm can swap the head / stem when fine-tuning from this folder
        "first_conv": traits.get("first_conv") or source_cfg.get("first_conv"),
        "classifier": source_cfg.get("classifier"),
        "custom_load": False,
    }
    pretrained_cfg = to_json_value(pretrained_cfg, "pretrained_cfg")

    config: dict[str, Any] = {
        **architecture_note(name),  # first: the first thing a reader of config.json sees (cifar_* need hf_graft)
        # timm's hub config
        "architecture": name,
        "num_classes": num_classes,
        "num_features": int(getattr(model, "num_features", 0) or 0),
        "label_names": label_names,
        "model_args": _reconstruction_args(model, model_kwargs),
        "pretrained_cfg": pretrained_cfg,
        # transformers' TimmWrapperConfig
        "model_type": "timm_wrapper",
        "architectures": [TRANSFORMERS_CLASS],
        "id2label": {str(i): n for i, n in enumerate(label_names)},
    }
    if len(set(label_names)) == len(label_names):
        config["label2id"] = {n: i for i, n in enumerate(label_names)}
    return config


# ---------------------------------------------------------------------------------------------------- saving


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile and DDP wrappers prefix the state dict keys; the export holds the bare timm model
    while True:
        inner = _compat.unwrap_compiled(model) or (
            getattr(model, "module", None) if type(model).__name__ == "DistributedDataParallel" else None
        )
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def non_finite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of a state dict that hold nan or inf."""
    return [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def describe_non_finite(names: Sequence[str], total: int) -> str:
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
    return f"{len(names)} of {total} tensors hold non-finite values (nan or inf): {shown}"


def _state_dict_for_file(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage and wants contiguous CPU memory; half-precision
    # weights are stored as float32, the dtype both loaders build the network in
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu", copy=True)
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        state[name] = tensor.contiguous()
    return state


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Raise a library's logger to WARNING for the duration."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.setLevel(level)


def _verify_folder(folder: Path, model: nn.Module, config: dict[str, Any]) -> None:
    """Rebuild the student the way each loader does and check it gives the original's logits."""
    import timm
    from safetensors.torch import load_file

    with _quiet("timm"):  # its "Loading pretrained weights from <staging folder>" says nothing to the user
        via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    # what TimmWrapperForImageClassification does: registry defaults + num_classes + model_args
    via_transformers = timm.create_model(
        config["architecture"], pretrained=False, num_classes=config["num_classes"], **config["model_args"]
    ).eval()
    via_transformers.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *config["pretrained_cfg"]["input_size"], generator=generator)
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = model(x.to(device, dtype)).float().cpu()
            outputs = {"timm local-dir": via_timm(x), "transformers TimmWrapper": via_transformers(x)}
    finally:
        model.train(was_training)
    problems = []
    # both rebuilds run on CPU in float32, the same computation: they must agree exactly
    if not torch.allclose(outputs["timm local-dir"], outputs["transformers TimmWrapper"], rtol=1e-6, atol=1e-6):
        problems.append("the timm and transformers rebuilds disagree")
    # the original may run elsewhere (GPU kernels, TF32, half precision): allow for that, not for another network
    exact = device.type == "cpu" and dtype == torch.float32
    tol = 1e-5 if exact else (2e-2 if dtype == torch.float32 else 1e-1)
    scale = float(reference.abs().max()) + 1.0
    for loader, logits in outputs.items():
        if logits.shape != reference.shape or not torch.allclose(logits, reference, rtol=tol, atol=tol * scale):
            problems.append(f"the {loader} rebuild does not reproduce the model's logits")
    if problems:
        raise RuntimeError(
            f"{folder}: {'; '.join(problems)} ({config['architecture']}, model_args {config['model_args']})"
        )


def _check_replaceable(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder")
    if folder.is_dir():
        # replacing is only safe for a previous export; never delete an unrelated folder (e.g. --out .)
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in EXPORT_FILES)
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise FileExistsError(
                f"{folder}: exists and holds files that are not a student export ({shown}); choose another folder"
            )


def _minimal_card(architecture: str, label_names: Sequence[str]) -> Any:
    return build_model_card(
        architecture=architecture,
        label_names=label_names,
        dataset_name=None,
        member_metrics={},
        ensemble_metrics=None,
        selected_member=None,
        selection_reason=None,
        grafting_settings={},
        kd_settings=None,
        repo_id=None,
    )


def save_student(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    architecture: str,
    model_kwargs: Mapping[str, Any] | None = None,
    label_names: Sequence[str] | None = None,
    data_config: Mapping[str, Any],
    card: Any = None,
    verify: bool = True,
    replace: bool = False,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` as config.json + model.safetensors + README.md that timm and transformers both load.

    The files go to a temporary sibling folder, which (after `verify`: reloading it both ways and comparing
    logits) replaces `folder` in one rename; a failure leaves `folder` as it was and no temporary folder.
    An existing `folder` is only replaced if it holds nothing but a previous export.
    `card` is a `huggingface_hub.ModelCard` (see `build_model_card`) or None for a minimal card.
    `replace=True` replaces any existing `folder` as a whole; `source` is recorded in config.json as the
    checkpoint it was exported from (see export_target.py). Files get the permissions of the umask.
    """
    from safetensors.torch import save_file

    from hf_graft.export.target import EXPORT_SOURCE_KEY, apply_default_permissions

    model = _unwrap(model)
    folder = Path(folder).absolute()
    if not replace:
        _check_replaceable(folder)
    state = model.state_dict()
    broken = non_finite_tensors(state)
    if broken:  # a diverged network: no loader could be checked against it, and no one should use it
        raise ValueError(f"{folder}: not written: {describe_non_finite(broken, len(state))}; the network diverged")
    config = build_student_config(
        model, architecture=architecture, model_kwargs=model_kwargs, label_names=label_names, data_config=data_config
    )
    if source:
        config[EXPORT_SOURCE_KEY] = dict(source)
    if card is None:
        card = _minimal_card(config["architecture"], config["label_names"])

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}{EXPORT_STAGING_TAG}", dir=folder.parent))
    backup: Path | None = None
    try:
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(_state_dict_for_file(model), str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / MODEL_CARD_FILE).write_text(str(card), encoding="utf-8")
        if verify:
            _verify_folder(staging, model, config)
        apply_default_permissions(staging)
        if folder.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{folder.name}{EXPORT_BACKUP_TAG}", dir=folder.parent))
            backup.rmdir()  # only the unique name is wanted: rename needs a free target
            os.replace(folder, backup)
        os.replace(staging, folder)
    except BaseException:
        if backup is not None and backup.exists() and not folder.exists():
            os.replace(backup, folder)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return folder
