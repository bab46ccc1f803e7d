"""What graph.py needs to know about ops: which move data, which are channel-wise, which are layers,
and how reshapes and splits treat the channel axis.

The tables name torch's functions and methods (what fx records). ATen, what torch.export records,
is a short closed list; `ATEN` maps each ATen op to the torch function or method it stands for,
with the same arguments in the same places, so one set of rules serves both front ends."""

from __future__ import annotations

import builtins
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

CHANNEL_WISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    # Sigmoid-like ops map 0 to a non-zero value; that is still exact for removal (the channel is
    # gone downstream), and squeeze-excite multiplies the gate with the channel it scales anyway.
    nn.Sigmoid, nn.Hardsigmoid,
)
DATA_MOVEMENT_MODULES = (nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
# Layers whose tensors surgery knows how to cut: their parameters are not bare "param" slots.
LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.PReLU) + NORMS

CHANNEL_WISE_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardtanh, F.hardsigmoid, F.sigmoid, F.tanh, F.softplus, torch.relu, torch.relu_, torch.sigmoid,
    torch.tanh, torch.clamp, torch.clip, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample, operator.neg,
    F.alpha_dropout, F.pad, torch.sqrt, torch.exp,
}
CHANNEL_WISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
    "neg", "float", "half", "double", "to", "type_as", "detach", "clone", "abs", "sqrt", "exp",
}
ELEMENTWISE = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
}
ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
RESHAPES = {torch.reshape, torch.flatten}
RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
MOVES = {
    torch.transpose, torch.permute, torch.cat, torch.concat, torch.stack, torch.squeeze,
    torch.unsqueeze, torch.flip, F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle,
}
MOVE_METHODS = {"transpose", "permute", "contiguous", "flip", "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "t"}
SPLITS = {torch.chunk, torch.split, torch.narrow, torch.tensor_split, torch.unbind, operator.getitem}
SPLIT_METHODS = {"chunk", "split", "narrow", "tensor_split", "unbind"}
REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
REDUCTION_METHODS = {"mean", "sum", "amax", "amin"}
SOFTMAXES = {torch.softmax, F.softmax, torch.log_softmax, F.log_softmax}
SOFTMAX_METHODS = {"softmax", "log_softmax"}
SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax)
SHAPE_QUERIES = {builtins.getattr, builtins.len}

# Functional layers, with the position of the argument that names their module's weight. A call
# whose weight (or statistics) is a tensor of one module maps like a call of that module.
FUNCTIONAL_LAYERS = {
    F.conv1d: (nn.modules.conv._ConvNd, 1), F.conv2d: (nn.modules.conv._ConvNd, 1),
    F.conv3d: (nn.modules.conv._ConvNd, 1), F.conv_transpose1d: (nn.modules.conv._ConvNd, 1),
    F.conv_transpose2d: (nn.modules.conv._ConvNd, 1), F.conv_transpose3d: (nn.modules.conv._ConvNd, 1),
    F.linear: (nn.Linear, 1), F.batch_norm: (NORMS, 3), F.instance_norm: (NORMS, 3),
    F.layer_norm: (nn.LayerNorm, 2), F.group_norm: (nn.GroupNorm, 2), F.prelu: (nn.PReLU, 1),
}


MATMULS = {torch.matmul, torch.bmm, torch.mm, torch.einsum, torch.baddbmm, operator.matmul}
MATMUL_METHODS = {"matmul", "bmm", "mm"}
SLICES = {"slice", "select"}  # ATen's indexing of one axis: (x, dim, start, end, step) and (x, dim, index)

_A = torch.ops.aten
ATEN = {
    _A.conv1d: F.conv1d, _A.conv2d: F.conv2d, _A.conv3d: F.conv3d, _A.conv_transpose1d: F.conv_transpose1d,
    _A.conv_transpose2d: F.conv_transpose2d, _A.conv_transpose3d: F.conv_transpose3d, _A.linear: F.linear,
    _A.batch_norm: F.batch_norm, _A._native_batch_norm_legit_no_training: F.batch_norm,
    _A._native_batch_norm_legit: F.batch_norm, _A.native_batch_norm: F.batch_norm, _A.instance_norm: F.instance_norm,
    _A.group_norm: F.group_norm, _A.layer_norm: F.layer_norm, _A.prelu: F.prelu,
    **dict.fromkeys([
        _A.relu, _A.relu_, _A.relu6, _A.hardtanh, _A.hardtanh_, _A.leaky_relu, _A.leaky_relu_, _A.elu, _A.elu_,
        _A.selu, _A.selu_, _A.celu, _A.gelu, _A.gelu_, _A.silu, _A.silu_, _A.mish, _A.mish_, _A.hardswish,
        _A.hardswish_, _A.hardsigmoid, _A.hardsigmoid_, _A.sigmoid, _A.sigmoid_, _A.tanh, _A.tanh_, _A.softplus,
        _A.clamp, _A.clamp_, _A.clamp_min, _A.clamp_min_, _A.clamp_max, _A.clip, _A.dropout, _A.dropout_,
        _A.feature_dropout, _A.feature_dropout_, _A.alpha_dropout, _A.alpha_dropout_, _A.feature_alpha_dropout,
        _A.feature_alpha_dropout_, _A.max_pool1d, _A.max_pool2d, _A.max_pool3d, _A.avg_pool1d,
        _A.avg_pool2d, _A.avg_pool3d, _A.adaptive_avg_pool1d, _A.adaptive_avg_pool2d, _A.adaptive_avg_pool3d,
        _A.upsample_nearest1d, _A.upsample_nearest2d, _A.upsample_nearest3d, _A.upsample_linear1d,
        _A.upsample_bilinear2d, _A.upsample_bicubic2d, _A.upsample_trilinear3d, _A._upsample_nearest_exact2d,
        _A._upsample_bilinear2d_aa, _A.pad, _A.constant_pad_nd, _A.reflection_pad1d, _A.reflection_pad2d,
        _A.reflection_pad3d, _A.replication_pad1d, _A.replication_pad2d, _A.replication_pad3d, _A.neg, _A.sqrt,
        _A.rsqrt, _A.exp, _A.abs, _A.square, _A.erf, _A._to_copy, _A.to, _A.type_as, _A.detach, _A.clone,
        _A.contiguous, _A.alias, _A.lift_fresh_copy,
    ], F.relu),  # any channel-wise function: the rule only reads the shapes
    **dict.fromkeys([_A.add, _A.add_, _A.sub, _A.sub_, _A.rsub, _A.mul, _A.mul_, _A.div, _A.div_, _A.maximum,
                     _A.minimum, _A.where], torch.add),
    **dict.fromkeys([_A.view, _A.reshape, _A._unsafe_view, _A.view_as, _A.reshape_as], torch.reshape),
    _A.flatten: torch.flatten, _A.unflatten: "unflatten",
    **{getattr(_A, name): getattr(torch, name) for name in (
        "transpose", "permute", "cat", "concat", "stack", "squeeze", "unsqueeze", "flip", "channel_shuffle",
        "chunk", "split", "unbind", "narrow", "tensor_split", "mean", "sum", "amax", "amin", "softmax",
        "log_softmax", "matmul", "bmm", "mm", "einsum", "baddbmm")},
    _A._softmax: torch.softmax, _A._log_softmax: torch.log_softmax, _A.split_with_sizes: torch.split,
    _A.pixel_shuffle: F.pixel_shuffle, _A.pixel_unshuffle: F.pixel_unshuffle, _A.t: "t",
    **dict.fromkeys([_A.expand, _A.expand_as, _A.repeat], "expand"),
    _A.slice: "slice", _A.select: "select",
}


def tensors(tree) -> list[torch.Tensor]:
    out = []
    fx.node.map_aggregate(tree, lambda x: out.append(x) if isinstance(x, torch.Tensor) else None)
    return out


def varies_along(labels: torch.Tensor, dim: int) -> bool:
    return labels.shape[dim] > 1 and bool((labels != labels.narrow(dim, 0, 1)).any())


def along(ids: torch.Tensor, shape, dim: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[dim] = -1
    return ids.view(view).expand(shape).clone()


def name_of(fn) -> str:
    return fn if isinstance(fn, str) else getattr(fn, "__name__", str(fn))


def is_stochastic_depth(fn) -> bool:
    return getattr(fn, "__name__", "") == "stochastic_depth" and "torchvision" in getattr(fn, "__module__", "")


def source_line(node: fx.Node) -> str:
    """The user's line of code that made this node (skipping torch's own frames), if recorded."""
    lines = node.meta.get("stack_trace", "").strip().splitlines()
    frames = [(lines[i].strip(), lines[i + 1].strip() if i + 1 < len(lines) else "") for i, line in enumerate(lines)
              if line.strip().startswith("File ") and "/torch/" not in line]
    return f" [{frames[-1][0]}: {frames[-1][1]}]" if frames else ""


def reshape_blocks(shape_in, shape_out) -> list[tuple[list[int], list[int]]]:
    """Pair the axes of a reshape: each block of input axes becomes a block of output axes."""
    shape_in, shape_out = list(shape_in), list(shape_out)
    blocks, i, j = [], 0, 0
    while i < len(shape_in) and j < len(shape_out):
        block_in, block_out = [i], [j]
        p_in, p_out = shape_in[i], shape_out[j]
        while p_in != p_out:
            if p_in < p_out:
                i += 1
                block_in.append(i)
                p_in *= shape_in[i]
            else:
                j += 1
                block_out.append(j)
                p_out *= shape_out[j]
        blocks.append((block_in, block_out))
        i, j = i + 1, j + 1
    return blocks


def literal_sizes(node: fx.Node, is_method: bool) -> tuple:
    """The sizes a view/reshape call spells out, as written (ints are literals, nodes are computed)."""
    if node.target not in {"view", "reshape"} and node.target is not torch.reshape:
        return ()
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    return tuple(sizes)


def is_literal(sizes: tuple, dim: int) -> bool:
    return dim < len(sizes) and isinstance(sizes[dim], int) and sizes[dim] not in (-1, 1)


def split_dims(fn, args, kwargs, x_lab: torch.Tensor) -> list[int]:
    ndim = x_lab.dim()
    if fn is operator.getitem:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        dims, d = [], 0
        for item in index:
            if item is Ellipsis:
                d = ndim - (len(index) - 1 - d)
                continue
            if item is None:
                continue
            if not (isinstance(item, slice) and item == slice(None)):
                dims.append(d)
            d += 1
        return dims
    dim = kwargs.get("dim", args[2] if len(args) > 2 and isinstance(args[2], int) else 0)
    if fn in {"narrow", torch.narrow, "unbind", torch.unbind}:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    return [dim % ndim]


def equal_pieces(fn, node: fx.Node, args, kwargs, size: int, sees_literals: bool) -> int | None:
    """How many equal pieces a chunk/split makes of an axis of `size`, if that survives pruning.

    chunk(n) keeps making n equal pieces of a smaller axis; split(s) only if s is computed from
    the tensor's size, not a literal (or a module attribute, which fx records as one). Where
    literals cannot be seen (an exported graph), equal pieces are taken as equal and the
    pruner's probe checks it.
    """
    n = args[1] if len(args) > 1 else kwargs.get("chunks", kwargs.get("split_size_or_sections", kwargs.get("split_size")))
    written = node.args[1] if len(node.args) > 1 else None
    if fn in {torch.chunk, "chunk"} and isinstance(n, int) and size % n == 0:
        return n
    if fn not in {torch.split, "split"}:
        return None
    if isinstance(n, (list, tuple)) and len(set(n)) == 1 and not sees_literals:
        return len(n)
    if isinstance(n, int) and size % n == 0 and (isinstance(written, fx.Node) or not sees_literals):
        return size // n
    return None


def softmax_dims(args, kwargs, ndim: int) -> list[int]:
    """The axis a softmax normalises over (every axis if none is given, which says nothing)."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return list(range(ndim)) if dim is None else [dim % ndim]


def reduced_dims(args, kwargs, ndim: int) -> list[int]:
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:
        return list(range(ndim))
    dims = dim if isinstance(dim, (tuple, list)) else [dim]
    return [d % ndim for d in dims]
