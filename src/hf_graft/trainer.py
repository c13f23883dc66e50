"""Import path kept for user code: `GraftingTrainer` lives in `hf_graft.training.trainer`."""

from hf_graft.training.trainer import GraftingCallback, GraftingTrainer  # noqa: F401

__all__ = ["GraftingCallback", "GraftingTrainer"]
