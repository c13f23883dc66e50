"""The model card (README.md) of an exported student, as a `huggingface_hub.ModelCard`."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from hf_graft.models.registry import architecture_note
from hf_graft.run.results import ensemble_label, format_number as _format_number
from hf_graft.data.transforms import DATA_CONFIG_KEYS
from hf_graft.utils.serialization import to_json_value

__all__ = ["PAPER_BIBTEX", "build_model_card"]

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
        pre = {k: data_config[k] for k in DATA_CONFIG_KEYS if data_config.get(k) is not None}
        if pre:
            body.append("Evaluation preprocessing (also in `config.json` → `pretrained_cfg`): "
                        + ", ".join(f"{k}={json.dumps(to_json_value(v, k))}" for k, v in pre.items()) + "\n")
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
