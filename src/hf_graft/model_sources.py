"""Model names and folders: what a string in a recipe or on the command line names, and loading it."""

from __future__ import annotations

import os

import torch.nn as nn

__all__ = ["load_teacher"]


def load_teacher(name: str, model_kwargs: dict | None = None) -> nn.Module:
    """A frozen teacher from a timm name, an 'hf-hub:'/'local-dir:' id or a folder hf_graft exported."""
    import timm

    kwargs = dict(model_kwargs or {})
    if os.path.isdir(name):
        if os.path.isfile(os.path.join(name, "graft_population.json")):
            raise ValueError(
                f"GraftingConfig.teacher_models: {name!r} is a training checkpoint (a whole population); "
                "export one member first (hf-graft export) or point at output_dir/student"
            )
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(f"GraftingConfig.teacher_models: folder {name!r} has no config.json")
        model = timm.create_model(f"local-dir:{os.path.abspath(name)}", pretrained=True, **kwargs)
    elif name.startswith(("hf-hub:", "local-dir:")):
        model = timm.create_model(name, pretrained=True, **kwargs)
    elif timm.is_model(name):
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:
            raise ValueError(
                f"GraftingConfig.teacher_models: no trained weights for {name!r} available here "
                f"({type(err).__name__}); use a local folder of a trained model"
            ) from err
    else:
        raise ValueError(
            f"GraftingConfig.teacher_models: {name!r} is neither a timm model name, an hf-hub:/local-dir: id, "
            "nor an existing folder"
        )
    return model.eval().requires_grad_(False)
