"""Which shortcut a saved CIFAR ResNet was built with, when its config.json does not say.

Every CIFAR ResNet records ``shortcut`` among timm's reconstruction arguments, so the config.json
that ``hf-graft export`` or timm's ``save_for_hf`` writes names it in ``model_args``. A saved
config without it was written when the projection shortcut (option B) was the only one; the
weights decide when they can be read without loading them (a local ``model.safetensors``: option
B has shortcut conv weights, option A has none), otherwise such a config means option B.

timm (``local-dir:`` / ``hf-hub:``) applies this by itself, through the model factory.
transformers builds the network from ``model_args`` alone, before it reads any weight; for a
folder saved before the shortcut was recorded, pass it ``model_args=saved_model_args(folder)``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["saved_model_args", "saved_shortcut", "shortcut_of_weights"]

# option B's projection: layer<stage>.<block>.shortcut.0.weight (under any prefix, e.g. timm_model.)
_PROJECTION_WEIGHT = re.compile(r"(^|\.)layer\d+\.\d+\.shortcut\.0\.weight$")
_SAVED_SOURCES = ("local-dir", "hf-hub")
_WEIGHTS_FILE = "model.safetensors"


def shortcut_of_weights(names: Iterable[str]) -> str:
    """'B' when the state dict names hold a projection-shortcut conv weight, else 'A'."""
    return "B" if any(_PROJECTION_WEIGHT.search(name) for name in names) else "A"


def _weight_names(folder: str | os.PathLike | None) -> list[str] | None:
    """The tensor names of a local folder's model.safetensors (its header only), or None."""
    if not folder:
        return None
    path = Path(folder)
    path = path / _WEIGHTS_FILE if path.is_dir() else path
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def saved_shortcut(pretrained_cfg: Any) -> str | None:
    """The shortcut of a CIFAR ResNet rebuilt from a saved config that does not name one.

    `pretrained_cfg` is what timm hands the model factory; None when it does not come from a saved
    config (a fresh model, where the default applies). Call it only when no `shortcut` was given
    (timm passes a saved config's `model_args` on as arguments).
    """
    if pretrained_cfg is not None and not isinstance(pretrained_cfg, Mapping):
        pretrained_cfg = getattr(pretrained_cfg, "__dict__", None)
    if not isinstance(pretrained_cfg, Mapping) or pretrained_cfg.get("source") not in _SAVED_SOURCES:
        return None
    names = _weight_names(pretrained_cfg.get("file")) if pretrained_cfg.get("source") == "local-dir" else None
    return "B" if names is None else shortcut_of_weights(names)


def saved_model_args(folder: str | os.PathLike) -> dict[str, Any]:
    """A model folder's `model_args`, with the `shortcut` of a CIFAR ResNet saved before it was
    recorded; for `AutoModelForImageClassification.from_pretrained(folder, model_args=...)`."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_args = dict(config.get("model_args") or {})
    architecture = str(config.get("architecture", ""))
    if architecture.startswith("cifar_resnet") and "shortcut" not in model_args:
        names = _weight_names(folder)
        model_args["shortcut"] = "B" if names is None else shortcut_of_weights(names)
    return model_args
