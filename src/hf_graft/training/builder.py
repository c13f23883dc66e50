"""From arguments to the parts of a run: the data, the student population and its datasets.

`python -m hf_graft.train`, the tests and the benchmarks all build a run with
`build_population_and_datasets`, so that they train exactly what the command line trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hf_graft.config import DataArguments, GraftingConfig
from hf_graft.data.checks import check_classes
from hf_graft.data.loading import ImageData, load_image_data
from hf_graft.data.sampling import MemberOrderDataset
from hf_graft.data.populations import population_datasets, reid_population_datasets, selection_dataset
from hf_graft.data.reid import EVAL_SPLIT_NAME, ReidData, load_reid_run_data
from hf_graft.data.transforms import resolve_student_data_config
from hf_graft.metrics import check_extra_metrics
from hf_graft.population.sources import check_model_name
from hf_graft.population.sources import hub_model_error
from hf_graft.population.students import PopulationSpec, StudentPopulation

__all__ = ["RunParts", "build_population_and_datasets", "build_run", "check_run_inputs", "load_data", "student_data_config", "student_model_name"]


def load_data(config: GraftingConfig, data_args: DataArguments) -> ImageData | ReidData:
    """The images named by `data_args`, split and subsampled with `data_seed` (or `seed`): an `ImageData`,
    or for `task: reid` a `ReidData` (train, query and gallery splits)."""
    seed = config.data_seed if config.data_seed is not None else config.seed
    if data_args.task == "reid":
        return load_reid_run_data(data_args, seed=seed)
    return load_image_data(data_args, seed=seed)


def student_model_name(config: GraftingConfig) -> str:
    """The name `timm.create_model` takes for `config.student_model` (a folder becomes `local-dir:`), or a
    one-line ValueError naming the field; the teachers' names are checked by the same rules."""
    for name in config.teacher_models or []:
        check_model_name("GraftingConfig", "teacher_models", name)
    return check_model_name("GraftingConfig", "student_model", config.student_model).timm_name


def check_run_inputs(config: GraftingConfig) -> str:
    """What a config names outside itself, checked before any data is loaded: the models and the extra
    metrics. Returns the students' timm name (`student_model_name`)."""
    name = student_model_name(config)
    if config.extra_metrics:
        check_extra_metrics(config.extra_metrics, config.extra_metric_kwargs, "GraftingConfig")
    return name


def _student_probe(config: GraftingConfig, num_classes: int, name: str | None = None):
    """The students' architecture built on the meta device (no weights), before any member exists."""
    import timm

    kwargs = dict(num_classes=num_classes, **config.student_model_kwargs)
    name = name or student_model_name(config)
    try:
        try:
            return timm.create_model(name, device="meta", **kwargs)
        except (NotImplementedError, RuntimeError):  # an architecture that computes with its weights when built
            return timm.create_model(name, **kwargs)
    except Exception as err:  # an hf-hub: id that cannot be fetched: say which field and id
        if not name.startswith("hf-hub:"):
            raise
        raise hub_model_error("GraftingConfig.student_model", name, err) from err


def student_data_config(config: GraftingConfig, num_classes: int,
                        input_size: int | tuple[int, int] | None = None) -> dict[str, Any]:
    """timm's data config of the students (`input_size` overrides the square side, or the (height, width)),
    resolved once, from the architecture alone."""
    return resolve_student_data_config(_student_probe(config, num_classes), input_size)


@dataclass
class RunParts:
    """What a `GraftingTrainer` is built from."""

    population: StudentPopulation
    train_dataset: Any
    eval_dataset: Any
    selection_dataset: Any = None  # held out of train to choose the student by (selection_split_percentage)

    def trainer_kwargs(self) -> dict[str, Any]:
        return dict(model=self.population, train_dataset=self.train_dataset, eval_dataset=self.eval_dataset,
                    selection_dataset=self.selection_dataset)


def build_population_and_datasets(
    config: GraftingConfig,
    data_args: DataArguments,
    *,
    data: ImageData | None = None,
    train_dataset_cls: type = MemberOrderDataset,
) -> tuple[StudentPopulation, MemberOrderDataset, MemberOrderDataset]:
    """(population, train dataset, eval dataset) for `GraftingTrainer` (`build_run` gives the selection
    split too, when `selection_split_percentage` asks for one)."""
    parts = build_run(config, data_args, data=data, train_dataset_cls=train_dataset_cls)
    return parts.population, parts.train_dataset, parts.eval_dataset


def build_run(
    config: GraftingConfig,
    data_args: DataArguments,
    *,
    data: ImageData | ReidData | None = None,
    train_dataset_cls: type = MemberOrderDataset,
    inputs_checked: bool = False,
) -> RunParts:
    """The population and its datasets for `GraftingTrainer(**parts.trainer_kwargs(), args=config)`.

    `data` (from `load_data`) is loaded here when not given. Member k is seeded `seed + 1000 k`
    (`seed` for every member with `shared_init`); the population's spec records the data config,
    the label names and the dataset, which checkpoints and the exported student carry.
    `inputs_checked`: `check_run_inputs(config)` already ran (`hf_graft.cli.recipe.parse_recipe` runs it).
    With `data_args.task` reid the classes are the training identities (the spec's label names), and the
    evaluation set is the query then the gallery split (`data.reid.ReidEvalDataset`).
    """
    name = student_model_name(config) if inputs_checked else check_run_inputs(config)  # before the data
    data = load_data(config, data_args) if data is None else data
    reid = data_args.task == "reid"
    if reid != isinstance(data, ReidData):
        raise ValueError(f"DataArguments.task: {data_args.task!r}, but the data given is a {type(data).__name__}")
    if not reid:
        check_classes(data)  # one class trains to loss 0 and top-1 100: refused
    num_classes = data.num_identities if reid else data.num_classes
    probe = _student_probe(config, num_classes, name)
    if config.member_execution == "fused":  # refused here, before the population is built or data decoded
        from hf_graft.population.fused import check_fusable

        check_fusable(probe, name)
    spec = PopulationSpec(
        student_model=name,
        num_students=config.num_students,
        num_classes=num_classes,
        student_model_kwargs=config.student_model_kwargs,
        label_names=data.label_names,
        # re-identification resizes the whole person box to the input (no centre crop)
        data_config=resolve_student_data_config(probe, data_args.input_shape, whole_image=reid),
        dataset_name=data_args.dataset_name,
        eval_split=EVAL_SPLIT_NAME if reid else data.eval_split or None,
        task=data_args.task,
    )
    population = StudentPopulation.from_spec(
        spec, seed=config.seed, pretrained=config.student_pretrained, shared_init=config.shared_init
    )
    if reid:
        train_dataset, eval_dataset = reid_population_datasets(
            data, data_args, spec.data_config, num_members=config.num_students, order=config.data_order,
            seed=config.seed, train_cls=train_dataset_cls)
        return RunParts(population, train_dataset, eval_dataset)
    train_dataset, eval_dataset = population_datasets(
        data, data_args, spec.data_config, num_members=config.num_students, order=config.data_order,
        seed=config.seed, train_cls=train_dataset_cls, device=config.device,
    )
    return RunParts(population, train_dataset, eval_dataset, selection_dataset(data, data_args, spec.data_config))
