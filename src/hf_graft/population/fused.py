"""Fused members (`member_execution: fused`): the K students of one architecture as one wide network.

Every `Conv2d` of the K members runs as one convolution with K times the groups, every BatchNorm as
one batch norm over K times the channels, every `Linear` as one batched matrix product, every
zero-padding shortcut as a padding of each member's channel block; activations, pooling, dropout and
residual additions act on the wide tensor exactly as on one member's. Channel
block k of every wide activation belongs to member k, and a grouped convolution never mixes groups,
so the wide network computes exactly the K members' outputs, with one set of kernels instead of K.
That is meant for small members on a GPU, whose many small kernels, launched one member after the
other, leave it idle (`benchmarks/gpu_step.py` measures it against the loop and a hand loop).

Why a grouped network: `torch.func` stacking (vmap over stacked weights) needs the stacked weights
as the leaves or a copy back to the members every step, and runs convolutions as the same grouped
kernels anyway; CUDA graphs shorten only the launches, need static input buffers and do not run on
CPU. The grouped network keeps the members' own parameters as the leaves and runs on CPU and GPU,
under autocast, in channels_last and under `torch.compile`.

What stays exactly as in loop execution:

* parameters: the members' own `nn.Parameter`s are the leaves. Each forward concatenates a layer's
  K weights (one `torch.cat` per tensor); the backward of the concatenation hands every member its
  own gradient. Optimizer, per-member learning rates and clipping, grafting, filter metrics, export
  and checkpoints see the members as in loop execution (the wide network is not a submodule, so
  `state_dict()` and `parameters()` are the population's own).
* BatchNorm running statistics: each member's `running_mean`, `running_var` and
  `num_batches_tracked` are views into one buffer per layer (member k holds channels
  [k C, (k + 1) C)), so the single `batch_norm` call updates every member's own statistics in place.
  `StudentPopulation` re-binds the views after `.to()` / `.cuda()` (which replace buffers); every
  forward re-binds them if something else replaced a member's buffer. Writes into the members'
  buffers (grafting, `load_state_dict`, recalibration) reach the fused buffers through the views.
  Because members then share storage, checkpoints are written through `separate_storage`.

Which architectures fuse is decided by an allow-list of module types whose forward code is known to
act on each channel on its own (`check_fusable`); anything else fails when a run is built (before any
data is decoded) or at trainer construction, with a one-line error naming the model and the layer type.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_graft.graft.distill import at_least_float32, averaged_teacher_probs
from hf_graft import _compat
from hf_graft.errors import HfGraftError

__all__ = ["FusedMembers", "FusionError", "check_fusable", "fused_member_losses", "separate_storage"]


class FusionError(HfGraftError, ValueError):
    """A population that cannot run fused; the message is one line."""


# ----------------------------------------------------------------------------- what fuses
def _timm_types(module_path: str, *names: str) -> tuple[type, ...]:
    module = _compat.timm_module(module_path)
    if module is None:
        return ()
    return tuple(getattr(module, n) for n in names if isinstance(getattr(module, n, None), type))


def _conv_types() -> tuple[type, ...]:
    return (nn.Conv2d, *_timm_types("timm.layers.conv2d_same", "Conv2dSame"))


def _norm_types() -> tuple[type, ...]:
    return (nn.BatchNorm2d, *_timm_types("timm.layers.norm_act", "BatchNormAct2d"))


def _linear_types() -> tuple[type, ...]:
    return (nn.Linear, *_timm_types("timm.layers.linear", "Linear"))


def _drop_path_types() -> tuple[type, ...]:
    return _timm_types("timm.layers.drop", "DropPath")


def _container_types() -> tuple[type, ...]:
    """Modules whose own forward code only calls their children, adds, multiplies and pools per
    channel (read from their source): they run unchanged on the wide tensor."""
    from hf_graft.models import BasicBlock, CifarMobileNetV2, CifarResNet, CifarWideResNet, InvertedResidual, PreActBlock

    return (
        nn.Sequential, nn.ModuleList, CifarResNet, BasicBlock, CifarMobileNetV2, InvertedResidual,
        CifarWideResNet, PreActBlock,
        *_timm_types("timm.models.resnet", "ResNet", "BasicBlock", "Bottleneck"),
        *_timm_types("timm.models.efficientnet", "EfficientNet"),
        *_timm_types("timm.models.mobilenetv3", "MobileNetV3"),
        *_timm_types(_compat.TIMM_EFFICIENTNET_BLOCKS, "SqueezeExcite", "ConvBnAct", "DepthwiseSeparableConv",
                     "InvertedResidual", "EdgeResidual"),
        *_timm_types("timm.layers.adaptive_avgmax_pool", "SelectAdaptivePool2d"),
    )


def _channel_pad_types() -> tuple[type, ...]:
    """Parameter-free layers that add channels (a zero-padding shortcut): they must pad every
    member's channel block on its own, not the wide tensor's ends."""
    from hf_graft.models import ZeroPadShortcut

    return (ZeroPadShortcut,)


def _stateless_types() -> tuple[type, ...]:
    """Parameter-free layers that act on every channel on its own (elementwise or spatial)."""
    return (
        nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
        nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Dropout, nn.Dropout2d, nn.MaxPool2d,
        nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
        *_timm_types("timm.layers.activations", "Swish", "Mish", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid",
                     "HardMish", "GELU", "GELUTanh", "QuickGELU"),
        *_timm_types("timm.layers.adaptive_avgmax_pool", "AdaptiveAvgMaxPool2d", "FastAdaptiveAvgPool",
                     "FastAdaptiveMaxPool", "FastAdaptiveAvgMaxPool"),
    )


def _type_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_fusable(model: nn.Module, model_name: str = "") -> None:
    """Raise `FusionError` (one line) unless every layer of `model` has a fused form."""
    conv, norm, linear = _conv_types(), _norm_types(), _linear_types()
    containers, stateless, drop_path = _container_types(), _stateless_types(), _drop_path_types()
    channel_pad = _channel_pad_types()
    name = model_name or type(model).__name__

    def fail(path: str, module: nn.Module, why: str = "has no fused form") -> None:
        where = f"layer {path} of type" if path else "model type"
        raise FusionError(
            f"GraftingConfig.member_execution: 'fused' cannot run {name}: {where} {_type_name(module)} {why}; "
            "use member_execution: loop for this architecture"
        )

    def visit(path: str, module: nn.Module) -> None:
        kind = type(module)
        if kind in conv or kind in linear:
            return
        if kind in norm:
            for child_name, child in module.named_children():  # BatchNormAct2d: drop, act
                if type(child) not in stateless:
                    fail(f"{path}.{child_name}", child)
            return
        if kind in drop_path or kind in stateless or kind in channel_pad:
            if kind is nn.Flatten and (module.start_dim != 1 or module.end_dim != -1):
                fail(path, module, f"flattens dims {module.start_dim}..{module.end_dim} (only 1..-1 fuses)")
            return
        if kind not in containers:
            fail(path, module)
        if _compat.own_parameters(module) or any(b is not None for b in _compat.own_buffers(module).values()):
            fail(path, module, "holds its own parameters or buffers")
        pool_type = getattr(module, "pool_type", None)
        if pool_type is not None and "cat" in str(pool_type):
            fail(path, module, f"concatenates poolings (pool_type {pool_type!r}) across channels")
        for child_name, child in module.named_children():
            visit(f"{path}.{child_name}" if path else child_name, child)

    visit("", model)


def _check_alike(members: Sequence[nn.Module], model_name: str) -> None:
    ref = members[0]
    ref_modules = list(ref.named_modules())
    ref_state = ref.state_dict()
    for k, member in enumerate(members[1:], start=1):
        modules = list(member.named_modules())
        state = member.state_dict()
        same = len(modules) == len(ref_modules) and all(
            a == b and type(m) is type(n) for (a, m), (b, n) in zip(ref_modules, modules)
        ) and state.keys() == ref_state.keys() and all(
            state[key].shape == ref_state[key].shape and state[key].dtype == ref_state[key].dtype for key in state
        )
        if not same:
            raise FusionError(
                f"GraftingConfig.member_execution: 'fused' needs members of one architecture; member {k} of "
                f"{model_name or type(ref).__name__} differs from member 0"
            )


# ----------------------------------------------------------------------------- fused layers
def _cat(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat(list(tensors))


class _FusedConv2d(nn.Module):
    """K convolutions as one with K times the groups (member k: output channels [k O, (k + 1) O))."""

    def __init__(self, convs: Sequence[nn.Conv2d]):
        super().__init__()
        self.convs = tuple(convs)  # a tuple: not registered, the members own these modules
        conv = convs[0]
        for other in convs[1:]:
            if (other.stride, other.padding, other.dilation, other.groups, other.padding_mode) != (
                    conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode):
                raise FusionError(
                    "GraftingConfig.member_execution: 'fused' needs identical convolutions in every member")
        self.same_padding = type(conv).__name__ == "Conv2dSame"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.convs[0]
        weight = torch.cat([c.weight for c in self.convs])
        bias = _cat([c.bias for c in self.convs])
        groups = conv.groups * len(self.convs)
        padding = conv.padding
        if self.same_padding:
            from timm.layers.padding import pad_same

            x = pad_same(x, conv.weight.shape[-2:], conv.stride, conv.dilation)
            padding = 0
        elif conv.padding_mode != "zeros":
            x = F.pad(x, _compat.conv_padding(conv), mode=conv.padding_mode)
            padding = 0
        return F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, groups)


_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class _FusedBatchNorm(nn.Module):
    """K BatchNorm2d (or timm BatchNormAct2d) as one over K times the channels.

    The members' running statistics are views into this layer's fused buffers (see the module
    docstring); `bind` (re-)establishes them.
    """

    def __init__(self, norms: Sequence[nn.BatchNorm2d]):
        super().__init__()
        self.norms = tuple(norms)
        norm = norms[0]
        for other in norms[1:]:
            same = (other.eps, other.affine, other.track_running_stats) == (norm.eps, norm.affine, norm.track_running_stats)
            if not same:
                raise FusionError(
                    "GraftingConfig.member_execution: 'fused' needs identical BatchNorm layers in every member")
        self.with_act = hasattr(norm, "act")  # timm BatchNormAct2d: dropout and activation after the norm
        self.fused: dict[str, torch.Tensor] = {}
        self.views: dict[str, tuple[torch.Tensor, ...]] = {}
        self.bind()

    def bind(self) -> None:
        """Make every member's statistics views into one fused buffer per statistic, unless they are."""
        for name in _BN_BUFFERS:
            current = [_compat.own_buffers(norm).get(name) for norm in self.norms]
            if current[0] is None:
                self.fused.pop(name, None)
                self.views.pop(name, None)
                continue
            views = self.views.get(name)
            if views is not None and all(c is v for c, v in zip(current, views)):
                continue
            fused = torch.cat([c.detach().reshape(-1) for c in current])
            n = current[0].numel()
            views = tuple(fused[k] if current[0].ndim == 0 else fused[k * n:(k + 1) * n] for k in range(len(current)))
            for norm, view in zip(self.norms, views):
                _compat.own_buffers(norm)[name] = view
            self.fused[name], self.views[name] = fused, views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norms[0]
        if not torch.compiler.is_compiling():
            self.bind()  # cheap identity checks; re-binds after something replaced a member's buffer
        factor = 0.0 if norm.momentum is None else norm.momentum
        count = self.fused.get("num_batches_tracked")
        if norm.training and norm.track_running_stats and count is not None:
            count.add_(1)  # every member's num_batches_tracked, as each BatchNorm does in loop execution
            factor = 1.0 / float(count[0]) if norm.momentum is None else norm.momentum
        bn_training = norm.training or ("running_mean" not in self.fused and "running_var" not in self.fused)
        use_stats = not norm.training or norm.track_running_stats
        x = F.batch_norm(
            x,
            self.fused.get("running_mean") if use_stats else None,
            self.fused.get("running_var") if use_stats else None,
            _cat([n.weight for n in self.norms]),
            _cat([n.bias for n in self.norms]),
            bn_training,
            factor,
            norm.eps,
        )
        if self.with_act:
            x = norm.act(norm.drop(x))
        return x


class _FusedLinear(nn.Module):
    """K linear layers as one batched matrix product on [..., K * in] -> [..., K * out]."""

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        self.linears = tuple(linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = len(self.linears)
        weight = torch.stack([m.weight for m in self.linears])  # [K, out, in]
        members = x.unflatten(-1, (K, -1))  # [..., K, in]
        out = torch.einsum("...ki,koi->...ko", members, weight)
        if self.linears[0].bias is not None:
            out = out + torch.stack([m.bias for m in self.linears])
        return out.flatten(-2)


class _FusedDropPath(nn.Module):
    """timm DropPath with one keep/drop draw per sample and member (members drop independently)."""

    def __init__(self, drop_path: nn.Module, num_members: int):
        super().__init__()
        self.drop_path = drop_path
        self.num_members = num_members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.drop_path.drop_prob
        if p == 0.0 or not self.drop_path.training:
            return x
        keep = 1.0 - p
        mask = x.new_empty(x.shape[0], self.num_members, *([1] * (x.ndim - 2))).bernoulli_(keep)
        if keep > 0.0 and self.drop_path.scale_by_keep:
            mask.div_(keep)
        return x * mask.repeat_interleave(x.shape[1] // self.num_members, dim=1)


class _FusedChannelPad(nn.Module):
    """A zero-padding shortcut on the wide tensor: member k's channel block is padded on its own,
    so its channels land where they would in the member alone."""

    def __init__(self, shortcut: nn.Module, num_members: int):
        super().__init__()
        self.shortcut = shortcut
        self.num_members = num_members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut.forward_grouped(x, self.num_members)


# ----------------------------------------------------------------------------- the wide network
class FusedMembers:
    """Runs K members of one architecture as one wide network; see the module docstring.

    Not an `nn.Module` on purpose: it holds no tensors of its own that a state dict, an optimizer
    or `.to()` should see. `__call__(pixel_values)` takes [B, K, C, H, W] (one batch per member)
    or [B, C, H, W] (shared) and returns logits [B, K, classes], or features [B, K, D].
    """

    def __init__(self, members: Sequence[nn.Module], model_name: str = ""):
        members = list(members)
        check_fusable(members[0], model_name)
        _check_alike(members, model_name)
        self.num_members = len(members)
        conv, norm, linear, drop_path = _conv_types(), _norm_types(), _linear_types(), _drop_path_types()
        channel_pad = _channel_pad_types()
        memo: dict[int, nn.Module] = {}
        self.norms: list[_FusedBatchNorm] = []
        peers_of = [dict(m.named_modules()) for m in members]
        for path, module in members[0].named_modules():
            peers = [p[path] for p in peers_of]
            kind = type(module)
            if kind in conv:
                memo[id(module)] = _FusedConv2d(peers)
            elif kind in norm:
                fused_norm = _FusedBatchNorm(peers)
                self.norms.append(fused_norm)
                memo[id(module)] = fused_norm
            elif kind in linear:
                memo[id(module)] = _FusedLinear(peers)
            elif kind in drop_path:
                memo[id(module)] = _FusedDropPath(module, self.num_members)
            elif kind in channel_pad:
                memo[id(module)] = _FusedChannelPad(module, self.num_members)
        # member 0's structure (its forward code) with every layer that holds weights replaced by its
        # fused form; the copy holds no parameters or buffers of its own
        self.wide = copy.deepcopy(members[0], memo)
        self.wide.train(members[0].training)

    def bind_buffers(self) -> None:
        for fused_norm in self.norms:
            fused_norm.bind()

    def train(self, mode: bool = True) -> None:
        if self.wide.training != mode:  # the Trainer sets the mode every step: walk the modules only on a change
            self.wide.train(mode)

    def wide_input(self, pixel_values: torch.Tensor, channels_last: bool) -> torch.Tensor:
        """[B, K * C, H, W]: member k's image in channel block k (a shared batch repeated K times)."""
        K = self.num_members
        if pixel_values.ndim == 5:
            B, _, C, H, W = pixel_values.shape
            if not channels_last:
                return pixel_values.reshape(B, K * C, H, W)
            # memory order B, H, W, K, C: channels_last for the wide tensor, one copy
            return pixel_values.permute(0, 3, 4, 1, 2).reshape(B, H, W, K * C).permute(0, 3, 1, 2)
        B, C, H, W = pixel_values.shape
        if not channels_last:
            return pixel_values.repeat(1, K, 1, 1)
        nhwc = pixel_values.permute(0, 2, 3, 1).unsqueeze(3).expand(B, H, W, K, C)
        return nhwc.reshape(B, H, W, K * C).permute(0, 3, 1, 2)

    def __call__(self, pixel_values: torch.Tensor, channels_last: bool = False, features: bool = False) -> torch.Tensor:
        """[B, K, classes] logits; with `features`, the members' pre-logits features [B, K, D] (timm's
        `forward_head(..., pre_logits=True)` of the wide network: member k's features are channel block k)."""
        x = self.wide_input(pixel_values, channels_last)
        z = self.wide.forward_head(self.wide.forward_features(x), pre_logits=True) if features else self.wide(x)
        return z.unflatten(1, (self.num_members, -1))


def fused_member_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    temperature: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-member mean cross-entropy (with `label_smoothing`) and distillation terms ([K] each) of [B, K, C]
    logits, for all members at once: labels [B] (shared) or [B, K]; teacher logits [M, B, C] or [M, B, K, C].
    The same terms as `StudentPopulation`'s loop (`F.cross_entropy`, `distill.kd_loss`) computes."""
    B, K, C = logits.shape
    z = at_least_float32(logits)
    y = labels.unsqueeze(1).expand(B, K) if labels.ndim == 1 else labels
    ce = F.cross_entropy(z.reshape(B * K, C), y.reshape(B * K), reduction="none",
                         label_smoothing=label_smoothing).view(B, K).mean(0)
    if teacher_logits is None:
        return ce, None
    if teacher_logits.ndim == 4:  # per-member teachers' views: [M, B, K, C] -> pbar [B, K, C]
        pbar = averaged_teacher_probs(teacher_logits.flatten(1, 2), temperature).view(B, K, C)
    else:
        pbar = averaged_teacher_probs(teacher_logits, temperature).unsqueeze(1)  # [B, 1, C]
    with torch.autocast(device_type=z.device.type, enabled=False):
        log_p = F.log_softmax(z / temperature, dim=-1)
        kd = (temperature**2) * -(pbar * log_p).sum(dim=-1).mean(0)
    return ce, kd


def separate_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict that safetensors can write: every tensor contiguous, none sharing memory with
    another (fused members' statistics are views into one buffer; channels_last weights are not
    contiguous). Tensors that need neither are passed through uncopied."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        shared = ptr is not None and ptr in seen
        if ptr is not None:
            seen.add(ptr)
        if shared or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.detach().clone(memory_format=torch.contiguous_format)
        elif not tensor.is_contiguous():
            tensor = tensor.detach().contiguous()
        out[name] = tensor
    return out
