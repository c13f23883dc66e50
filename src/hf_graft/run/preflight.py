"""Settings that cannot apply on this machine, found before anything is loaded or trained."""

from __future__ import annotations

__all__ = ["PreflightError", "check_run_settings"]


class PreflightError(ValueError):
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
    if getattr(args, "push_student_to_hub", False) and _offline():
        raise PreflightError(
            "GraftingConfig.push_to_hub: true, but HF_HUB_OFFLINE is set, so the upload at the end of training "
            "would fail; unset HF_HUB_OFFLINE, or set push_to_hub: false and upload later with "
            "`hf-graft export CHECKPOINT --push-to-hub REPO`"
        )
