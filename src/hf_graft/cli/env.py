"""`hf-graft env`: the versions a bug report needs, one `- name: value` a line, to paste into the report
(as `transformers env` does)."""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Sequence

__all__ = ["environment", "main"]

# the packages a run uses, then the optional ones (extras)
PACKAGES = ("timm", "transformers", "accelerate", "datasets", "huggingface_hub", "safetensors", "evaluate", "numpy",
            "filelock")
OPTIONAL = ("matplotlib", "tensorboard")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _torch() -> list[tuple[str, str]]:
    try:
        import torch
    except ImportError:
        return [("torch", "not installed")]
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    rows = [
        ("torch", torch.__version__),
        ("torch CUDA", torch.version.cuda or "none (a CPU build)"),
        ("torch cuDNN", str(cudnn) if cudnn else "none"),
    ]
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        rows.append(("GPU", f"{torch.cuda.device_count()} x {', '.join(names)}"))
    else:
        rows.append(("GPU", "none"))
    return rows


def environment() -> list[tuple[str, str]]:
    """(name, value) of hf_graft, Python, the platform, torch and its GPU, and the libraries hf_graft uses."""
    import hf_graft

    offline = os.environ.get("HF_HUB_OFFLINE")
    return [
        ("hf_graft", hf_graft.__version__),
        ("Python", platform.python_version()),
        ("Platform", platform.platform()),
        *_torch(),
        *((name, _version(name)) for name in PACKAGES),
        *((name, _version(name)) for name in OPTIONAL),
        ("HF_HUB_OFFLINE", f"set ({offline})" if offline is not None else "not set"),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print("usage: hf-graft env\n\nPrint the versions a bug report needs, one `- name: value` a line.")
        return 0
    if argv:
        print(f"hf-graft env: error: takes no arguments, got {' '.join(argv)}", file=sys.stderr)
        return 2
    print("Copy and paste the lines below into your bug report:\n")
    for name, value in environment():
        print(f"- {name}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
