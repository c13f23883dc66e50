"""The K students as one `nn.Module`, so that Trainer, Accelerate and DDP see a single model.

Also the population's on-disk description (`graft_population.json`, written beside every
checkpoint's `model.safetensors`) and the loader that turns a checkpoint back into members.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_graft.graft.distill import at_least_float32, kd_loss
from hf_graft.models.registry import check_architecture
from hf_graft.utils.files import POPULATION_FILE, WEIGHTS_FILE
from hf_graft import _compat

__all__ = [
    "OUTPUTS",
    "POPULATION_FILE",
    "PopulationSpec",
    "StudentPopulation",
    "channels_last_batch",
    "create_member",
    "load_checkpoint_members",
]


OUTPUTS = ("logits", "features")  # what the population returns as `logits` in eval mode (`set_output`)


@dataclass
class PopulationSpec:
    """Everything needed to rebuild the members of a checkpoint without the training config."""

    student_model: str
    num_students: int
    num_classes: int
    student_model_kwargs: dict[str, Any] = field(default_factory=dict)
    label_names: list[str] | None = None
    # timm data config used in training: input_size, interpolation, mean, std, crop_pct, crop_mode
    data_config: dict[str, Any] = field(default_factory=dict)
    dataset_name: str | None = None  # what the population was trained on (for the model card)
    eval_split: str | None = None  # what it was evaluated on: a split, or the held-out part (model card)
    task: str = "classification"  # or "reid": evaluated on the members' features (DataArguments.task)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / POPULATION_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "PopulationSpec":
        path = Path(folder) / POPULATION_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; is {folder} a hf_graft training checkpoint?")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: cannot be read ({err}); it is damaged (truncated?)") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a population description (a JSON object)")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def create_member(
    model_name: str,
    *,
    num_classes: int,
    seed: int,
    pretrained: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """One student from timm, initialised under its own seed (the head is new for pretrained bodies)."""
    # fork_rng keeps the caller's global RNG stream untouched by the member's initialisation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(
            model_name, pretrained=pretrained, num_classes=num_classes, **(model_kwargs or {})
        )


def _submodules(module: nn.Module):
    """`module` and every module below it (a shared one may come twice), without building names."""
    stack = [module]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(_compat.submodules(current))


class StudentPopulation(nn.Module):
    # no transformers config: the Trainer reads `model.config` when `label_smoothing_factor` is set (its own
    # label smoother never runs: the population's loss smooths every member's CE itself)
    config = None

    """K classifiers of one architecture trained side by side.

    `forward` takes either one batch for all members (`pixel_values` [B, C, H, W], `labels` [B])
    or one batch per member (`pixel_values` [B, K, C, H, W], `labels` [B, K]; batch first so that
    Accelerate shards and gathers along the batch). Logits come back as [B, K, num_classes].
    The training loss is the *sum* of the members' losses, so each member receives exactly the
    gradient it would get if trained alone.
    """

    def __init__(self, members: Sequence[nn.Module], spec: PopulationSpec | None = None):
        super().__init__()
        if len(members) < 1:
            raise ValueError("StudentPopulation needs at least one member")
        self.members = nn.ModuleList(members)
        self.spec = spec
        # loss weights (grafting+) and every member's CE label smoothing; set by the trainer from GraftingConfig
        self.ce_weight = 1.0
        self.kd_weight = 1.0
        self.kd_temperature = 2.0
        self.label_smoothing = 0.0
        # execution (set by the trainer): batches in channels_last, members fused into one network
        self.channels_last = False
        self.fused = None  # a FusedMembers (not a submodule: it holds no state of its own)
        self.output = "logits"  # in eval mode: "logits", or "features" (re-identification; `set_output`)

    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def task(self) -> str:
        """What the population is trained for: its spec's task ("classification" without a spec)."""
        return getattr(self.spec, "task", "classification") if self.spec is not None else "classification"

    def set_output(self, output: str) -> None:
        """What evaluation (eval mode) returns as `logits`: "logits" ([B, K, classes]), or "features": every
        member's pre-logits features, timm's `forward_head(forward_features(x), pre_logits=True)`, [B, K, D]
        (re-identification ranks by them). Training always returns logits and losses."""
        if output not in OUTPUTS:
            raise ValueError(f"StudentPopulation.set_output: got {output!r}; allowed: {', '.join(OUTPUTS)}")
        self.output = output

    def set_execution(self, *, channels_last: bool = False, fused: bool = False, model_name: str = "") -> None:
        """channels_last: members (and batches, in `forward`) in channels_last memory format.
        fused: run the members as one wide network (`fused.FusedMembers`; raises `FusionError`, one
        line, for an architecture that has no fused form)."""
        from hf_graft.population.fused import FusedMembers

        self.channels_last = channels_last
        if channels_last:
            self.members.to(memory_format=torch.channels_last)
        self.fused = FusedMembers(self.members, model_name) if fused else None
        if self.fused is not None:
            self.fused.train(self.training)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .float() replace buffers: re-bind the fused members' statistics views
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "fused", None) is not None:
            self.fused.bind_buffers()
        return out

    # The Trainer calls `train()` and `zero_grad()` around every step. nn.Module's versions walk every
    # submodule through named iterators (~2 ms a step for two ResNet-56 members), host time that small
    # members' steps, bound by kernel launches on a GPU, cannot spare; these walk the module dicts directly (`_compat.submodules`).
    def train(self, mode: bool = True):
        if any(m.training != mode for m in _submodules(self)):
            super().train(mode)
        if getattr(self, "fused", None) is not None:
            self.fused.train(mode)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            return super().zero_grad(set_to_none=False)
        for module in _submodules(self):
            for param in _compat.own_parameters(module).values():
                if param is not None:
                    param.grad = None

    @classmethod
    def from_spec(
        cls,
        spec: PopulationSpec,
        *,
        seed: int = 42,
        pretrained: bool = False,
        shared_init: bool = False,
    ) -> "StudentPopulation":
        members = []
        for k in range(spec.num_students):
            member_seed = seed if shared_init else seed + 1000 * k
            members.append(
                create_member(
                    spec.student_model,
                    num_classes=spec.num_classes,
                    seed=member_seed,
                    pretrained=pretrained,
                    model_kwargs=spec.student_model_kwargs,
                )
            )
        return cls(members, spec)

    def _member_view(self, tensor: torch.Tensor | None, k: int, per_member_ndim: int) -> torch.Tensor | None:
        if tensor is None:
            return None
        return tensor[:, k] if tensor.ndim == per_member_ndim else tensor

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        per_member_input = pixel_values.ndim == 5
        if per_member_input and pixel_values.shape[1] != self.num_members:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} member views, the population has {self.num_members}"
            )
        features = self.output == "features" and not self.training  # labels are not used then
        if self.fused is not None:
            stacked = self.fused(pixel_values, channels_last=self.channels_last, features=features)
            if features:
                return {"logits": stacked}
            if labels is None:
                return {"logits": stacked}
            from hf_graft.population.fused import fused_member_losses

            ce, kd = fused_member_losses(stacked, labels, teacher_logits, self.kd_temperature,
                                         label_smoothing=self.label_smoothing)
            return self._outputs(stacked, ce, kd)
        if self.channels_last:
            pixel_values = channels_last_batch(pixel_values)
        logits, ce_terms, kd_terms = [], [], []
        for k, member in enumerate(self.members):
            if not per_member_input:
                x = pixel_values
            elif self.channels_last:
                x = pixel_values[:, k]  # a channels_last block of the batch: no copy
            else:
                # a member's view of [B, K, C, H, W] is strided; convolutions on it are ~8% slower
                # forward and backward on CPU than on a contiguous copy (benchmarks/throughput.py)
                x = pixel_values[:, k].contiguous()
            if features:
                logits.append(member.forward_head(member.forward_features(x), pre_logits=True))
                continue
            z = member(x)
            logits.append(z)
            if labels is not None:
                y = self._member_view(labels, k, per_member_ndim=2)
                ce_terms.append(F.cross_entropy(at_least_float32(z), y, label_smoothing=self.label_smoothing))
                if teacher_logits is not None:
                    # teacher_logits: [M, B, C] shared, or [M, B, K, C] per member
                    t = teacher_logits[:, :, k] if teacher_logits.ndim == 4 else teacher_logits
                    kd_terms.append(kd_loss(z, t, self.kd_temperature))
        stacked = torch.stack(logits, dim=1)
        if labels is None or features:
            return {"logits": stacked}
        return self._outputs(stacked, torch.stack(ce_terms), torch.stack(kd_terms) if kd_terms else None)

    def _outputs(self, logits: torch.Tensor, ce: torch.Tensor, kd: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"logits": logits}
        member_loss = self.ce_weight * ce
        if kd is not None:
            member_loss = member_loss + self.kd_weight * kd
            out["member_kd"] = kd.detach()
        out["member_ce"] = ce.detach()
        out["loss"] = member_loss.sum()
        return out


def channels_last_batch(pixel_values: torch.Tensor) -> torch.Tensor:
    """The batch in channels_last: [B, C, H, W] as such; [B, K, C, H, W] in memory order K, B, H, W, C,
    so that every member's `pixel_values[:, k]` is a channels_last [B, C, H, W] block (no copy per
    member). Free when the batch already has that layout."""
    if pixel_values.ndim == 4:
        return pixel_values.contiguous(memory_format=torch.channels_last)
    return pixel_values.permute(1, 0, 3, 4, 2).contiguous().permute(1, 0, 4, 2, 3)


def load_checkpoint_members(
    checkpoint_dir: str | os.PathLike, members: Sequence[int] | None = None
) -> tuple[PopulationSpec, list[nn.Module]]:
    """Rebuild members (all, or the given indices) of a training checkpoint, in eval mode."""
    from safetensors.torch import load_file

    checkpoint_dir = Path(checkpoint_dir)
    spec = PopulationSpec.load(checkpoint_dir)
    weights = checkpoint_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: not found (a hf_graft checkpoint holds {WEIGHTS_FILE})")
    indices = list(range(spec.num_students)) if members is None else list(members)
    for k in indices:
        if not 0 <= k < spec.num_students:
            raise ValueError(f"member {k}: out of range, {checkpoint_dir} holds members 0..{spec.num_students - 1}")
    check_architecture(spec.student_model, str(checkpoint_dir / POPULATION_FILE))
    state = load_file(str(weights))
    loaded = []
    for k in indices:
        prefix = f"members.{k}."
        member_state = {name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)}
        model = create_member(
            spec.student_model, num_classes=spec.num_classes, seed=0, model_kwargs=spec.student_model_kwargs
        )
        model.load_state_dict(member_state, strict=True)
        loaded.append(model.eval())
    return spec, loaded
