"""GraftingConfig (a `TrainingArguments` subclass, the TRL way) and the data arguments."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from transformers import TrainingArguments

from hf_graft import _compat
from hf_graft.errors import HfGraftError
from hf_graft.graft.grafting import ANCHOR_RULES, CRITERIA, INTERNAL_ORDERS, LEVELS
from hf_graft.graft.schedule import cosine_lr_multipliers
from hf_graft.trainer_fields import refused_field

__all__ = ["ConfigError", "DataArguments", "GraftingConfig", "as_mapping", "grafting_settings_of", "kd_settings_of",
           "lr_multipliers_of", "GRAFT_SOURCES", "DATA_ORDERS", "MEMBER_EXECUTIONS", "TASKS", "TRAIN_AUGMENTATIONS"]

GRAFT_SOURCES = ("external", "noise", "internal", "none")
DATA_ORDERS = ("independent", "shared")
MEMBER_EXECUTIONS = ("loop", "fused")
WEIGHT_DECAY_SCOPES = ("transformers", "all")
TRAIN_AUGMENTATIONS = ("auto", "rrc", "pad_crop", "none")
TASKS = ("classification", "reid")


class ConfigError(HfGraftError, ValueError):
    """A config value that is not allowed; the message is one line naming the field and what is allowed."""


def _fail(owner: str, name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{owner}.{name}: got {value!r}; allowed: {allowed}")


def _lr_spread_words(spread: Any) -> list[str]:
    """`lr_spread` as a list of words ("0.5, 1" on a command line is ["0.5", "1"])."""
    if isinstance(spread, str):
        spread = [s for s in spread.replace(",", " ").split() if s]
    return [str(s) for s in spread]


def as_mapping(owner: str, name: str, value: Any) -> dict:
    """Dict fields arrive as dicts (Python, YAML) or JSON strings (command line)."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError):
        parsed = None
    if not isinstance(parsed, dict):
        _fail(owner, name, value, "a mapping, or a JSON object string such as '{\"drop_rate\": 0.1}'")
    return parsed


@dataclass
class DataArguments:
    """Which images to train and evaluate on, and how they are transformed."""

    task: str = field(
        default="classification",
        metadata={"help": "classification (train and evaluate on labelled images), or reid (person "
                  "re-identification: train on the identities of the train split, evaluate the members' features "
                  "by mAP and CMC rank-k, ranking the gallery split for every image of the query split)."},
    )
    dataset_name: str = field(
        default="builtin:digits",
        metadata={
            "help": "A Hub id (uoft-cs/cifar10), a local folder of parquet/arrow files or a save_to_disk folder, "
            "'imagefolder' (with data_dir), or 'builtin:digits' (UCI's 8x8 handwritten digits, shipped with "
            "hf_graft)."
        },
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "The dataset's configuration name."})
    data_dir: Optional[str] = field(default=None, metadata={"help": "Folder of images for dataset_name=imagefolder."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: Optional[str] = field(
        default=None,
        metadata={"help": "Split to evaluate on; default: 'validation' or 'test' if present, else a held-out part."},
    )
    validation_split_percentage: int = field(
        default=10, metadata={"help": "Percent of train held out for evaluation when there is no eval split."}
    )
    selection_split_percentage: Optional[float] = field(
        default=None,
        metadata={"help": "Percent of train held out (seeded by data_seed or seed) only to choose the student with "
                  "select_student: best, so that the choice never looks at the evaluation split (null: choose on "
                  "the evaluation split, which on CIFAR and ImageNet is the test set)."},
    )
    image_column: Optional[str] = field(default=None, metadata={"help": "Image column; detected when unambiguous."})
    label_column: Optional[str] = field(default=None, metadata={"help": "Label column; detected when unambiguous."})
    identity_column: Optional[str] = field(
        default=None, metadata={"help": "task reid: the identity column; detected when unambiguous."}
    )
    camera_column: Optional[str] = field(
        default=None, metadata={"help": "task reid: the camera column; detected when unambiguous."}
    )
    query_split: str = field(default="query", metadata={"help": "task reid: the split of query images."})
    gallery_split: str = field(default="gallery", metadata={"help": "task reid: the split of gallery images."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use only this many training images."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use only this many eval images."})
    input_size: Optional[int] = field(
        default=None, metadata={"help": "Square input side in pixels; overrides the student's pretrained_cfg."}
    )
    input_height: Optional[int] = field(
        default=None,
        metadata={"help": "Input height in pixels, with input_width, for a non-square input (re-identification: "
                  "256 x 128); overrides the student's pretrained_cfg. Not with input_size."},
    )
    input_width: Optional[int] = field(default=None, metadata={"help": "Input width in pixels, with input_height."})
    train_augmentation: str = field(
        default="auto",
        metadata={
            "help": "'rrc' (timm random-resized-crop + flip, ImageNet recipes), 'pad_crop' (random crop with "
            "padding + flip, 32-px recipes), 'none', or 'auto' (pad_crop up to 64 px, else rrc)."
        },
    )
    crop_padding: int = field(default=4, metadata={"help": "Padding for the pad_crop augmentation."})
    hflip: float = field(default=0.5, metadata={"help": "Horizontal flip probability at train time."})
    color_jitter: Optional[float] = field(default=None, metadata={"help": "timm color jitter for 'rrc' (None: off)."})
    auto_augment: Optional[str] = field(default=None, metadata={"help": "timm auto-augment policy for 'rrc'."})
    random_erasing: float = field(
        default=0.0,
        metadata={"help": "Probability of timm's RandomErasing (a random rectangle of the normalised training "
                  "image set to 0, the mean colour) at train time; 0: off. A usual option of re-identification."},
    )
    data_on_device: bool = field(
        default=False,
        metadata={"help": "Decode every split once into a uint8 tensor on the training device and augment "
                  "(pad_crop / none) and normalise batches there; for datasets that fit in its memory."},
    )
    normalize_on_device: bool = field(
        default=False,
        metadata={"help": "The transforms stop at uint8 pixels (a quarter of float32's bytes to collate, pin and "
                  "copy) and the trainer normalises each batch on the training device, as timm's prefetcher "
                  "does; the same inputs to the last bit. No effect with data_on_device (normalised there)."},
    )

    def __post_init__(self):
        owner = "DataArguments"
        if self.task not in TASKS:
            _fail(owner, "task", self.task, ", ".join(TASKS))
        if self.dataset_name == "imagefolder" and not self.data_dir:
            raise ConfigError(f"{owner}.data_dir: required when dataset_name is 'imagefolder'")
        if self.selection_split_percentage is not None and not 0 < self.selection_split_percentage < 100:
            _fail(owner, "selection_split_percentage", self.selection_split_percentage, "a percentage in (0, 100), or null")
        if self.train_augmentation not in TRAIN_AUGMENTATIONS:
            _fail(owner, "train_augmentation", self.train_augmentation, ", ".join(TRAIN_AUGMENTATIONS))
        if not 0 < self.validation_split_percentage < 100:
            _fail(owner, "validation_split_percentage", self.validation_split_percentage, "an integer in 1..99")
        for name in ("max_train_samples", "max_eval_samples", "input_size", "input_height", "input_width"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                _fail(owner, name, value, "a positive integer, or null")
        if self.crop_padding < 0:
            _fail(owner, "crop_padding", self.crop_padding, "an integer >= 0")
        if not 0.0 <= self.hflip <= 1.0:
            _fail(owner, "hflip", self.hflip, "a probability in [0, 1]")
        self._check_input_shape(owner)
        self._check_task(owner)
        if not 0.0 <= self.random_erasing <= 1.0:
            _fail(owner, "random_erasing", self.random_erasing, "a probability in [0, 1] (0: off)")
        if self.random_erasing and (self.normalize_on_device or self.data_on_device):
            which = "normalize_on_device" if self.normalize_on_device else "data_on_device"
            raise ConfigError(f"{owner}.random_erasing: got {self.random_erasing} with {which} true; random erasing "
                              "acts on the normalised image, which only the per-example transforms make (allowed with "
                              f"{which}: 0)")
        if self.data_on_device:  # batches are augmented on the device: pad-crop and flip only
            if self.train_augmentation == "rrc":
                _fail(owner, "train_augmentation", self.train_augmentation, "pad_crop, none or auto with data_on_device")
            for name in ("color_jitter", "auto_augment"):
                if getattr(self, name) is not None:
                    _fail(owner, name, getattr(self, name), "null with data_on_device (pad_crop / none only)")

    def _check_input_shape(self, owner: str) -> None:
        if (self.input_height is None) != (self.input_width is None):
            given, missing = ("input_height", "input_width") if self.input_width is None else ("input_width", "input_height")
            raise ConfigError(f"{owner}.{missing}: required with {given} (a non-square input takes both)")
        if self.input_height is not None and self.input_size is not None:
            raise ConfigError(f"{owner}.input_size: got {self.input_size} with input_height {self.input_height} and "
                              f"input_width {self.input_width}; set input_size (square) or both of those, not all three")
        if self.data_on_device and self.input_height is not None and self.input_height != self.input_width:
            raise ConfigError(f"{owner}.data_on_device: square inputs only (input_size), got input_height "
                              f"{self.input_height} and input_width {self.input_width}")

    def _check_task(self, owner: str) -> None:
        """Fields that belong to one task only: a value set for the other is refused, never ignored."""
        if self.task == "reid":
            # evaluation is the query split against the gallery split, each whole (the protocol)
            for name, why in (("eval_split", "evaluation ranks the gallery_split for every image of the "
                               "query_split"), ("label_column", "the labels are the identity_column"),
                              ("selection_split_percentage", "a held-out part of train has no query and gallery"),
                              ("max_eval_samples", "the query and gallery splits are evaluated whole")):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{owner}.{name}: got {getattr(self, name)!r} with task reid ({why}); "
                                      "allowed: null")
            if self.data_on_device:
                raise ConfigError(f"{owner}.data_on_device: got true with task reid; allowed: false (the query and "
                                  "gallery are evaluated through the per-example transforms)")
        else:
            for name in ("identity_column", "camera_column"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{owner}.{name}: got {getattr(self, name)!r} with task {self.task}; used "
                                      "with task reid only (allowed here: null)")

    @property
    def input_shape(self) -> int | tuple[int, int] | None:
        """The input override: `input_size` (a square side), (input_height, input_width), or None."""
        if self.input_height is not None:
            return (self.input_height, self.input_width)
        return self.input_size


# batch sizes, counts and intervals a run needs: (field, smallest allowed, whether null is allowed)
_RUN_LENGTHS = (
    ("per_device_train_batch_size", 1, False), ("per_device_eval_batch_size", 1, False),
    ("gradient_accumulation_steps", 1, False), ("eval_accumulation_steps", 1, True),
    ("dataloader_num_workers", 0, False), ("dataloader_prefetch_factor", 1, True), ("save_total_limit", 1, True),
)


def _check_run_lengths(config: "GraftingConfig", owner: str) -> None:
    """Values the Trainer would only refuse once training starts (after replace_output_dir has cleared the
    folder), or would run with silently: refused here, with the config."""
    for name, low, nullable in _RUN_LENGTHS:
        value = getattr(config, name)
        if (value is None and not nullable) or (value is not None and value < low):
            _fail(owner, name, value, f"an integer >= {low}" + (", or null" if nullable else ""))
    for name in ("logging_steps", "save_steps", "eval_steps"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            _fail(owner, name, value, "a number > 0 (steps, or a fraction of the run below 1)"
                  + (", or null" if name == "eval_steps" else ""))
    if config.max_steps != -1 and config.max_steps < 1:
        _fail(owner, "max_steps", config.max_steps, "a positive integer, or -1 to train num_train_epochs")
    if config.max_steps == -1 and not config.num_train_epochs > 0:
        _fail(owner, "num_train_epochs", config.num_train_epochs,
              "a number > 0 (0 would train nothing and export an untrained student), or set max_steps")


@dataclass
class GraftingConfig(TrainingArguments):
    """Training arguments for a population of grafted timm students (and grafting+ teachers).

    Every field of `transformers.TrainingArguments` is available; the ones below configure the
    population, the graft (docs/method.md §2-§8), distillation (§9) and the exported student.
    """

    # --- the students
    student_model: str = field(
        default="cifar_resnet20",
        metadata={"help": "timm architecture name, an 'hf-hub:' id, or a model folder ('local-dir:' too), "
                  "for every student."},
    )
    student_model_kwargs: Optional[Union[dict, str]] = field(
        default=None, metadata={"help": "Extra timm.create_model kwargs (mapping or JSON), e.g. drop_rate."}
    )
    student_pretrained: bool = field(
        default=False,
        metadata={"help": "Start every member from timm's pretrained weights (must be available locally); "
                  "the classifier head is new and seeded per member."},
    )
    num_students: int = field(default=2, metadata={"help": "K, the number of students grafted in a ring."})
    shared_init: bool = field(
        default=False, metadata={"help": "Initialise every member from the same seed (ablation; default: distinct)."}
    )

    # --- the graft
    graft_source: str = field(
        default="external", metadata={"help": "Scion source: external (other members), noise, internal, none."}
    )
    graft_level: str = field(
        default="layer",
        metadata={"help": "External graft granularity: layer (one alpha per tensor, the paper's); filter (one alpha "
                  "per output filter from the filter's own information, hf_graft's variant); bn_scale (one alpha per "
                  "output channel, |g1| / (|g1| + |g2|) from the BatchNorm scales after the layer, the authors' "
                  "filter level)."},
    )
    graft_anchor: str = field(
        default="nearest",
        metadata={"help": "Which entries get their own alpha: nearest (every conv/linear weight; other entries take "
                  "the nearest preceding one's) or authors (every entry whose key contains 'conv'; everything else, "
                  "the classifier and a shortcut conv included, takes the last one's, as the authors' code). "
                  "authors needs graft_level: layer."},
    )
    graft_alpha_decimals: Optional[int] = field(
        default=None,
        metadata={"help": "Round alpha to this many decimals (null: no rounding; the authors' code rounds to 2)."},
    )
    graft_criterion: str = field(default="entropy", metadata={"help": "Layer information: entropy or l1."})
    graft_bins: int = field(default=10, metadata={"help": "Histogram bins for the entropy criterion."})
    graft_histogram_include_max: bool = field(
        default=True,
        metadata={"help": "The entropy histogram counts the values equal to the layer's maximum in its last bin, as "
                  "torch.histc does (false: leaves them out, as the authors' half-open bins do)."},
    )
    graft_A: float = field(default=0.4, metadata={"help": "A in alpha = A/pi * arctan(c * dH) + 0.5 (0: plain average)."})
    graft_c: float = field(default=500.0, metadata={"help": "c in alpha = A/pi * arctan(c * dH) + 0.5."})
    graft_every_epochs: int = field(default=1, metadata={"help": "Graft at every this many epoch boundaries."})
    graft_every_steps: Optional[int] = field(
        default=None, metadata={"help": "Graft every this many optimizer steps instead (step-based runs)."}
    )
    graft_start_epoch: int = field(
        default=1, metadata={"help": "First epoch boundary that grafts (1: after the first epoch, the authors')."}
    )
    graft_noise_a: float = field(
        default=0.975, metadata={"help": "noise source: sigma_t = a**t, 0 < a < 1 (0.975: the authors')."}
    )
    graft_noise_first_t: int = field(
        default=0,
        metadata={"help": "noise source: t of the graft after the first epoch (0: the authors', sigma = 1 then; "
                  "1: t counted from 1)."},
    )
    graft_internal_order: str = field(
        default="snapshot",
        metadata={"help": "internal source: snapshot (every filter receives a pre-graft filter) or sequential (the "
                  "authors' in-place loop: a filter may receive one that already received, once more than half "
                  "of a layer's filters are invalid)."},
    )
    graft_invalid_threshold: float = field(
        default=0.1, metadata={"help": "noise / internal sources: filters with l1 below this are invalid."}
    )
    bn_recalibration_batches: int = field(
        default=0,
        metadata={"help": "After each graft, re-estimate BatchNorm running statistics on this many training "
                  "batches (0: keep the mixed statistics, the authors' behaviour)."},
    )
    lr_decay_epochs: Optional[list[float]] = field(
        default=None,
        metadata={"help": "Step decay: multiply the rate by lr_decay_gamma at each of these epochs (the paper's "
                  "CIFAR 60/120/160 and ImageNet 30/60/80 schedules); replaces lr_scheduler_type when set."},
    )
    lr_decay_gamma: float = field(default=0.1, metadata={"help": "Factor of each step decay (lr_decay_epochs)."})
    lr_spread: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={"help": "Per-member initial-rate multipliers: none, cosine (the authors' dlr rule), "
                  "or one number per member."},
    )
    data_order: str = field(
        default="independent",
        metadata={"help": "independent: each member its own order of every epoch; shared: the same batches."},
    )
    select_student: str = field(
        default="best", metadata={"help": "Student to export: best (by eval top-1) or a member index."}
    )
    filter_thresholds: list[float] = field(
        default_factory=lambda: [0.01, 0.1],
        metadata={"help": "l1 thresholds of the invalid-filter ratios logged at every graft and evaluation."},
    )
    extra_metrics: Optional[list[str]] = field(
        default=None,
        metadata={"help": "evaluate metrics computed at every evaluation for the selected member (eval_NAME) and "
                  "the ensemble (eval_ensemble_NAME): metric names (from the Hub, or evaluate's cache offline) or "
                  "local metric folders, e.g. f1 precision ./metrics/my_metric."},
    )
    extra_metric_kwargs: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "compute() arguments of the extra metrics (mapping or JSON), "
                  "e.g. {\"f1\": {\"average\": \"macro\"}}."},
    )

    # --- execution (speed only: the same training either way, up to float rounding)
    channels_last: Optional[bool] = field(
        default=None,
        metadata={"help": "Members, teachers and batches in channels_last memory format (null: on for CUDA runs, "
                  "off on CPU; true works on CPU too). Checkpoints and exports hold ordinary contiguous tensors."},
    )
    member_execution: str = field(
        default="loop",
        metadata={"help": "loop: the members one after another; fused: the K members as one wide network "
                  "(grouped convolutions, one kernel per layer for all members; docs/how_to/gpu_speed.md lists the "
                  "architectures that fuse)."},
    )
    torch_compile_dynamic: Optional[bool] = field(
        default=False,
        metadata={"help": "torch.compile's `dynamic` when torch_compile is on. false: one static graph per batch "
                  "size (the full batches, and an epoch's last, smaller one), as CUDA graphs want; null: torch's "
                  "default, which recompiles the graph shape-generic when a second batch size appears and then "
                  "runs every later step through it; true: shape-generic from the start."},
    )
    cudnn_benchmark: Optional[bool] = field(
        default=None,
        metadata={"help": "Let cuDNN time its convolution algorithms on the first batch of each shape and keep the "
                  "fastest (as timm's training script does; null: on for CUDA runs unless full_determinism). "
                  "Set for the run only, then restored."},
    )

    # --- grafting+ (distillation from frozen teachers)
    teacher_models: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Teachers: timm names, 'hf-hub:' / 'local-dir:' ids, or folders exported by hf_graft."},
    )
    teacher_model_kwargs: Optional[Union[dict, str]] = field(
        default=None, metadata={"help": "Extra timm.create_model kwargs for the teachers (mapping or JSON)."}
    )
    kd_temperature: float = field(default=2.0, metadata={"help": "Distillation temperature tau (> 0)."})
    kd_weight: float = field(default=1.0, metadata={"help": "loss = ce_weight * CE + kd_weight * KD."})
    ce_weight: float = field(default=1.0, metadata={"help": "loss = ce_weight * CE + kd_weight * KD."})

    # --- export
    export_student: bool = field(
        default=True, metadata={"help": "Write the selected student to output_dir/student at the end of training."}
    )
    license: Optional[str] = field(
        default=None,
        metadata={"help": "The exported student's license, a Hub license id such as apache-2.0 or mit, in its model "
                  "card's metadata (null: no license line)."},
    )

    # --- the output folder
    replace_output_dir: bool = field(
        default=False,
        metadata={"help": "A fresh run into an output_dir holding another run's checkpoints or results deletes them "
                  "first (only what a run writes there); without it such a run refuses to start."},
    )

    # --- TrainingArguments defaults that suit a population of image classifiers
    remove_unused_columns: bool = field(default=False, metadata={"help": "Images are decoded on the fly."})
    eval_strategy: str = field(default="epoch", metadata={"help": "Evaluate at the end of every epoch."})
    save_strategy: str = field(default="epoch", metadata={"help": "Checkpoint at the end of every epoch."})
    logging_strategy: str = field(default="steps", metadata={"help": "The logging strategy."})
    learning_rate: float = field(default=0.1, metadata={"help": "Base learning rate (SGD, as the paper)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay (paper, CIFAR)."})
    weight_decay_scope: str = field(
        default="transformers",
        metadata={"help": "Which parameters weight_decay applies to: transformers (the Trainer's rule: not biases "
                  "nor LayerNorm weights) or all (every parameter, as the papers' SGD; the reproduction recipes)."},
    )
    optim: str = field(default="sgd", metadata={"help": "Optimizer; SGD with momentum as in the paper."})
    optim_args: Optional[str] = field(default="momentum=0.9", metadata={"help": "Optimizer arguments."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "Per-member gradient clipping (0: off). Each member is clipped alone."}
    )
    report_to: Union[None, str, list[str]] = field(default="none", metadata={"help": "Logging integrations."})
    dataloader_num_workers: int = field(default=2, metadata={"help": "Workers that decode and augment images."})
    save_total_limit: Optional[int] = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "Log the loss as it is: a non-finite batch shows as nan, never as an average of earlier "
                  "losses (true: the Trainer's filter, which also costs a host sync per step)."},
    )

    def __post_init__(self):
        owner = "GraftingConfig"
        self.student_model_kwargs = as_mapping(owner, "student_model_kwargs", self.student_model_kwargs)
        self.teacher_model_kwargs = as_mapping(owner, "teacher_model_kwargs", self.teacher_model_kwargs)
        self.extra_metric_kwargs = as_mapping(owner, "extra_metric_kwargs", self.extra_metric_kwargs)
        if not self.student_model:
            _fail(owner, "student_model", self.student_model, "a timm model name or an 'hf-hub:'/'local-dir:' id")
        if self.num_students < 1:
            _fail(owner, "num_students", self.num_students, "an integer >= 1 (>= 2 to graft among students)")
        if self.graft_source not in GRAFT_SOURCES:
            _fail(owner, "graft_source", self.graft_source, ", ".join(GRAFT_SOURCES))
        if self.graft_source == "external" and self.num_students < 2:
            raise ConfigError(
                f"{owner}.num_students: got {self.num_students}; graft_source 'external' needs >= 2 "
                "(use graft_source: none for a single baseline network)"
            )
        self._check_graft_settings(owner)
        if self.bn_recalibration_batches < 0:
            _fail(owner, "bn_recalibration_batches", self.bn_recalibration_batches, "an integer >= 0")
        if self.data_order not in DATA_ORDERS:
            _fail(owner, "data_order", self.data_order, ", ".join(DATA_ORDERS))
        if self.weight_decay_scope not in WEIGHT_DECAY_SCOPES:
            _fail(owner, "weight_decay_scope", self.weight_decay_scope, ", ".join(WEIGHT_DECAY_SCOPES))
        if self.member_execution not in MEMBER_EXECUTIONS:
            _fail(owner, "member_execution", self.member_execution, ", ".join(MEMBER_EXECUTIONS))
        if self.cudnn_benchmark and self.full_determinism:
            raise ConfigError(f"{owner}.cudnn_benchmark: got true with full_determinism true; cuDNN's timed algorithm "
                             "choice is not deterministic (allowed with full_determinism true: false or null)")
        self.lr_spread = _lr_spread_words(self.lr_spread)
        self.lr_multipliers  # noqa: B018 - refuses a bad spread here
        if self.lr_decay_epochs is not None and len(self.lr_decay_epochs) == 0:
            self.lr_decay_epochs = None
        if self.lr_decay_epochs and any(e <= 0 for e in self.lr_decay_epochs):
            _fail(owner, "lr_decay_epochs", self.lr_decay_epochs, "positive epoch numbers")
        if not 0.0 < self.lr_decay_gamma <= 1.0:
            _fail(owner, "lr_decay_gamma", self.lr_decay_gamma, "a number in (0, 1]")
        self.select_student = str(self.select_student)
        if self.select_student != "best":
            if not self.select_student.isdigit() or int(self.select_student) >= self.num_students:
                _fail(owner, "select_student", self.select_student, f"best, or a member index 0..{self.num_students - 1}")
        if any(t <= 0 for t in self.filter_thresholds):
            _fail(owner, "filter_thresholds", self.filter_thresholds, "positive numbers")
        self.extra_metrics = [str(m) for m in self.extra_metrics] if self.extra_metrics else None
        names = list(self.extra_metrics or [])
        for name, value in self.extra_metric_kwargs.items():  # the metrics themselves load in the builder
            if name not in names:
                raise ConfigError(f"{owner}.extra_metric_kwargs: {name!r} is not one of extra_metrics {names}")
            if not isinstance(value, dict):
                raise ConfigError(f"{owner}.extra_metric_kwargs: the arguments of {name!r} must be a mapping, "
                                  f"e.g. {{\"{name}\": {{\"average\": \"macro\"}}}}; got {value!r}")
        if self.kd_temperature <= 0:
            _fail(owner, "kd_temperature", self.kd_temperature, "a number > 0")
        if self.kd_weight < 0 or self.ce_weight < 0:
            _fail(owner, "kd_weight/ce_weight", (self.kd_weight, self.ce_weight), "numbers >= 0")
        if self.teacher_models is not None and len(self.teacher_models) == 0:
            self.teacher_models = None
        if self.license is not None and (not isinstance(self.license, str) or not self.license.strip()):
            _fail(owner, "license", self.license, "null, or a Hub license id such as apache-2.0 or mit")
        _check_run_lengths(self, owner)
        self._check_compile_settings(owner)
        refused = refused_field(self)
        if refused is not None:
            name, value, why = refused
            raise ConfigError(f"{owner}.{name}: got {value!r}; not available with a population of image classifiers "
                              f"({why})")
        super().__post_init__()
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError(f"{owner}.hub_model_id: required when push_to_hub is true")

    def _check_graft_settings(self, owner: str) -> None:
        """The graft's own settings: level, anchor rule, coefficient, histogram, timing and scions."""
        if self.graft_level not in LEVELS:
            _fail(owner, "graft_level", self.graft_level, ", ".join(LEVELS))
        if self.graft_anchor not in ANCHOR_RULES:
            _fail(owner, "graft_anchor", self.graft_anchor, ", ".join(ANCHOR_RULES))
        if self.graft_anchor == "authors" and self.graft_level != "layer":
            raise ValueError(f"{owner}.graft_anchor: got 'authors' with graft_level {self.graft_level!r}; the authors' "
                             "rule is layer-level (allowed with graft_level layer only)")
        if self.graft_alpha_decimals is not None and (isinstance(self.graft_alpha_decimals, bool) or not isinstance(
                self.graft_alpha_decimals, int) or self.graft_alpha_decimals < 0):
            _fail(owner, "graft_alpha_decimals", self.graft_alpha_decimals,
                  "null, or an integer >= 0 (the authors': 2)")
        if not isinstance(self.graft_histogram_include_max, bool):
            _fail(owner, "graft_histogram_include_max", self.graft_histogram_include_max, "true or false")
        if self.graft_criterion not in CRITERIA:
            _fail(owner, "graft_criterion", self.graft_criterion, ", ".join(CRITERIA))
        if self.graft_bins < 1:
            _fail(owner, "graft_bins", self.graft_bins, "an integer >= 1")
        if not 0.0 <= self.graft_A <= 1.0:
            _fail(owner, "graft_A", self.graft_A, "a number in [0, 1]")
        if self.graft_c < 0:
            _fail(owner, "graft_c", self.graft_c, "a number >= 0")
        if self.graft_every_epochs < 1:
            _fail(owner, "graft_every_epochs", self.graft_every_epochs, "an integer >= 1")
        if self.graft_every_steps is not None and self.graft_every_steps < 1:
            _fail(owner, "graft_every_steps", self.graft_every_steps, "an integer >= 1, or null for epoch-based")
        if self.graft_start_epoch < 1:
            _fail(owner, "graft_start_epoch", self.graft_start_epoch, "an integer >= 1")
        if not 0.0 < self.graft_noise_a < 1.0:
            _fail(owner, "graft_noise_a", self.graft_noise_a, "a number in (0, 1)")
        if isinstance(self.graft_noise_first_t, bool) or not isinstance(self.graft_noise_first_t, int) or \
                self.graft_noise_first_t < 0:
            _fail(owner, "graft_noise_first_t", self.graft_noise_first_t, "an integer >= 0 (0: the authors')")
        if self.graft_internal_order not in INTERNAL_ORDERS:
            _fail(owner, "graft_internal_order", self.graft_internal_order, ", ".join(INTERNAL_ORDERS))

    def _check_compile_settings(self, owner: str) -> None:
        """torch.compile's backend and mode, here rather than when the Trainer builds its Accelerator (the
        backend) or compiles the model at the first step (the mode)."""
        if self.torch_compile_backend is not None:
            from accelerate.utils import DynamoBackend

            backends = [b.value.lower() for b in DynamoBackend if b.value != "NO"]
            if str(self.torch_compile_backend).lower() not in backends:
                _fail(owner, "torch_compile_backend", self.torch_compile_backend, ", ".join(backends))
        if self.torch_compile_mode is not None:
            modes = _compat.inductor_modes()
            if self.torch_compile_mode not in modes:
                _fail(owner, "torch_compile_mode", self.torch_compile_mode, ", ".join(modes))

    def __getstate__(self) -> dict[str, Any]:
        """What pickling writes (`training_args.bin` in every checkpoint): every field but the secrets, which
        are replaced by a placeholder as `TrainingArguments.to_dict` does. Copies in memory keep them."""
        state = dict(self.__dict__)
        for key, value in state.items():
            if key.endswith("_token") and value is not None:
                state[key] = f"<{key.upper()}>"
        return state

    def __copy__(self):
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo):
        import copy

        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = copy.deepcopy(value, memo)
        return clone

    @property
    def lr_multipliers(self) -> list[float]:
        """Each member's multiplier of `learning_rate`, from `lr_spread`."""
        return lr_multipliers_of(self.lr_spread, self.num_students)

    @property
    def grafting_enabled(self) -> bool:
        return self.graft_source != "none" and (self.graft_source != "external" or self.num_students >= 2)

    def grafting_settings(self) -> dict[str, Any]:
        """The settings that define the method, for model cards and results files."""
        return grafting_settings_of(vars(self))

    def kd_settings(self) -> dict[str, Any] | None:
        return kd_settings_of(vars(self))


def lr_multipliers_of(lr_spread: Any, num_students: int) -> list[float]:
    """Each member's multiplier of the learning rate, from an `lr_spread` and the number of members."""
    spread = _lr_spread_words(lr_spread)
    allowed = "none, cosine, or one positive multiplier per member"
    if spread in (["none"], []):
        return [1.0] * num_students
    if spread == ["cosine"]:
        return cosine_lr_multipliers(num_students)
    try:
        values = [float(s) for s in spread]
    except ValueError:
        _fail("GraftingConfig", "lr_spread", spread, allowed)
    if len(values) != num_students or any(v <= 0 for v in values):
        _fail("GraftingConfig", "lr_spread", spread, f"{allowed} ({num_students} numbers)")
    return values


# the settings that define the method, in the order cards and results files list them
_GRAFTING_FIELDS = (
    "num_students", "graft_source", "graft_level", "graft_criterion", "graft_bins", "graft_A", "graft_c",
    "graft_anchor", "graft_alpha_decimals", "graft_histogram_include_max", "graft_every_epochs", "graft_every_steps",
    "graft_start_epoch", "graft_noise_a", "graft_noise_first_t", "graft_internal_order", "bn_recalibration_batches",
    "lr_spread",
)
_KD_FIELDS = ("teacher_models", "kd_temperature", "kd_weight", "ce_weight")


def grafting_settings_of(values: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that define the method, from a config's field values: a `GraftingConfig`'s, or a run
    identity's record of them (`graft_run.json`), so that a checkpoint's export lists what training listed.
    Settings that `values` lacks (a record of an older run) are left out."""
    settings = {name: values[name] for name in _GRAFTING_FIELDS if name in values}
    if values.get("lr_decay_epochs"):
        settings["lr_schedule"] = f"step x{values.get('lr_decay_gamma')} at epochs {values['lr_decay_epochs']}"
    elif "lr_scheduler_type" in values:
        schedule = values["lr_scheduler_type"]
        settings["lr_schedule"] = str(getattr(schedule, "value", schedule))
    if "lr_spread" in values and "num_students" in values:
        settings["lr_multipliers"] = lr_multipliers_of(values["lr_spread"], values["num_students"])
    settings.update({name: values[name] for name in ("data_order", "shared_init") if name in values})
    return settings


def kd_settings_of(values: Mapping[str, Any]) -> dict[str, Any] | None:
    """The distillation (grafting+) settings from a config's field values, as `grafting_settings_of`; None
    without teachers."""
    if not values.get("teacher_models"):
        return None
    settings = {name: values[name] for name in _KD_FIELDS if name in values}
    settings["teacher_models"] = list(settings["teacher_models"])
    return settings
