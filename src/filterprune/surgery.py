"""Physically remove channels: slice weights, biases, norm statistics and update layer attributes.

Every slot of the channel graph (see graph.py) is cut in one pass with the indices it keeps. How to
cut a layer is looked up in one small table keyed by (layer type, slot role), so adding a layer type
is one function and one table row, not a branch copied into every code path.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from .channels import Slot
from .graph import ChannelGraph
from .utils import dropped_indices


# The module attributes surgery changes (io saves them; the pruner restores them on undo).
SHAPE_ATTRIBUTES = (
    "in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
    "num_channels", "num_groups", "normalized_shape", "num_parameters",
)


def _sliced(tensor: torch.Tensor, dim: int, keep: torch.Tensor) -> torch.Tensor:
    out = tensor.detach().index_select(dim, keep.to(tensor.device)).clone()
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(out, requires_grad=tensor.requires_grad)
    return out


def _slice_attrs(module: nn.Module, names: tuple[str, ...], dim: int, keep: torch.Tensor) -> None:
    for name in names:
        tensor = getattr(module, name, None)
        if tensor is not None:
            setattr(module, name, _sliced(tensor, dim, keep))


def _per_output(conv: nn.modules.conv._ConvNd) -> tuple[str, ...]:
    """The conv's own tensors with one row per output channel besides the bias: a weight-
    standardised conv's gain (timm's ScaledStdConv2d) must lose the same rows as the weight."""
    own = {**conv._parameters, **conv._buffers}
    return tuple(n for n, t in own.items() if n not in ("weight", "bias") and t is not None
                 and t.dim() >= 1 and t.shape[0] == conv.out_channels)


def _conv_out(conv: nn.modules.conv._ConvNd, keep: torch.Tensor) -> None:
    # A transposed conv's weight is [in, out / groups, *kernel]: the axes are swapped.
    _slice_attrs(conv, ("weight",), 1 if conv.transposed else 0, keep)
    _slice_attrs(conv, ("bias",) + _per_output(conv), 0, keep)
    conv.out_channels = len(keep)


def _conv_in(conv: nn.modules.conv._ConvNd, keep: torch.Tensor) -> None:
    _slice_attrs(conv, ("weight",), 0 if conv.transposed else 1, keep)
    conv.in_channels = len(keep)


def _grouped(conv: nn.modules.conv._ConvNd, keep: torch.Tensor) -> None:
    # Whole groups go (graph.py unites each group's channels), so channels per group stay the same.
    # weight is [channels, channels / groups, *kernel] whether transposed or not (in == out here).
    _slice_attrs(conv, ("weight", "bias") + _per_output(conv), 0, keep)
    conv.in_channels = conv.out_channels = len(keep)
    conv.groups = len(keep) // conv.weight.shape[1]


def _linear_out(linear: nn.Linear, keep: torch.Tensor) -> None:
    _slice_attrs(linear, ("weight", "bias"), 0, keep)
    linear.out_features = len(keep)


def _linear_in(linear: nn.Linear, keep: torch.Tensor) -> None:
    _slice_attrs(linear, ("weight",), 1, keep)
    linear.in_features = len(keep)


def _norm(norm: nn.Module, keep: torch.Tensor) -> None:
    _slice_attrs(norm, ("weight", "bias", "running_mean", "running_var"), 0, keep)
    norm.num_features = len(keep)


def _group_norm(norm: nn.GroupNorm, keep: torch.Tensor) -> None:
    # Whole groups go (graph.py unites each group's channels): channels per group stay the same.
    per_group = norm.num_channels // norm.num_groups
    _slice_attrs(norm, ("weight", "bias"), 0, keep)
    norm.num_channels = len(keep)
    norm.num_groups = len(keep) // per_group


def _layer_norm(norm: nn.LayerNorm, keep: torch.Tensor) -> None:
    _slice_attrs(norm, ("weight", "bias"), 0, keep)
    norm.normalized_shape = (len(keep),)  # only norms over the channel axis alone get here


def _prelu(prelu: nn.PReLU, keep: torch.Tensor) -> None:
    _slice_attrs(prelu, ("weight",), 0, keep)
    prelu.num_parameters = len(keep)


_CUTTERS: list[tuple[type, str, Callable[[nn.Module, torch.Tensor], None]]] = [
    (nn.modules.conv._ConvNd, "out", _conv_out),
    (nn.modules.conv._ConvNd, "in", _conv_in),
    (nn.modules.conv._ConvNd, "channel", _grouped),
    (nn.Linear, "out", _linear_out),
    (nn.Linear, "in", _linear_in),
    (nn.modules.batchnorm._BatchNorm, "channel", _norm),
    (nn.modules.instancenorm._InstanceNorm, "channel", _norm),
    (nn.GroupNorm, "channel", _group_norm),
    (nn.LayerNorm, "channel", _layer_norm),
    (nn.PReLU, "channel", _prelu),
]


def _cutter(module: nn.Module, role: str) -> Callable[[nn.Module, torch.Tensor], None]:
    for kind, kind_role, cut in _CUTTERS:
        if isinstance(module, kind) and role == kind_role:
            return cut
    raise TypeError(f"no rule to cut the {role} axis of {type(module).__name__}")


def _cut_param(model: nn.Module, slot: Slot, keep: torch.Tensor) -> None:
    owner = model.get_submodule(slot.module)
    setattr(owner, slot.param, _sliced(getattr(owner, slot.param), slot.dim, keep))


def remove_units(model: nn.Module, graph: ChannelGraph, remove: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cut every slot that holds a unit marked in `remove` (a bool mask over the graph's units).

    Returns {slot.name: kept indices} for the output-side slots ("out", "channel", "param"), which
    callers use to keep track of original channel indices.
    """
    kept: dict[str, torch.Tensor] = {}
    for slot in graph.slots:
        dropped = dropped_indices(slot.owner, remove)
        if not dropped.any():
            continue
        keep = torch.nonzero(~dropped).flatten()
        if slot.role == "param":
            _cut_param(model, slot, keep)
        else:
            module = model.get_submodule(slot.module)
            _cutter(module, slot.role)(module, keep)
        if slot.role != "in":
            kept[slot.name] = keep
    return kept


class Trial:
    """A removal in progress (see `removed`): the kept indices, and a way to make it stay."""

    def __init__(self, kept: dict[str, torch.Tensor]) -> None:
        self.kept = kept
        self.kept_for_good = False

    def keep(self) -> None:
        """Leave the removal in place when the block ends."""
        self.kept_for_good = True


@contextlib.contextmanager
def removed(model: nn.Module, graph: ChannelGraph, remove: torch.Tensor) -> Iterator[Trial]:
    """Cut the units marked in `remove` for the duration of the block, then put every tensor and
    size back as it was, whether the block succeeded or raised, unless it called trial.keep()
    (and did not raise). Cheap: surgery swaps tensors and never edits them, so undoing is putting
    the old references back."""
    backup = _backup(model)
    try:
        trial = Trial(remove_units(model, graph, remove))
        yield trial
    except BaseException:  # a cut that failed half-way, or a block that raised, even after keep()
        _restore(model, backup)
        raise
    if not trial.kept_for_good:
        _restore(model, backup)


def _backup(model: nn.Module) -> dict:
    """References to every module's tensors and sizes."""
    return {name: (dict(m._parameters), dict(m._buffers), {a: getattr(m, a) for a in SHAPE_ATTRIBUTES if a in vars(m)})
            for name, m in model.named_modules()}


def _restore(model: nn.Module, backup: dict) -> None:
    for name, module in model.named_modules():
        params, buffers, sizes = backup[name]
        module._parameters.update(params)
        module._buffers.update(buffers)
        for attr, value in sizes.items():
            setattr(module, attr, value)
