"""`hf-graft evaluate`: top-1/top-5 (and any `evaluate` metric) of one image classifier on an image dataset,
or mAP and CMC rank-k of a re-identification model's features (`--task reid`).

    hf-graft evaluate MODEL --dataset_name NAME [--split S] [--extra_metrics M ...] [--json F]
                      [--batch_size N] [--max_samples N]
    hf-graft evaluate MODEL --task reid --dataset_name market1501 --data_dir DIR [--json F]

MODEL is an exported student folder, one member of a training checkpoint (`checkpoint-N#K` or
`checkpoint-N#memberK`), a timm model name (with its pretrained weights), an `hf-hub:` / `local-dir:` id,
or a transformers image-classification folder. The dataset is read as the trainer reads it (the same
column detection, and by default the same evaluation split), and images get the model's own evaluation
transform: timm's, from the model's data config (a checkpoint's: the one it was trained with), or the
transformers image processor of the folder. With `--task reid` the query split ranks the gallery split
by the model's pre-logits features (`data.reid` reads the dataset as training does; `metrics.reid_metrics`).
"""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from hf_graft.cli.arguments import ArgumentsError, CommandLineParser, command_parser, parse_arguments
from hf_graft.errors import HfGraftError, one_line
from hf_graft.utils.files import CONFIG_FILE

__all__ = ["EvaluateArguments", "EvaluationError", "LoadedModel", "build_parser", "evaluate_model",
           "evaluate_reid_model", "load_model", "main"]

PROG = "hf-graft evaluate"


class EvaluationError(HfGraftError, ValueError):
    """A model or dataset that cannot be evaluated; the message is one line."""


@dataclass
class LoadedModel:
    """A classifier ready for evaluation: `forward(pixel_values) -> logits`, its eval transform, its classes."""

    name: str
    module: Any  # torch.nn.Module
    transform: Callable  # PIL image -> [C, H, W] tensor
    num_classes: int
    label_names: list[str] | None
    library: str  # "timm" | "transformers"

    def logits(self, pixel_values):
        out = self.module(pixel_values)
        return out.logits if hasattr(out, "logits") else out

    def features(self, pixel_values):
        """The pre-logits features timm's `forward_head(..., pre_logits=True)` gives (what re-identification
        ranks by); a transformers folder must wrap a timm model (`TimmWrapper...`)."""
        model = self.module if self.library == "timm" else getattr(self.module, "timm_model", None)
        if model is None:
            raise EvaluationError(f"{self.name}: --task reid takes the features of a timm model; this transformers "
                                  f"model ({type(self.module).__name__}) has none")
        return model.forward_head(model.forward_features(pixel_values), pre_logits=True)


def _timm_transform(data_config: dict[str, Any]) -> Callable:
    from hf_graft.config import DataArguments
    from hf_graft.data.transforms import build_transform

    # the evaluation transform of training (timm's create_transform for this data config)
    return build_transform(data_config, DataArguments(), is_training=False)


def _from_timm(name: str, model, data_config: dict[str, Any] | None, label_names) -> LoadedModel:
    from hf_graft.data.transforms import resolve_student_data_config

    model.eval()
    config = dict(data_config) if data_config else resolve_student_data_config(model)
    names = label_names if label_names is not None else (getattr(model, "pretrained_cfg", {}) or {}).get("label_names")
    return LoadedModel(name, model, _timm_transform(config), int(model.num_classes),
                       [str(n) for n in names] if names else None, "timm")


def _is_timm_folder(folder: Path) -> bool:
    """timm's hub layout (config.json with `architecture`); folders written by transformers'
    save_pretrained (`model_args: null`, prefixed weights) load through transformers instead."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{folder}/config.json: cannot read it ({error})") from None
    if not isinstance(config, dict):
        raise EvaluationError(f"{folder}/config.json: not a JSON object")
    return "architecture" in config and ("model_type" not in config or isinstance(config.get("model_args"), dict))


def _from_transformers(folder: Path, name: str) -> LoadedModel:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    processor = AutoImageProcessor.from_pretrained(str(folder))

    def transform(image):
        return processor(image, return_tensors="pt")["pixel_values"][0]

    id2label = getattr(model.config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label)] if id2label else None
    return LoadedModel(name, model, transform, int(model.config.num_labels), names, "transformers")


def load_model(spec: str) -> LoadedModel:
    """Resolve and load MODEL (see the module docstring); one-line EvaluationError on anything unusable."""
    import timm

    from hf_graft.population.sources import ModelSourceError, resolve_model_source
    from hf_graft.models.registry import check_folder_architecture

    try:
        source = resolve_model_source(spec)
    except ModelSourceError as error:
        raise EvaluationError(str(error)) from None
    if source.kind == "checkpoint":
        from hf_graft.population.students import load_checkpoint_members

        if source.member is None:
            raise EvaluationError(f"{spec!r}: a training checkpoint holds several members; pick one with {spec}#K")
        checkpoint = load_checkpoint_members(source.location, [source.member])
        population_spec, (member,) = checkpoint
        return _from_timm(spec, member, population_spec.data_config, population_spec.label_names)
    if source.kind == "folder":
        folder = Path(source.location)
        if not _is_timm_folder(folder):
            return _from_transformers(folder, spec)
        check_folder_architecture(folder, spec)
        return _from_timm(spec, timm.create_model(f"local-dir:{folder.absolute()}", pretrained=True), None, None)
    try:  # a timm name or an hf-hub: id: evaluating needs its trained weights
        model = timm.create_model(source.location, pretrained=True)
    except Exception as error:  # no weights here (offline, unknown repo, ...): say which model and why
        lines = str(error).strip().splitlines()
        cause = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        raise EvaluationError(f"{spec!r}: cannot load its trained weights ({cause})") from None
    return _from_timm(spec, model, None, None)


def _label_map(model: LoadedModel, data_names: list[str]) -> list[int] | None:
    """Dataset class index -> model class index, when both name their classes in different orders."""
    if model.num_classes < len(data_names):
        raise EvaluationError(
            f"{model.name}: predicts {model.num_classes} classes, the dataset's labels have {len(data_names)}"
        )
    names = model.label_names
    if not names or names[: len(data_names)] == data_names or not set(data_names) <= set(names):
        return None
    return [names.index(n) for n in data_names]


def _names_differ(model: LoadedModel, data_names: list[str]) -> str | None:
    """A warning when the model and the dataset both name their classes and the dataset's names are not
    among the model's: the labels are then compared by class index alone."""
    names = model.label_names
    if not names or data_names == [str(i) for i in range(len(data_names))] or set(data_names) <= set(names):
        return None

    def shown(values):
        more = f", ... ({len(values)} in all)" if len(values) > 6 else ""
        return "{" + ", ".join(map(repr, values[:6])) + more + "}"

    missing = [n for n in data_names if n not in set(names)]
    return (f"the dataset's class names {shown(data_names)} are not the model's {shown(names)} ({len(missing)} of "
            f"{len(data_names)} are not among them): labels are compared by class index, which is right only if "
            "both list the same classes in the same order")


def evaluate_model(
    model: str | LoadedModel,
    data_args,
    *,
    extra_metrics: Sequence[str] | None = None,
    extra_metric_kwargs: dict[str, dict] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    seed: int = 42,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate `model` (a MODEL string or a LoadedModel) on the evaluation split of `data_args`.

    Returns {"model", "dataset", "split", "num_examples", "top1", "top5", <extra metric results>}, and
    "warning" when the dataset's class names are not the model's (`_names_differ`).
    `seed` picks the held-out part when the dataset has no evaluation split (use the training run's).
    """
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, default_collate
    from tqdm.auto import tqdm

    from hf_graft.data.sampling import MemberOrderDataset
    from hf_graft.data.loading import load_image_data
    from hf_graft.metrics import PopulationMetrics

    compute = PopulationMetrics("0", extra_metrics, extra_metric_kwargs, ensemble=False, owner="--extra_metrics")
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    data = load_image_data(data_args, seed=seed)
    label_map = _label_map(loaded, data.label_names)
    warning = _names_differ(loaded, data.label_names)
    dataset = MemberOrderDataset(data.eval, loaded.transform, data.image_column, data.label_column)
    if len(dataset) == 0:
        raise EvaluationError(f"{data_args.dataset_name}: the evaluation split has no examples")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=default_collate)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = loaded.module.to(device).eval()
    logits, labels = [], []
    with torch.inference_mode():
        for batch in tqdm(loader, desc=f"evaluating {loaded.name}", unit="batch", disable=not progress,
                          file=sys.stderr):
            logits.append(loaded.logits(batch["pixel_values"].to(device)).float().cpu())
            labels.append(batch["labels"])
    del module
    labels_np = torch.cat(labels).numpy()
    if label_map is not None:
        labels_np = np.asarray(label_map)[labels_np]
    scores = compute(torch.cat(logits)[:, None].numpy(), labels_np)
    population_keys = {"member0_top1", "member0_top5", "ensemble_top1", "ensemble_top5", "selected_member"}
    results: dict[str, Any] = {
        "model": loaded.name,
        "dataset": data_args.dataset_name,
        "split": data.eval_split,
        "num_examples": int(len(labels_np)),
    }
    results.update({k: v for k, v in scores.items() if k not in population_keys})
    if warning:
        results["warning"] = warning
    return results


def evaluate_reid_model(model: str | LoadedModel, data_args, *, batch_size: int = 64, num_workers: int = 0,
                        progress: bool = True) -> dict[str, Any]:
    """mAP and CMC rank-1/5/10 of `model`'s features: every image of `data_args.query_split` ranks the
    `gallery_split` (the Market-1501 protocol, `metrics.reid.reid_metrics`), each image with the model's
    evaluation transform. Returns {"model", "dataset", "split", "num_query", "num_gallery", "mAP", "rank1",
    "rank5", "rank10", "valid_queries", "skipped_queries"}."""
    import torch
    from torch.utils.data import DataLoader, default_collate
    from tqdm.auto import tqdm

    from hf_graft.data.reid import ReidEvalDataset, load_reid_run_data
    from hf_graft.metrics.reid import reid_metrics

    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    data = load_reid_run_data(data_args)
    dataset = ReidEvalDataset(data.query, data.gallery, loaded.transform)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=default_collate)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded.module.to(device).eval()
    features = []
    with torch.inference_mode():
        for batch in tqdm(loader, desc=f"evaluating {loaded.name}", unit="batch", disable=not progress,
                          file=sys.stderr):
            features.append(loaded.features(batch["pixel_values"].to(device)).float().cpu())
    features, (identities, cameras, is_query) = torch.cat(features), dataset.reid_labels.unbind(1)
    query = is_query.bool()
    scores = reid_metrics(features[query], features[~query], identities[query], identities[~query],
                          cameras[query], cameras[~query], ranks=(1, 5, 10))
    return {"model": loaded.name, "dataset": data_args.dataset_name, "split": dataset.split_name,
            "num_query": dataset.num_query, "num_gallery": dataset.num_gallery, **scores}


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".")
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


@dataclass
class EvaluateArguments:
    """The arguments of `hf-graft evaluate` (the data flags are named as in `train`)."""

    dataset_name: str = field(metadata={
        "help": "Hub id, local folder of parquet/arrow files or save_to_disk folder, 'imagefolder' (with "
        "--data_dir) or builtin:digits"})
    task: str = field(default="classification", metadata={
        "help": "classification (top-1/top-5), or reid: mAP and CMC rank-k of the features, the query split ranking "
        "the gallery split (--dataset_name market1501 / dukemtmc_reid with --data_dir, or any dataset with those "
        "splits)"})
    model: str | None = field(default=None, metadata={
        "help": "exported student folder, CHECKPOINT#K, timm name, hf-hub:/local-dir: id, or a transformers "
        "image-classification folder", "metavar": "MODEL"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "the dataset's configuration name"})
    data_dir: str | None = field(default=None, metadata={"help": "folder of images for --dataset_name imagefolder"})
    split: str | None = field(default=None, metadata={
        "help": "split to evaluate (default: as in training, 'validation' or 'test' if present, else the held-out "
        "part of train)"})
    image_column: str | None = field(default=None, metadata={"help": "image column (detected when unambiguous)"})
    label_column: str | None = field(default=None, metadata={"help": "label column (detected when unambiguous)"})
    identity_column: str | None = field(default=None, metadata={
        "help": "--task reid: identity column (detected when unambiguous)"})
    camera_column: str | None = field(default=None, metadata={
        "help": "--task reid: camera column (detected when unambiguous)"})
    query_split: str = field(default="query", metadata={"help": "--task reid: the query split"})
    gallery_split: str = field(default="gallery", metadata={"help": "--task reid: the gallery split"})
    extra_metrics: list[str] | None = field(default=None, metadata={
        "help": "evaluate metrics by name (Hub or evaluate's cache) or local folder, e.g. f1 ./my_metric",
        "metavar": "METRIC"})
    extra_metric_kwargs: str | None = field(default=None, metadata={
        "help": 'compute() arguments per metric, e.g. \'{"f1": {"average": "macro"}}\'', "metavar": "JSON"})
    json: str | None = field(default=None, metadata={"help": "also write the results to this JSON file",
                                                      "metavar": "FILE"})
    batch_size: int = field(default=64, metadata={"help": "images per forward pass"})
    max_samples: int | None = field(default=None, metadata={"help": "evaluate only the first N images"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers decoding images"})
    seed: int = field(default=42, metadata={
        "help": "seed of the held-out part when the dataset has no eval split (the run's data_seed/seed)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (--no_progress: none)"})

    def __post_init__(self):
        for name in ("batch_size", "max_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name}: got {value}; allowed: a positive integer")
        if self.num_workers < 0:
            raise ValueError(f"--num_workers: got {self.num_workers}; allowed: an integer >= 0")
        if self.task not in ("classification", "reid"):
            raise ValueError(f"--task: got {self.task!r}; allowed: classification, reid")
        reid = self.task == "reid"
        for name in ("split", "label_column", "max_samples", "extra_metrics", "extra_metric_kwargs") if reid else ():
            if getattr(self, name) is not None:  # the protocol evaluates the whole query and gallery splits
                raise ValueError(f"--{name}: not with --task reid (use --query_split, --gallery_split, "
                                 "--identity_column)")
        for name in ("identity_column", "camera_column") if not reid else ():
            if getattr(self, name) is not None:
                raise ValueError(f"--{name}: with --task reid only")


def build_parser() -> CommandLineParser:
    return command_parser(EvaluateArguments, prog=PROG, description=__doc__.split("\n\n")[0], positional="model")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, debug = parse_arguments(build_parser(), EvaluateArguments, argv, positional="model")
    except ArgumentsError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2

    def fail(code: int, message: str, error: BaseException | None = None) -> int:
        if debug and error is not None:
            traceback.print_exception(error, file=sys.stderr)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return code

    try:
        from hf_graft.config import DataArguments, as_mapping
        from hf_graft.metrics import check_extra_metrics

        kwargs = as_mapping("evaluate", "--extra_metric_kwargs", args.extra_metric_kwargs)
        check_extra_metrics(args.extra_metrics, kwargs, owner="evaluate")
        data_args = DataArguments(
            dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, data_dir=args.data_dir,
            train_split=args.split or "train", eval_split=args.split, image_column=args.image_column,
            label_column=args.label_column, max_eval_samples=args.max_samples, task=args.task,
            identity_column=args.identity_column, camera_column=args.camera_column, query_split=args.query_split,
            gallery_split=args.gallery_split,
        )
        model = load_model(args.model)
    except (HfGraftError, ValueError, OSError) as error:
        return fail(2, one_line(error), error)
    try:
        if args.task == "reid":
            results = evaluate_reid_model(model, data_args, batch_size=args.batch_size, num_workers=args.num_workers,
                                          progress=args.progress)
        else:
            results = evaluate_model(
                model, data_args, extra_metrics=args.extra_metrics, extra_metric_kwargs=kwargs,
                batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed, progress=args.progress,
            )
    except (HfGraftError, ValueError, OSError) as error:
        return fail(1, one_line(error), error)

    if "warning" in results:
        print(f"{PROG}: warning: {results['warning']}", file=sys.stderr)
    size = (f"{results['num_query']} queries, {results['num_gallery']} gallery images" if args.task == "reid"
            else f"{results['num_examples']} images")
    print(f"{results['model']} on {results['dataset']} ({results['split']}, {size})")
    for key, value in results.items():
        if key not in ("model", "dataset", "split", "num_examples", "num_query", "num_gallery"):
            print(f"  {key}: {_format(value)}")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
