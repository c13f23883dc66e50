"""Model names and folders: what a string in a recipe or on the command line names, and loading it.

One set of rules for the students (`student_model`), the teachers (`teacher_models`) and
`hf-graft analyze`:

* `hf-hub:ORG/NAME`: a timm model on the Hub (from the local cache when offline);
* a folder, or `local-dir:FOLDER`: a model folder (config.json + model.safetensors or
  pytorch_model.bin, as `hf-graft export` and timm write them), or a training checkpoint (it holds
  graft_population.json; `FOLDER#memberK` picks one member);
* anything else: a name in timm's registry (`timm.list_models()`; the cifar_* architectures once
  `hf_graft` is imported).

Nothing is loaded while resolving, so a wrong name fails before any data or weights are touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from hf_graft.population.students import POPULATION_FILE
from hf_graft.utils.files import CONFIG_FILE, is_unfinished_checkpoint
from hf_graft.errors import HfGraftError

__all__ = [
    "ACCEPTED", "ModelSource", "ModelSourceError", "check_model_name", "hub_model_error", "load_teacher",
    "resolve_model_source",
]

MODEL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ACCEPTED = (
    "a timm model name (timm.list_models()), an 'hf-hub:' id, a model folder (config.json + model.safetensors, "
    f"as hf-graft export writes it; 'local-dir:FOLDER' too), or a training checkpoint folder (with "
    f"{POPULATION_FILE}, optionally #memberK)"
)
# what a single network (a student architecture or a teacher) can be
SINGLE_MODEL = ("timm", "hub", "folder")
SINGLE_ACCEPTED = (
    "a timm model name (timm.list_models()), an 'hf-hub:' id, or a model folder (config.json + model.safetensors, "
    "as hf-graft export writes it; 'local-dir:FOLDER' too)"
)


class ModelSourceError(HfGraftError, ValueError):
    """A name that denotes no model; `problem` says why, in a few words."""

    def __init__(self, spec: str, problem: str):
        super().__init__(f"{spec!r}: {problem}")
        self.spec, self.problem = spec, problem


@dataclass
class ModelSource:
    """What a model name refers to; resolved without loading any weights."""

    spec: str
    kind: str  # "timm" | "hub" | "folder" | "checkpoint"
    location: str  # timm name, hf-hub id or folder
    member: int | None = None  # checkpoint member picked with #memberK

    @property
    def timm_name(self) -> str:
        """The name `timm.create_model` takes for a single model."""
        if self.kind == "checkpoint":
            raise ModelSourceError(self.spec, "a training checkpoint holds a whole population, not one model")
        return f"local-dir:{os.path.abspath(self.location)}" if self.kind == "folder" else self.location


def _parse_member(text: str) -> int | None:
    digits = text[len("member"):] if text.startswith("member") else text
    return int(digits) if digits.isdigit() else None


def resolve_model_source(spec: str) -> ModelSource:
    """Classify a model name by the rules of the module docstring, or raise `ModelSourceError`."""
    if spec.startswith("hf-hub:"):
        if len(spec) == len("hf-hub:"):
            raise ModelSourceError(spec, "empty hf-hub id")
        return ModelSource(spec, "hub", spec)
    local = spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec
    base, member = local, None
    if "#" in local:
        head, _, tail = local.rpartition("#")
        member = _parse_member(tail)
        if member is None:
            raise ModelSourceError(spec, "the part after '#' must be memberK (K an integer)")
        base = head

    folder = Path(base).expanduser()
    if folder.is_dir():
        if (folder / POPULATION_FILE).is_file():
            if is_unfinished_checkpoint(folder):
                raise ModelSourceError(spec, "is what an interrupted checkpoint save left behind, not a checkpoint; "
                                             "use a checkpoint-N folder")
            return ModelSource(spec, "checkpoint", str(folder), member)
        if member is not None:
            raise ModelSourceError(
                spec, f"'#memberK' needs a training checkpoint folder (one with {POPULATION_FILE})")
        if (folder / CONFIG_FILE).is_file() and any((folder / f).is_file() for f in MODEL_WEIGHT_FILES):
            return ModelSource(spec, "folder", str(folder))
        raise ModelSourceError(spec, f"folder holds neither {POPULATION_FILE} nor config.json + model.safetensors")
    if folder.exists():
        raise ModelSourceError(spec, "is a file, not a folder")
    if spec.startswith("local-dir:") or member is not None or "/" in spec or os.sep in spec:
        raise ModelSourceError(spec, "no such folder")

    import timm

    from hf_graft import models  # noqa: F401  (the cifar_* architectures)

    if timm.is_model(spec):
        return ModelSource(spec, "timm", spec)
    raise ModelSourceError(spec, "not a folder, a known timm model name or an hf-hub: id")


def check_model_name(owner: str, field: str, value: str) -> ModelSource:
    """A single model for a config field (`owner.field`): one line naming the field when it is not one."""
    try:
        source = resolve_model_source(value)
    except ModelSourceError as err:
        raise ValueError(f"{owner}.{field}: got {value!r}; {err.problem}; allowed: {SINGLE_ACCEPTED}") from None
    if source.kind not in SINGLE_MODEL:
        raise ValueError(
            f"{owner}.{field}: got {value!r}; a training checkpoint (a whole population): export one member first "
            "(hf-graft export) or use the run's output_dir/student"
        )
    return source


def hub_model_error(field: str, name: str, error: BaseException) -> ValueError:
    """One line naming the config field and the `hf-hub:` id that could not be loaded, and why."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        from huggingface_hub import is_offline_mode

        offline = bool(is_offline_mode())
    except ImportError:  # older huggingface_hub
        from huggingface_hub.constants import HF_HUB_OFFLINE as offline
    if isinstance(error, LocalEntryNotFoundError) and offline:
        why = ("it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it once online "
               "(or unset HF_HUB_OFFLINE), or use a timm model name or a local model folder")
    elif isinstance(error, GatedRepoError):
        why = "the repo is gated: accept its terms on the Hub and log in (`hf auth login`)"
    elif isinstance(error, RepositoryNotFoundError):
        why = "no such model repo on the Hub (or it is private: log in with `hf auth login`)"
    else:
        lines = str(error).strip().splitlines()
        why = f"cannot load it ({type(error).__name__}: {lines[0] if lines else ''})"
    return ValueError(f"{field}: {name!r}: {why}")


def load_teacher(name: str, model_kwargs: dict | None = None) -> nn.Module:
    """A frozen teacher (eval mode, no gradients) from a model name (see the module docstring)."""
    import timm

    source = check_model_name("GraftingConfig", "teacher_models", name)
    if source.kind == "folder":  # a cifar_* folder without `import hf_graft`: one line naming the fix
        from hf_graft.models.registry import check_folder_architecture

        check_folder_architecture(source.location, f"GraftingConfig.teacher_models: {name!r}")
    kwargs = dict(model_kwargs or {})
    try:
        model = timm.create_model(source.timm_name, pretrained=True, **kwargs)
    except Exception as err:
        if source.kind == "hub":
            raise hub_model_error("GraftingConfig.teacher_models", name, err) from err
        if source.kind != "timm":
            raise
        raise ValueError(
            f"GraftingConfig.teacher_models: no trained weights for {name!r} available here "
            f"({type(err).__name__}); use a local folder of a trained model"
        ) from err
    return model.eval().requires_grad_(False)
