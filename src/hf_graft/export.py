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

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from .registry import architecture_note, check_architecture

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

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_CARD_FILE = "README.md"
EXPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE, MODEL_CARD_FILE)

TRANSFORMERS_CLASS = "TimmWrapperForImageClassification"
CARD_TAGS = ["image-classification", "timm", "filter-grafting"]
KD_CARD_TAGS = ["grafting-plus", "knowledge-distillation"]

PAPER_TITLE = "Filter Grafting for Deep Neural Networks: Reason, Method, and Cultivation"
PAPER_URL = "https://arxiv.org/abs/2004.12311"
PAPER_BIBTEX = """@article{cheng2020filter,
  title={Filter Grafting for Deep Neural Networks: Reason, Method, and Cultivation},
  author={Cheng, Hao and Meng, Fanxu and Li, Ke and Gao, Yuting and Lu, Guangming and Sun, Xing and Ji, Rongrong},
  journal={arXiv preprint arXiv:2004.12311},
  year={2020}
}"""

# timm.create_model arguments that describe how to build or load, not the network itself
_FACTORY_ONLY_ARGS = (
    "num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args",
    "checkpoint_path", "cache_dir", "scriptable", "exportable", "no_jit", "device", "dtype",
)
_DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


class PushToHubError(RuntimeError):
    """The upload of an exported student failed; the message is one line naming the repo and the cause."""


# ---------------------------------------------------------------------------------------------------- config


def _is_training_only_arg(name: str) -> bool:
    # drop rates change training, never inference; timm's own export leaves them out too
    return name in ("drop_rate", "drop_path_rate", "drop_block_rate") or name.endswith("_drop_rate")


def _to_json_value(value: Any, what: str) -> Any:
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [_to_json_value(v, what) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json_value(v, what) for k, v in value.items()}
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}={value!r} is not JSON serialisable; pass a serialisable replacement") from e
    return value


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
    args: dict[str, Any] = {}
    try:
        # timm >= 1.0.20 records factory kwargs and post-construction changes (reset_classifier, resizes)
        from timm.models._input import get_model_args
    except ImportError:  # older timm: only the caller's kwargs are known
        get_model_args = None
    if get_model_args is not None:
        args.update(get_model_args(model))
    for name, value in (model_kwargs or {}).items():
        args.setdefault(name, value)
    args = {k: v for k, v in args.items() if k not in _FACTORY_ONLY_ARGS and not _is_training_only_arg(k)}
    if args.get("features_only"):
        raise ValueError("a features_only model has no classifier to export")
    return {k: _to_json_value(v, f"model_args.{k}") for k, v in sorted(args.items())}


def _input_traits(model: nn.Module) -> dict[str, Any]:
    try:
        from timm.models._input import get_model_input_config

        return get_model_input_config(model)
    except ImportError:
        cfg = getattr(model, "pretrained_cfg", {})
        return {"input_size": tuple(cfg.get("input_size", (3, 224, 224))),
                "fixed_input_size": bool(cfg.get("fixed_input_size", False)),
                "first_conv": cfg.get("first_conv")}


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
        {k: data_config[k] for k in _DATA_CONFIG_KEYS if data_config.get(k) is not None}, model=model
    )
    input_size = [int(v) for v in data["input_size"]]
    traits = _input_traits(model)
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
    pretrained_cfg = _to_json_value(pretrained_cfg, "pretrained_cfg")

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
        inner = getattr(model, "_orig_mod", None) or (
            getattr(model, "module", None) if type(model).__name__ == "DistributedDataParallel" else None
        )
        if not isinstance(inner, nn.Module):
            return model
        model = inner


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


def _verify_folder(folder: Path, model: nn.Module, config: dict[str, Any]) -> None:
    """Rebuild the student the way each loader does and check it gives the original's logits."""
    import timm
    from safetensors.torch import load_file

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
) -> Path:
    """Write `model` as config.json + model.safetensors + README.md that timm and transformers both load.

    The files go to a temporary sibling folder, which (after `verify`: reloading it both ways and comparing
    logits) replaces `folder` in one rename; a failure leaves `folder` as it was and no temporary folder.
    An existing `folder` is only replaced if it holds nothing but a previous export.
    `card` is a `huggingface_hub.ModelCard` (see `build_model_card`) or None for a minimal card.
    """
    from safetensors.torch import save_file

    model = _unwrap(model)
    folder = Path(folder).absolute()
    _check_replaceable(folder)
    config = build_student_config(
        model, architecture=architecture, model_kwargs=model_kwargs, label_names=label_names, data_config=data_config
    )
    if card is None:
        card = _minimal_card(config["architecture"], config["label_names"])

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    backup: Path | None = None
    try:
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(_state_dict_for_file(model), str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / MODEL_CARD_FILE).write_text(str(card), encoding="utf-8")
        if verify:
            _verify_folder(staging, model, config)
        if folder.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
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


# ---------------------------------------------------------------------------------------------------- selection


def _lower_is_better(metric: str) -> bool:
    return metric.endswith("loss") or metric.endswith("error")


def select_member(
    member_metrics: Mapping[int, Mapping[str, float]],
    select_student: str | int,
    metric: str = "top1",
    *,
    num_members: int | None = None,
) -> tuple[int, str]:
    """Which member to export, and why.

    `"best"`: the member with the best eval `metric` (highest; lowest for *loss / *error metrics), ties to the
    lowest index. An int or digit string: that member, checked against 0..num_members-1 (num_members
    defaults to the number of members in `member_metrics`).
    """
    metrics = {int(k): dict(v) for k, v in member_metrics.items()}
    if isinstance(select_student, str) and select_student.strip().lower() == "best":
        scored = {k: float(m[metric]) for k, m in metrics.items() if m.get(metric) is not None}
        scored = {k: v for k, v in scored.items() if not math.isnan(v)}
        if not scored:
            available = sorted({name for m in metrics.values() for name in m})
            raise ValueError(
                f"select_student=best needs the eval metric {metric!r} for at least one member; "
                f"available metrics: {', '.join(available) or 'none'}"
            )
        sign = -1.0 if _lower_is_better(metric) else 1.0
        best = min(scored, key=lambda k: (-sign * scored[k], k))
        direction = "lowest" if sign < 0 else "highest"
        reason = (
            f"member {best} has the {direction} eval {metric} ({_format_number(scored[best])}) "
            f"of the {len(scored)} evaluated members"
        )
        tied = sorted(k for k, v in scored.items() if v == scored[best] and k != best)
        if tied:
            reason += f" (tied with member(s) {', '.join(map(str, tied))}; the lowest index wins)"
        return best, reason

    if isinstance(select_student, bool):
        raise ValueError(f"select_student must be 'best' or a member index, got {select_student!r}")
    if isinstance(select_student, int):
        index = select_student
    elif isinstance(select_student, str) and select_student.strip().isdigit():
        index = int(select_student.strip())
    else:
        raise ValueError(f"select_student must be 'best' or a member index, got {select_student!r}")
    count = num_members if num_members is not None else (max(metrics) + 1 if metrics else 0)
    if not 0 <= index < count:
        valid = f"0..{count - 1}" if count else "none known"
        raise ValueError(f"select_student={index}: no such member (members: {valid})")
    return index, f"member {index} was chosen explicitly (select_student={index})"


# ---------------------------------------------------------------------------------------------------- model card


def _format_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4f}".rstrip("0").rstrip(".") if value != 0 else "0"


def _is_hub_dataset_id(name: str | None) -> bool:
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")) or "\\" in name:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _markdown_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _metrics_table(
    member_metrics: Mapping[int, Mapping[str, float]],
    ensemble_metrics: Mapping[str, float] | None,
    selected_member: int | None,
) -> str:
    rows = {int(k): dict(v) for k, v in member_metrics.items()}
    columns: list[str] = []
    for metrics in [*rows.values(), dict(ensemble_metrics or {})]:
        columns += [c for c in metrics if c not in columns]
    if not columns:
        return "_No evaluation results were recorded with this export._\n"
    lines = ["| model | " + " | ".join(_markdown_cell(c) for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for k in sorted(rows):
        label = f"**member {k} (exported)**" if k == selected_member else f"member {k}"
        lines.append(f"| {label} | " + " | ".join(_format_number(rows[k].get(c, "")) for c in columns) + " |")
    if ensemble_metrics:
        lines.append("| ensemble of all members | "
                     + " | ".join(_format_number(ensemble_metrics.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _settings_table(settings: Mapping[str, Any]) -> str:
    lines = ["| setting | value |", "|---|---|"]
    for key, value in settings.items():
        shown = json.dumps(value) if isinstance(value, (dict, list, tuple)) else _format_number(value)
        lines.append(f"| {_markdown_cell(key)} | {_markdown_cell(shown)} |")
    return "\n".join(lines) + "\n"


def _import_banner(architecture: str) -> list[str]:
    """The card's first lines for an architecture that exists in timm only after `import hf_graft`."""
    if not architecture_note(architecture):
        return []
    return [
        f"> **Run `import hf_graft` before loading this model** (`pip install hf_graft`): `{architecture}` is "
        "registered in timm by hf_graft. Without the import, timm reports an unknown model and transformers says "
        "the architecture is not supported by your version of timm (upgrading timm does not help).\n"
    ]


def _usage_section(architecture: str, repo_id: str | None) -> str:
    needs_import = architecture.startswith("cifar_")
    timm_id = f"hf-hub:{repo_id}" if repo_id else "local-dir:path/to/this/folder"
    hf_id = repo_id or "path/to/this/folder"
    prelude = "import hf_graft  # registers the cifar_* architectures in timm\n" if needs_import else ""
    text = "## How to use\n\n"
    if needs_import:
        text += (
            f"`{architecture}` is not a built-in timm architecture: run `import hf_graft` "
            "(`pip install hf_graft`) before loading, with timm or with transformers.\n\n"
        )
    text += (
        "With timm:\n\n```python\n"
        f"{prelude}import timm\n\n"
        f'model = timm.create_model("{timm_id}", pretrained=True).eval()\n'
        "data_config = timm.data.resolve_model_data_config(model)\n"
        "transform = timm.data.create_transform(**data_config, is_training=False)\n"
        "logits = model(transform(image).unsqueeze(0))\n```\n\n"
        "With transformers:\n\n```python\n"
        f"{prelude}from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline\n\n"
        f'model = AutoModelForImageClassification.from_pretrained("{hf_id}").eval()\n'
        f'processor = AutoImageProcessor.from_pretrained("{hf_id}")\n'
        "logits = model(**processor(image, return_tensors=\"pt\")).logits\n\n"
        f'classifier = pipeline("image-classification", model="{hf_id}")\n'
        "classifier(image)\n```\n"
    )
    return text


def build_model_card(
    *,
    architecture: str,
    label_names: Sequence[str] | None,
    dataset_name: str | None,
    member_metrics: Mapping[int, Mapping[str, float]],
    ensemble_metrics: Mapping[str, float] | None,
    selected_member: int | None,
    selection_reason: str | None,
    grafting_settings: Mapping[str, Any],
    kd_settings: Mapping[str, Any] | None,
    repo_id: str | None,
    license: str | None = None,
    data_config: Mapping[str, Any] | None = None,
) -> Any:
    """The README.md of an exported student, as a `huggingface_hub.ModelCard`."""
    from huggingface_hub import ModelCard, ModelCardData

    tags = list(CARD_TAGS) + (list(KD_CARD_TAGS) if kd_settings else [])
    card_data = ModelCardData(
        library_name="timm",
        pipeline_tag="image-classification",
        tags=tags,
        datasets=[dataset_name] if _is_hub_dataset_id(dataset_name) else None,
        license=license,
    )
    title = repo_id.split("/")[-1] if repo_id else f"{architecture} (filter grafting)"
    num_members = len(member_metrics)
    dataset_text = f" on `{dataset_name}`" if dataset_name else ""
    method = "filter grafting with knowledge distillation (grafting+)" if kd_settings else "filter grafting"
    intro = (
        f"An image classifier with the timm architecture `{architecture}`, trained{dataset_text} with {method} "
        f"([Cheng et al., 2020]({PAPER_URL})): a population of "
        + (f"{num_members} " if num_members else "")
        + "networks of the same architecture is trained side by side, and every so often each network's "
        "weights are mixed with those of the next, weighted by the information (entropy) of their filters, so "
        "that filters which carry little information are revived. This repository holds one member of that "
        "population as a stand-alone timm model, loadable with timm and with transformers.\n"
    )
    body = [f"# {title}\n", *_import_banner(architecture), intro]
    if label_names:
        names = [str(n) for n in label_names]
        shown = ", ".join(f"`{n}`" for n in names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        body.append(f"Classes ({len(names)}): {shown}\n")
    if data_config:
        pre = {k: data_config[k] for k in _DATA_CONFIG_KEYS if data_config.get(k) is not None}
        if pre:
            body.append("Evaluation preprocessing (also in `config.json` → `pretrained_cfg`): "
                        + ", ".join(f"{k}={json.dumps(_to_json_value(v, k))}" for k, v in pre.items()) + "\n")
    body.append("## Evaluation results\n")
    body.append(_metrics_table(member_metrics, ensemble_metrics, selected_member))
    body.append("## Selected member\n")
    if selected_member is not None:
        body.append(f"This repository holds member {selected_member}: {selection_reason or 'no reason recorded'}.\n")
    else:
        body.append("The member that was exported was not recorded.\n")
    body.append("## Training settings\n\n### Filter grafting\n")
    body.append(_settings_table(grafting_settings) if grafting_settings else "_Not recorded._\n")
    if kd_settings:
        body.append("### Knowledge distillation (grafting+)\n")
        body.append(_settings_table(kd_settings))
    body.append(_usage_section(architecture, repo_id))
    body.append(f"## Citation\n\n{PAPER_TITLE}:\n\n```bibtex\n{PAPER_BIBTEX}\n```\n")
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body)
    return ModelCard(content)


# ---------------------------------------------------------------------------------------------------- push


def _scrub(text: str, secrets: Sequence[str | None]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    # Hub tokens have a recognisable shape; hide any that a server or library echoed back
    return re.sub(r"\bhf_[A-Za-z0-9]{30,}", "hf_***", text)


def _push_failure_cause(error: BaseException) -> str:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    text = " ".join(str(error).split()) or type(error).__name__
    if status in (401, 403):
        text = f"HTTP {status}, not authorised (check the token and its write access): {text}"
    elif status is not None and not text.startswith(str(status)):
        text = f"HTTP {status}: {text}"
    # the Hub wraps transport errors; the innermost cause says what actually went wrong
    inner = error.__cause__ or error.__context__
    if status is None and inner is not None and str(inner) and str(inner) not in text:
        text += f" ({type(inner).__name__}: {' '.join(str(inner).split())})"
    if len(text) > 400:
        text = text[:397] + "..."
    return f"{type(error).__name__}: {text}"


def _push_errors() -> tuple[type[BaseException], ...]:
    import huggingface_hub.errors as hub_errors

    errors: list[type[BaseException]] = [hub_errors.HfHubHTTPError, OSError, ValueError]
    # the HTTP client's own base error (httpx2 / httpx in huggingface_hub >= 1.0, requests before)
    client_error = getattr(hub_errors, "HTTPError", None)
    if isinstance(client_error, type) and issubclass(client_error, BaseException):
        errors.append(client_error)
    for module, name in (("httpx2", "StreamError"), ("httpx", "HTTPError"), ("httpx", "StreamError"),
                         ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def push_student(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload filter-grafted student (hf_graft)",
) -> str:
    """Upload an exported student folder (its three files, nothing else) to a Hub model repo; returns its URL.

    `token=None` uses $HF_TOKEN or the cached `hf auth login`. Any network or Hub failure raises
    `PushToHubError` with a one-line message naming the repo, with the token removed from it.
    """
    folder = Path(folder)
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: not a student export, missing {', '.join(missing)}")
    from huggingface_hub import HfApi

    secrets = [token, os.environ.get("HF_TOKEN")]
    api = None
    try:
        api = HfApi(token=token)
        repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        # the Hub may resolve an owner-less id to the token's namespace
        target = getattr(repo_url, "repo_id", None) or repo_id
        api.upload_folder(
            repo_id=target,
            folder_path=str(folder),
            repo_type="model",
            commit_message=commit_message,
            allow_patterns=list(EXPORT_FILES),
        )
    except _push_errors() as error:
        endpoint = getattr(api, "endpoint", None)
        where = f" ({endpoint})" if endpoint else ""
        message = f"could not push {folder} to the Hub repo {repo_id}{where}: {_push_failure_cause(error)}"
        raise PushToHubError(_scrub(message, secrets)) from None
    return str(repo_url)


# ---------------------------------------------------------------------------------------------------- CLI


def _load_member_metrics(path: str | os.PathLike) -> dict[int, dict[str, float]]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {int(k): {str(m): float(v) for m, v in metrics.items()} for k, metrics in data.items()}


def _check_member(checkpoint_dir: Path, member: int):
    """The checkpoint's spec, after the cheap checks (files present, member in range)."""
    from .population import POPULATION_META_FILE, PopulationSpec

    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint_dir}: no such checkpoint folder")
    if not (checkpoint_dir / POPULATION_META_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: no {POPULATION_META_FILE}; is it a hf_graft training checkpoint?")
    if not (checkpoint_dir / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: no {WEIGHTS_FILE}")
    spec = PopulationSpec.load(checkpoint_dir)
    if isinstance(member, bool) or not 0 <= int(member) < spec.num_students:
        raise ValueError(f"member {member}: out of range, {checkpoint_dir} holds members 0..{spec.num_students - 1}")
    return spec


def _export_member(
    checkpoint_dir: Path,
    member: int,
    out: str | os.PathLike,
    repo_id: str | None,
    member_metrics: Mapping[int, Mapping[str, float]] | None,
) -> Path:
    from .population import load_checkpoint_members

    spec = _check_member(checkpoint_dir, member)
    _check_replaceable(Path(out).absolute())
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
) -> Path:
    """Export member `member` of a training checkpoint to `out`, and push it when `push_to_hub` names a repo.

    A failed push raises `PushToHubError` and leaves the written folder in place.
    """
    folder = _export_member(Path(checkpoint_dir), member, out, push_to_hub, member_metrics)
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
    parser.add_argument("--out", required=True, help="folder to write (replaced if it holds a previous export)")
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
        print(f"{prog}: error: {_scrub(' '.join(str(message).split()), [token])}", file=sys.stderr)
        return code

    # bad input is reported before any model is loaded
    try:
        _check_member(Path(args.checkpoint_dir), args.member)
        _check_replaceable(Path(args.out).absolute())
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
        folder = _export_member(Path(args.checkpoint_dir), args.member, args.out, args.push_to_hub, metrics)
    except (OSError, ValueError, RuntimeError) as e:
        return fail(1, f"export failed: {e}")
    print(f"wrote {folder}")
    if args.push_to_hub:
        try:
            url = push_student(folder, args.push_to_hub, token=token, private=args.private)
        except PushToHubError as e:
            return fail(1, f"{e}; the exported folder is kept")
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
