"""The model card (README.md) of an exported student, as a `huggingface_hub.ModelCard`: its metadata (license,
base model, dataset, the evaluation results the Hub reads) and text, from `model_card_template.md`.

Pure functions of what the writer passes; `framework_versions` reads the installed versions."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from hf_graft.models.registry import architecture_note
from hf_graft.run.results import ensemble_label, format_number as _format_number
from hf_graft.data.reid import REID_LAYOUTS
from hf_graft.data.transforms import DATA_CONFIG_KEYS
from hf_graft.utils.serialization import to_json_value

__all__ = [
    "PAPER_BIBTEX", "TEMPLATE_PATH", "accuracy_results", "base_model_id", "build_model_card", "framework_versions",
    "reid_results",
]

CARD_TAGS = ["image-classification", "timm", "filter-grafting"]
KD_CARD_TAGS = ["grafting-plus", "knowledge-distillation"]
REID_CARD_TAGS = ["image-feature-extraction", "timm", "filter-grafting", "person-reid"]
# the Hub's task of a student, by DataArguments.task: a re-identification student is used for its features
TASK_TYPES = {"classification": "image-classification", "reid": "image-feature-extraction"}
ACCURACY_METRIC = "accuracy"  # the `evaluate` metric id the Hub lists
TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")

PAPER_TITLE = "Filter Grafting for Deep Neural Networks: Reason, Method, and Cultivation"
PAPER_URL = "https://arxiv.org/abs/2004.12311"
PAPER_BIBTEX = """@article{cheng2020filter,
  title={Filter Grafting for Deep Neural Networks: Reason, Method, and Cultivation},
  author={Cheng, Hao and Meng, Fanxu and Li, Ke and Gao, Yuting and Lu, Guangming and Sun, Xing and Ji, Rongrong},
  journal={arXiv preprint arXiv:2004.12311},
  year={2020}
}"""


def _is_local_path(name: str) -> bool:
    return os.path.exists(name) or name.startswith((".", "/", "~")) or "\\" in name


def _is_hub_repo_id(name: str | None) -> bool:
    """A dataset or model name that is a Hub repo id (not a local folder)."""
    if not name or _is_local_path(name):
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
    ensemble_metrics = dict(ensemble_metrics or {})
    ensemble_members = ensemble_metrics.pop("members", None)
    columns: list[str] = []
    for metrics in [*rows.values(), ensemble_metrics]:
        columns += [c for c in metrics if c not in columns]
    if not columns:
        return "_No evaluation results were recorded with this export._\n"
    lines = ["| model | " + " | ".join(_markdown_cell(c) for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for k in sorted(rows):
        label = f"**member {k} (exported)**" if k == selected_member else f"member {k}"
        lines.append(f"| {label} | " + " | ".join(_format_number(rows[k].get(c, "")) for c in columns) + " |")
    if ensemble_metrics:
        lines.append(f"| {ensemble_label(ensemble_members)} | "
                     + " | ".join(_format_number(ensemble_metrics.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _settings_table(settings: Mapping[str, Any]) -> str:
    lines = ["| setting | value |", "|---|---|"]
    for key, value in settings.items():
        shown = json.dumps(value) if isinstance(value, (dict, list, tuple)) else _format_number(value)
        lines.append(f"| {_markdown_cell(key)} | {_markdown_cell(shown)} |")
    return "\n".join(lines) + "\n"


def _evaluations_table(evaluations: Sequence[Mapping[str, Any]], selected_member: int | None,
                       metric: str = "top1") -> str:
    """One row per logged evaluation: its epoch and step, each member's `metric` and the ensemble's."""
    columns: list[str] = []
    for row in evaluations:
        columns += [c for c in row if c not in ("epoch", "step") and c not in columns]
    if not columns:
        return ""

    def label(column: str) -> str:
        name = column.removesuffix(f"_{metric}")
        if name.startswith("member") and name[6:].isdigit():
            k = int(name[6:])
            return f"member {k} (exported)" if k == selected_member else f"member {k}"
        return name

    lines = ["| epoch | step | " + " | ".join(label(c) for c in columns) + " |", "|---:|---:|" + "---:|" * len(columns)]
    for row in evaluations:
        epoch = row.get("epoch")
        shown = [f"{epoch:.2f}".rstrip("0").rstrip(".") if isinstance(epoch, float) else _format_number(epoch or ""),
                 _format_number(row.get("step", "")), *(_format_number(row.get(c, "")) for c in columns)]
        lines.append("| " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def _dataset_label(name: str) -> str:
    """How the card names a dataset: a Hub id as it is, a local folder by its own name."""
    return Path(name.rstrip("/\\")).name if _is_local_path(name) else name


def _plain_split(split: str | None) -> str | None:
    # a held-out part ("10% of 'train' held out (seed 0)") is described in the text, not as a split name
    return split if split and re.fullmatch(r"[\w.\-]+", split) else None


def base_model_id(student_model: str, pretrained_cfg: Mapping[str, Any] | None) -> str | None:
    """The Hub repo of the weights a pretrained student started from: the hf_hub_id timm gives for its
    pretrained tag, else the model name when it is a Hub id (`hf-hub:` removed); None for a local folder."""
    hub_id = (pretrained_cfg or {}).get("hf_hub_id")
    if hub_id:
        return str(hub_id)
    name = student_model.removeprefix("hf-hub:")
    if name.startswith("local-dir:") or _is_local_path(name):
        return None
    return name if _is_hub_repo_id(name) else None


def accuracy_results(metrics: Mapping[str, float] | None) -> list[tuple[str, str, float]]:
    """(metric_type, metric_name, value) of a classifier's top-1 and top-5, as the evaluation logged them (%)."""
    metrics = metrics or {}
    results = []
    if metrics.get("top1") is not None:
        results.append((ACCURACY_METRIC, "top-1 accuracy (%)", float(metrics["top1"])))
    if metrics.get("top5") is not None:
        results.append((ACCURACY_METRIC, "top-5 accuracy (%)", float(metrics["top5"])))
    return results


def reid_results(metrics: Mapping[str, float] | None) -> list[tuple[str, str, float]]:
    """(metric_type, metric_name, value) of a re-identification model's mAP and CMC rank-1, as the evaluation
    logged them (%)."""
    metrics = metrics or {}
    names = (("mAP", "mAP", "mAP (%)"), ("rank1", "rank-1", "rank-1 (%)"))
    return [(metric_type, label, float(metrics[key])) for key, metric_type, label in names
            if metrics.get(key) is not None]


def framework_versions() -> list[tuple[str, str]]:
    """The installed versions of hf_graft and the libraries it trains and exports with."""
    from importlib.metadata import PackageNotFoundError, version

    import hf_graft

    found = [("hf_graft", hf_graft.__version__)]
    for label, package in (("PyTorch", "torch"), ("timm", "timm"), ("Transformers", "transformers"),
                           ("Accelerate", "accelerate"), ("Datasets", "datasets")):
        try:
            found.append((label, version(package)))
        except PackageNotFoundError:
            pass
    return found


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
    base_model: str | None = None,
    eval_split: str | None = None,
    eval_results: Sequence[tuple[str, str, float]] | None = None,
    task_type: str | None = None,
    task: str = "classification",
    hyperparameters: Mapping[str, Any] | None = None,
    evaluations: Sequence[Mapping[str, Any]] | None = None,
    versions: Sequence[tuple[str, str]] | None = None,
) -> Any:
    """The README.md of an exported student, as a `huggingface_hub.ModelCard` (from `model_card_template.md`).

    `eval_results` are (metric_type, metric_name, value) of the exported member on the evaluation split, the
    results the Hub reads (default: its top-1 and top-5 from `member_metrics`, or its mAP and rank-1), under
    `task_type` (default: the Hub task of `task`); `evaluations` are the rows of `RunRecords.evaluations`;
    `versions` are (library, version) pairs (see `framework_versions`). `task` "reid": the card of a
    re-identification embedding model (its features, not its classes, are what it is for).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    reid = task == "reid"
    task_type = task_type or TASK_TYPES[task]
    if eval_results is None:
        selected = member_metrics.get(selected_member) if selected_member is not None else None
        eval_results = reid_results(selected) if reid else accuracy_results(selected)
    title = repo_id.split("/")[-1] if repo_id else f"{architecture} (filter grafting)"
    dataset_label = _dataset_label(dataset_name) if dataset_name else None
    results = [
        EvalResult(task_type=task_type, dataset_type=dataset_label, dataset_name=dataset_label,
                   dataset_split=_plain_split(eval_split), metric_type=metric_type, metric_name=metric_name,
                   metric_value=value)
        for metric_type, metric_name, value in (eval_results if dataset_label else ())
    ]
    card_data = ModelCardData(
        library_name="timm",
        pipeline_tag=TASK_TYPES[task],
        tags=list(REID_CARD_TAGS if reid else CARD_TAGS) + (list(KD_CARD_TAGS) if kd_settings else []),
        license=license,
        base_model=base_model,
        # a re-identification folder layout's name (market1501) is not a Hub dataset
        datasets=[dataset_name] if _is_hub_repo_id(dataset_name) and dataset_name not in REID_LAYOUTS else None,
        metrics=list(dict.fromkeys(r.metric_type for r in results)) or None,
        eval_results=results or None,
        model_name=title if results else None,
    )
    names = [str(n) for n in label_names or []]
    pre = {k: data_config[k] for k in DATA_CONFIG_KEYS if (data_config or {}).get(k) is not None}
    if selected_member is not None:
        selection = f"This repository holds member {selected_member}: {selection_reason or 'no reason recorded'}."
    else:
        selection = "The member that was exported was not recorded."
    evaluated_on = None
    if dataset_label:
        evaluated_on = (f"the `{eval_split}` split of `{dataset_label}`" if _plain_split(eval_split)
                        else f"{eval_split} of `{dataset_label}`" if eval_split else f"`{dataset_label}`")
    needs_hf_graft = bool(architecture_note(architecture))
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=title,
        architecture=architecture,
        needs_hf_graft=needs_hf_graft,
        base_model=base_model,
        dataset_name=dataset_name,
        method="filter grafting with knowledge distillation (grafting+)" if kd_settings else "filter grafting",
        paper_url=PAPER_URL,
        num_members=len(member_metrics),
        num_classes=len(names),
        classes=", ".join(f"`{n}`" for n in names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else ""),
        preprocessing=", ".join(f"{k}={json.dumps(to_json_value(v, k))}" for k, v in pre.items()),
        evaluated_on=evaluated_on,
        metrics_table=_metrics_table(member_metrics, ensemble_metrics, selected_member).rstrip(),
        evaluations_table=_evaluations_table(evaluations or [], selected_member, "mAP" if reid else "top1").rstrip(),
        reid=reid,
        selection=selection,
        hyperparameters=[(name, _format_number(value)) for name, value in (hyperparameters or {}).items()],
        grafting_table=_settings_table(grafting_settings).rstrip() if grafting_settings else "_Not recorded._",
        kd_table=_settings_table(kd_settings).rstrip() if kd_settings else "",
        prelude="import hf_graft  # registers the cifar_* architectures in timm\n" if needs_hf_graft else "",
        timm_id=f"hf-hub:{repo_id}" if repo_id else "local-dir:path/to/this/folder",
        hf_id=repo_id or "path/to/this/folder",
        framework_versions=list(versions or []),
        paper_title=PAPER_TITLE,
        paper_bibtex=PAPER_BIBTEX,
    )
