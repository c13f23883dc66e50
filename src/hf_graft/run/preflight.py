"""Settings that cannot apply on this machine, found before anything is loaded or trained."""

from __future__ import annotations

import contextlib
import logging

from hf_graft.errors import HfGraftError

__all__ = ["PreflightError", "check_run_settings", "cudnn_benchmark", "cudnn_benchmark_setting"]

logger = logging.getLogger(__name__)


class PreflightError(HfGraftError, ValueError):
    """A setting that cannot work here; the message is one line naming the field."""


def _offline() -> bool:
    try:
        from huggingface_hub import is_offline_mode
    except ImportError:  # older huggingface_hub
        from huggingface_hub.constants import HF_HUB_OFFLINE

        return bool(HF_HUB_OFFLINE)
    return bool(is_offline_mode())


def check_run_settings(args) -> None:
    """Precision flags the device cannot honour, and a Hub upload that offline mode would refuse at the end."""
    import torch

    device = args.device
    for name in ("fp16", "fp16_full_eval"):
        if getattr(args, name, False) and device.type == "cpu":
            raise PreflightError(
                f"GraftingConfig.{name}: true, but this run is on the CPU, where float16 autocast does not apply "
                "(it would silently train in float32); use bf16: true on the CPU, or run on a GPU"
            )
    for name in ("bf16", "bf16_full_eval"):
        if getattr(args, name, False) and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise PreflightError(
                f"GraftingConfig.{name}: true, but {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                "use fp16: true"
            )
    if getattr(args, "push_to_hub", False) and _offline():
        raise PreflightError(
            "GraftingConfig.push_to_hub: true, but HF_HUB_OFFLINE is set, so the upload at the end of training "
            "would fail; unset HF_HUB_OFFLINE, or set push_to_hub: false and upload later with "
            "`hf-graft export CHECKPOINT --push-to-hub REPO`"
        )


def cudnn_benchmark_setting(args) -> bool:
    """`GraftingConfig.cudnn_benchmark`, null read as: on for CUDA unless full_determinism, else unchanged."""
    import torch

    if args.cudnn_benchmark is not None:
        if args.cudnn_benchmark and args.device.type != "cuda":
            logger.warning("GraftingConfig.cudnn_benchmark: true has no effect on %s (cuDNN runs on CUDA devices)",
                           args.device.type)
        return args.cudnn_benchmark
    if args.device.type == "cuda":
        return not args.full_determinism
    return torch.backends.cudnn.benchmark


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    """cuDNN's timed algorithm choice on (or off) for a block, restored after it."""
    import torch

    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous
