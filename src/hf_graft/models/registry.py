"""Is an architecture in timm's registry? If not, a one-line error that names it and says how to fix it.

hf_graft's CIFAR architectures (`cifar_resnet20`, ...) exist in timm only after `import hf_graft`;
a folder exported with one of them says so in its config.json (`hf_graft_note`) and model card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from hf_graft.utils.files import CONFIG_FILE
from hf_graft.errors import HfGraftError

__all__ = [
    "HF_GRAFT_ARCHITECTURES",
    "UnknownArchitectureError",
    "architecture_note",
    "check_architecture",
    "check_folder_architecture",
]

HF_GRAFT_ARCHITECTURES = (
    "cifar_resnet20", "cifar_resnet32", "cifar_resnet56", "cifar_resnet110", "cifar_mobilenetv2", "cifar_wrn28_10",
)


class UnknownArchitectureError(HfGraftError, ValueError):
    """A model names an architecture that timm's registry does not hold."""


def architecture_note(architecture: str) -> dict[str, str]:
    """The `hf_graft_note` entry of an exported config.json (empty for timm's own architectures)."""
    if architecture not in HF_GRAFT_ARCHITECTURES:
        return {}
    return {
        "hf_graft_note": f"{architecture} is registered in timm by the hf_graft package (installed from its "
        "source repository, as the project's README describes; not from the package index): run `import hf_graft` "
        "before loading this model with timm or transformers"
    }


def check_architecture(architecture: str, where: str) -> None:
    """Raise UnknownArchitectureError (one line: `where`, the architecture, the fix) if timm lacks it."""
    import timm

    if architecture.startswith(("hf-hub:", "local-dir:")) or timm.is_model(architecture):
        return  # ids are resolved (and checked) when their config is read
    if architecture in HF_GRAFT_ARCHITECTURES:
        fix = "it is registered by hf_graft: run `import hf_graft` before loading"
    elif architecture.startswith("cifar_"):
        fix = f"hf_graft registers {', '.join(HF_GRAFT_ARCHITECTURES)}; this one needs the package that defines it"
    else:
        fix = "upgrade timm (pip install -U timm) or import the package that registers it"
    raise UnknownArchitectureError(
        f"{where}: architecture {architecture!r} is not in timm's registry (timm {timm.__version__}); {fix}"
    )


def check_folder_architecture(folder: str | os.PathLike, where: str | None = None) -> str | None:
    """Check the `architecture` of a model folder's config.json; returns it (None when the file has none)."""
    path = Path(folder) / CONFIG_FILE
    try:
        architecture = json.loads(path.read_text(encoding="utf-8")).get("architecture")
    except (OSError, ValueError, AttributeError):
        return None  # no readable timm config: the loader that reads it reports that
    if isinstance(architecture, str):
        check_architecture(architecture, where or str(path))
        return architecture
    return None
