"""Trace a model into groups of coupled channels.

The model is traced with torch.fx and run once on the example inputs. Beside every real tensor we
carry a *label tensor* of the same shape whose entries are channel ids:

- a layer that creates channels (a conv or Linear) gives its outputs fresh ids;
- an op that only moves data (view, transpose, cat, getitem, pixel_shuffle ...) is applied to the
  label tensor itself, so offsets and permutations are tracked exactly, never assumed;
- an element-wise op between tensors (a residual add, a squeeze-excite multiply, a layer scale)
  unites the ids it combines, because those channels can only be removed together;
- anything else is *pinned*: its ids are united with id 0, which is never removed. So is an op
  whose meaning would change once channels are gone (splitting or indexing the channel axis, a
  literal channel count in a view, a norm across channels), and so are the model's outputs.

What comes out is a list of *slots*: each is one axis of one layer (the output rows of a conv,
the input columns of the next one, the features of a BatchNorm ...) with the channel id at every
index. Channels whose ids end up united form one removable unit; units touching the same slots
form a group, the thing a user sees as "a layer".
"""

from __future__ import annotations

import builtins
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

PINNED = 0


class GraphError(RuntimeError):
    """The model could not be traced into channel groups; the message says why and what to do."""


@dataclass
class Slot:
    """One axis of one layer, with the channel id of each of its indices.

    role is "out" (the output rows of a conv or Linear), "in" (the input columns of a conv or
    Linear), "channel" (a per-channel layer: a norm, a depthwise conv, a PReLU) or "param" (a bare
    parameter such as a layer scale; `module` is then the parameter's qualified name).
    """

    module: str
    role: str
    labels: torch.Tensor
    macs_per_index: float = 0.0
    owner: torch.Tensor = field(default=None, repr=False)  # unit index per position, -1 if pinned
    spread: torch.Tensor = field(default=None, repr=False)  # 1 / copies of the same feature map
    # False where removing a channel changes what the layer computes for the channels that stay
    # (a LayerNorm or GroupNorm across channels): the pruner can then only check the model still runs.
    exact: bool = True


@dataclass
class Group:
    """Channels that are removed together: one unit removes the same channel from every member."""

    name: str
    members: list[str]
    size: int
    offset: int  # index of this group's first unit in the pruner's flat list of units

    def __repr__(self) -> str:
        return f"Group({self.name!r}, size={self.size}, members={len(self.members)})"


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = [PINNED]

    def fresh(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # Keep PINNED as the root of whatever it joins.
            low, high = min(ra, rb), max(ra, rb)
            self.parent[high] = low

    def unite(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        differ = a != b
        if differ.any():
            # One int64 per pair makes the de-duplication a fast 1-D unique (ids are < 2**31).
            pairs = torch.unique(a[differ] * 2**31 + b[differ])
            for pair in pairs.tolist():
                self.union(pair >> 31, pair & (2**31 - 1))

    def roots(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.find(x) for x in labels.tolist()], dtype=torch.long)


_CHANNEL_WISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)
# Sigmoid-like ops map 0 to a non-zero value; that is still exact for removal (the channel is gone
# downstream), and squeeze-excite multiplies the gate with the channel it scales anyway.
_CHANNEL_WISE_GATES = (nn.Sigmoid, nn.Hardsigmoid)
_DATA_MOVEMENT_MODULES = (nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)

_CHANNEL_WISE_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardtanh, F.hardsigmoid, F.sigmoid, F.tanh, F.softplus, torch.relu, torch.relu_, torch.sigmoid,
    torch.tanh, torch.clamp, torch.clip, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample, operator.neg,
    torch.nn.functional.alpha_dropout,
}
_CHANNEL_WISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
    "neg", "float", "half", "double", "to", "type_as", "detach", "clone", "abs",
}
_ELEMENTWISE = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
_RESHAPES = {torch.reshape, torch.flatten}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
_MOVES = {
    torch.transpose, torch.permute, torch.cat, torch.concat, torch.stack, torch.squeeze,
    torch.unsqueeze, torch.flip, F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle,
}
_MOVE_METHODS = {"transpose", "permute", "contiguous", "flip", "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "t"}
_SPLITS = {torch.chunk, torch.split, torch.narrow, torch.tensor_split, torch.unbind, operator.getitem}
_SPLIT_METHODS = {"chunk", "split", "narrow", "tensor_split", "unbind"}
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCTION_METHODS = {"mean", "sum", "amax", "amin"}
_SHAPE_QUERIES = {builtins.getattr, builtins.len}


def _tensors(tree) -> list[torch.Tensor]:
    out = []
    fx.node.map_aggregate(tree, lambda x: out.append(x) if isinstance(x, torch.Tensor) else None)
    return out


def _varies_along(labels: torch.Tensor, dim: int) -> bool:
    return labels.shape[dim] > 1 and bool((labels != labels.narrow(dim, 0, 1)).any())


class ChannelGraph:
    """The coupled-channel structure of a model, traced on example inputs.

    `slots` lists every sliceable axis with the unit that owns each index; `groups` lists the
    removable groups; `skipped` says which ops were left out of pruning and why.
    """

    def __init__(self, model: nn.Module, example_inputs, ignore=(), strict: bool = False) -> None:
        self.model = model
        self.strict = strict
        self.skipped: list[str] = []
        self._uf = _UnionFind()
        self._slots: dict[tuple[str, str], Slot] = {}
        self._ignored = {id(m) for m in ignore}
        self._params = dict(model.named_parameters())
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        self._run(_trace(model), tuple(example_inputs))
        self._build_groups()

    # ---- tracing ------------------------------------------------------------------------------

    def _run(self, gm: fx.GraphModule, inputs: tuple) -> None:
        values: dict[fx.Node, object] = {}
        labels: dict[fx.Node, object] = {}
        was_training = self.model.training
        self.model.eval()  # the graph was traced in train mode; run it without touching BN statistics
        try:
            with torch.no_grad():
                inputs_left = list(inputs)
                for node in gm.graph.nodes:
                    if node.op == "placeholder":
                        value = inputs_left.pop(0) if inputs_left else node.args[0] if node.args else None
                        values[node] = value
                        labels[node] = fx.node.map_aggregate(value, self._pinned_like)
                    elif node.op == "output":
                        for lab in _tensors(fx.node.map_arg(node.args[0], labels.get)):
                            self._uf.unite(lab, torch.zeros((), dtype=torch.long))
                    else:
                        args = fx.node.map_arg(node.args, values.__getitem__)
                        kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
                        value = self._evaluate(gm, node, args, kwargs)
                        values[node] = value
                        labels[node] = self._propagate(node, args, kwargs, value, labels, values)
        finally:
            self.model.train(was_training)

    def _evaluate(self, gm: fx.GraphModule, node: fx.Node, args, kwargs):
        if node.op == "get_attr":
            return _fetch(self.model, node.target)
        if node.op == "call_module":
            return self.model.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)

    @staticmethod
    def _pinned_like(x):
        return torch.zeros(x.shape, dtype=torch.long) if isinstance(x, torch.Tensor) else None

    def _pin(self, *label_trees) -> None:
        for lab in _tensors(label_trees):
            self._uf.unite(lab, torch.zeros((), dtype=torch.long))

    def _skip(self, node: fx.Node, what: str, why: str, in_labels, value):
        """Leave the channels an op touches out of pruning (or refuse, in strict mode)."""
        scope = list(node.meta.get("nn_module_stack", {}))
        where = f"in module '{scope[-1]}'" if scope else "at the model's top level"
        message = f"{what} {where} (node '{node.name}'): {why}; its channels are left out of pruning"
        message += _source_line(node)
        if self.strict:
            raise GraphError(message)
        self.skipped.append(message)
        self._pin(in_labels)
        return fx.node.map_aggregate(value, self._pinned_like)

    def _propagate(self, node: fx.Node, args, kwargs, value, labels, values):
        if node.op == "get_attr" and isinstance(value, torch.Tensor):
            return self._param_labels(node.target, value)
        if not _tensors(value):
            return fx.node.map_aggregate(value, lambda _: None)
        # Ops are replayed on label tensors: tensor arguments become their labels, the rest stay.
        label_of = lambda n: labels[n] if _tensors(values[n]) else values[n]  # noqa: E731
        label_args = fx.node.map_arg(node.args, label_of)
        label_kwargs = fx.node.map_arg(node.kwargs, label_of)
        in_labels = _tensors((label_args, label_kwargs))
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            return self._module(node, module, in_labels, args, value)
        return self._function(node, args, kwargs, label_args, label_kwargs, in_labels, value)

    # ---- modules ------------------------------------------------------------------------------

    def _module(self, node, module, in_labels, args, value):
        name = node.target
        if not in_labels:
            return fx.node.map_aggregate(value, self._pinned_like)
        x_lab, x = in_labels[0], args[0]
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            return self._conv(name, module, x_lab, value)
        if isinstance(module, nn.Linear):
            return self._linear(name, module, x_lab, x, value)
        if isinstance(module, _NORMS) and (module.affine or module.track_running_stats):
            return self._channel_layer(name, x_lab, value)
        if isinstance(module, nn.GroupNorm) and module.num_groups == module.num_channels:
            return self._channel_layer(name, x_lab, value)
        if isinstance(module, nn.PReLU) and module.num_parameters > 1:
            return self._channel_layer(name, x_lab, value)
        if isinstance(module, _NORMS + (nn.PReLU,)):
            return self._channel_wise(x_lab, value)
        if isinstance(module, _CHANNEL_WISE + _CHANNEL_WISE_GATES):
            return self._channel_wise(x_lab, value)
        if isinstance(module, _DATA_MOVEMENT_MODULES):
            if isinstance(module, (nn.Unflatten, nn.ChannelShuffle)) and _varies_along(x_lab, getattr(module, "dim", 1)):
                return self._skip(node, type(module).__name__, "it splits the channel axis", in_labels, value)
            if isinstance(module, nn.PixelShuffle):
                self._unite_blocks(x_lab, module.upscale_factor**2)
            return module(x_lab)
        return self._skip(node, f"module '{name}' ({type(module).__name__})", "no channel mapping is known for it", in_labels, value)

    def _add_slot(self, name: str, role: str, labels: torch.Tensor, macs: float) -> torch.Tensor:
        """Record a slot; a layer called twice shares its channels, so unite both calls' ids."""
        key = (name, role)
        if key in self._slots:
            self._uf.unite(self._slots[key].labels, labels)
            return self._slots[key].labels
        self._slots[key] = Slot(name, role, labels.clone(), macs)
        return labels

    def _channel_ids(self, x_lab: torch.Tensor, dim: int) -> torch.Tensor:
        """One id per index of `dim`: ids that share an index must go together, so unite them."""
        rows = x_lab.movedim(dim, 0).reshape(x_lab.shape[dim], -1)
        self._uf.unite(rows, rows[:, :1])
        return rows[:, 0].clone()

    def _unite_blocks(self, x_lab: torch.Tensor, block: int) -> None:
        ids = self._channel_ids(x_lab, 1).view(-1, block)
        self._uf.unite(ids, ids[:, :1])

    def _conv(self, name, conv, x_lab, value):
        spatial = value[0, 0].numel()
        kernel = conv.weight[0, 0].numel()
        in_ids = self._channel_ids(x_lab, 1)
        if conv.groups == 1:
            self._add_slot(name, "in", in_ids, conv.out_channels * kernel * spatial)
            ids = self._fresh_output(name, conv.out_channels, conv.in_channels * kernel * spatial)
        elif conv.in_channels == conv.out_channels:
            # A grouped conv can only lose whole groups (each input group with its output group),
            # or its groups would become unequal; a depthwise conv's groups are single channels.
            blocks = in_ids.view(conv.groups, -1)
            self._uf.unite(blocks, blocks[:, :1])
            ids = self._add_slot(name, "channel", in_ids, conv.weight.shape[1] * kernel * spatial)
        else:
            self.skipped.append(
                f"grouped conv '{name}' (groups={conv.groups}, {conv.in_channels} -> {conv.out_channels} channels): "
                "its input and output channels are left out of pruning"
            )
            self._pin(x_lab)
            return torch.zeros(value.shape, dtype=torch.long)
        return _along(ids, value.shape, 1)

    def _linear(self, name, linear, x_lab, x, value):
        rows = value[..., 0].numel() // value.shape[0]
        self._add_slot(name, "in", self._channel_ids(x_lab, -1), linear.out_features * rows)
        ids = self._fresh_output(name, linear.out_features, linear.in_features * rows)
        return _along(ids, value.shape, -1)

    def _fresh_output(self, name: str, n: int, macs: float) -> torch.Tensor:
        ids = self._add_slot(name, "out", self._uf.fresh(n), macs)
        if id(self.model.get_submodule(name)) in self._ignored:
            self._pin(ids)
        return ids

    def _channel_layer(self, name, x_lab, value):
        ids = self._add_slot(name, "channel", self._channel_ids(x_lab, 1), 0.0)
        return _along(ids, value.shape, 1)

    def _channel_wise(self, x_lab, value):
        if value.shape == x_lab.shape:
            return x_lab
        if value.dim() == x_lab.dim() and value.shape[:2] == x_lab.shape[:2]:
            return _along(self._channel_ids(x_lab, 1), value.shape, 1)
        self._pin(x_lab)
        return torch.zeros(value.shape, dtype=torch.long)

    def _param_labels(self, target: str, value: torch.Tensor):
        sizes = [d for d, s in enumerate(value.shape) if s > 1]
        if target not in self._params or len(sizes) != 1:
            return self._pinned_like(value)
        dim = sizes[0]
        ids = self._add_slot(f"{target}@{dim}", "param", self._uf.fresh(value.shape[dim]), 0.0)
        return _along(ids, value.shape, dim)

    # ---- functions and methods ----------------------------------------------------------------

    def _function(self, node, args, kwargs, label_args, label_kwargs, in_labels, value):
        fn, op = node.target, node.op
        is_method = op == "call_method"
        if fn in _SHAPE_QUERIES or (is_method and fn in {"size", "dim"}):
            return fx.node.map_aggregate(value, self._pinned_like)
        if not in_labels:  # a tensor made from nothing that carries channels (zeros, arange ...)
            return fx.node.map_aggregate(value, self._pinned_like)
        if isinstance(fn, type) and issubclass(fn, tuple):  # a named tuple of outputs
            return fn(*label_args, **label_kwargs)
        call = (lambda *a, **k: getattr(a[0], fn)(*a[1:], **k)) if is_method else fn
        channel_wise = (fn in _CHANNEL_WISE_FUNCTIONS) or (is_method and fn in _CHANNEL_WISE_METHODS) or _is_stochastic_depth(fn)
        # A channel-wise op with a second tensor (clamp(x, min=per_channel)) ties x to it, like an add.
        if (fn in _ELEMENTWISE) or (is_method and fn in _ELEMENTWISE_METHODS) or (channel_wise and len(in_labels) > 1):
            out = torch.broadcast_to(in_labels[0], value.shape)
            for lab in in_labels[1:]:
                self._uf.unite(out, lab)
            return out.clone()
        if channel_wise:
            return self._channel_wise(in_labels[0], value)
        if (fn in _RESHAPES) or (is_method and fn in _RESHAPE_METHODS):
            problem = _reshape_problem(in_labels[0], value, node, is_method)
            if problem:
                return self._skip(node, f"'{_name(fn)}'", problem, in_labels, value)
            return call(*label_args, **label_kwargs)
        if (fn in _MOVES) or (is_method and fn in _MOVE_METHODS):
            if fn in {torch.channel_shuffle} and _varies_along(in_labels[0], 1):
                return self._skip(node, "channel_shuffle", "its permutation depends on the channel count", in_labels, value)
            if fn is F.pixel_shuffle:
                self._unite_blocks(in_labels[0], args[1] ** 2)
            return call(*label_args, **label_kwargs)
        if (fn in _SPLITS) or (is_method and fn in _SPLIT_METHODS):
            if fn is operator.getitem and not isinstance(args[0], torch.Tensor):
                return call(*label_args, **label_kwargs)  # picking one result out of a tuple
            dims = _split_dims(fn, args, kwargs, in_labels[0])
            if any(_varies_along(in_labels[0], d) for d in dims):
                return self._skip(node, f"'{_name(fn)}'", "it cuts the channel axis at fixed positions", in_labels, value)
            return call(*label_args, **label_kwargs)
        if (fn in _REDUCTIONS) or (is_method and fn in _REDUCTION_METHODS):
            dims = _reduced_dims(args, kwargs, in_labels[0].dim())
            if any(_varies_along(in_labels[0], d) for d in dims):
                return self._skip(node, f"'{_name(fn)}'", "it reduces across channels", in_labels, value)
            keep = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
            return in_labels[0].amax(dim=tuple(dims), keepdim=keep) if dims else in_labels[0].amax()
        return self._skip(node, f"'{_name(fn)}'", "no channel mapping is known for it", in_labels, value)

    # ---- groups -------------------------------------------------------------------------------

    def _build_groups(self) -> None:
        find = self._uf.find
        pinned = find(PINNED)
        members_of: dict[int, set[str]] = {}
        for slot in self._slots.values():
            # Entries that share an id before uniting are copies of one feature map (the spatial
            # positions a flatten spread out); criteria average over those and sum over the rest.
            _, inverse, counts = torch.unique(slot.labels, return_inverse=True, return_counts=True)
            slot.spread = 1.0 / counts[inverse].double()
            slot.labels = self._uf.roots(slot.labels)
            for root in set(slot.labels.tolist()) - {pinned}:
                members_of.setdefault(root, set()).add(f"{slot.module}:{slot.role}")
        by_members: dict[tuple[str, ...], list[int]] = {}
        for root, members in members_of.items():
            by_members.setdefault(tuple(sorted(members)), []).append(root)
        self.groups: list[Group] = []
        unit_of: dict[int, int] = {}
        # Order groups, and name each after its first producer, by the traced graph's order.
        order = {f"{name}:{role}": i for i, (name, role) in enumerate(self._slots)}
        for members in sorted(by_members, key=lambda m: min(order[x] for x in m)):
            roots = sorted(by_members[members])
            members = tuple(sorted(members, key=order.get))
            name = next((m for m in members if m.endswith(":out")), members[0]).rsplit(":", 1)[0]
            group = Group(name, list(members), len(roots), len(unit_of))
            for root in roots:
                unit_of[root] = len(unit_of)
            self.groups.append(group)
        self.num_units = len(unit_of)
        for slot in self._slots.values():
            slot.owner = torch.tensor([unit_of.get(r, -1) for r in slot.labels.tolist()], dtype=torch.long)

    @property
    def slots(self) -> list[Slot]:
        return list(self._slots.values())

    def unit_cost(self) -> torch.Tensor:
        """MACs (for one example) that removing each unit saves, from every slot it touches."""
        cost = torch.zeros(self.num_units, dtype=torch.float64)
        for slot in self._slots.values():
            mask = slot.owner >= 0
            cost.index_add_(0, slot.owner[mask], torch.full((int(mask.sum()),), slot.macs_per_index, dtype=torch.float64))
        return cost


def _trace(model: nn.Module) -> fx.GraphModule:
    """Trace in train mode so that branches only used in training (auxiliary heads) are seen too."""
    was_training = model.training
    model.train()
    tracer = fx.Tracer()
    tracer.record_stack_traces = True
    try:
        return fx.GraphModule(model, tracer.trace(model))
    except Exception as err:  # fx raises many types; all mean the same thing to the user
        raise GraphError(
            f"torch.fx could not trace {type(model).__name__}: {err}. Data-dependent Python control flow "
            "cannot be traced; move it into a submodule or make the branch depend on module attributes."
        ) from err
    finally:
        model.train(was_training)


def _source_line(node: fx.Node) -> str:
    """The user's line of code that made this node (skipping torch's own frames), if recorded."""
    lines = node.meta.get("stack_trace", "").strip().splitlines()
    frames = [(lines[i].strip(), lines[i + 1].strip() if i + 1 < len(lines) else "") for i, line in enumerate(lines)
              if line.strip().startswith("File ") and "/torch/" not in line]
    return f" [{frames[-1][0]}: {frames[-1][1]}]" if frames else ""


def _fetch(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _along(ids: torch.Tensor, shape, dim: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[dim] = -1
    return ids.view(view).expand(shape).clone()


def _name(fn) -> str:
    return fn if isinstance(fn, str) else getattr(fn, "__name__", str(fn))


def _is_stochastic_depth(fn) -> bool:
    return getattr(fn, "__name__", "") == "stochastic_depth" and "torchvision" in getattr(fn, "__module__", "")


def _reshape_problem(x_lab: torch.Tensor, value: torch.Tensor, node: fx.Node, is_method: bool) -> str | None:
    """Why reshaping `x_lab` into `value.shape` would change meaning after pruning, if it would.

    Merging an axis with the ones after it keeps every channel's entries together, so it survives
    pruning; splitting the channel axis (channel shuffle) does not, nor does a literal size.
    """
    shape_in, shape_out = list(x_lab.shape), list(value.shape)
    i = j = 0
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
        varied = [d for d in block_in if _varies_along(x_lab, d)]
        if varied and len([d for d in block_out if shape_out[d] > 1]) > 1:
            return "it splits the channel axis"
        if varied and _literal_size(node, block_out, is_method):
            return "it uses a literal channel count, which is wrong once channels are removed"
        i, j = i + 1, j + 1
    return None


def _literal_size(node: fx.Node, dims: list[int], is_method: bool) -> bool:
    target = node.target
    if target not in {"view", "reshape"} and target is not torch.reshape:
        return False
    sizes = node.args[1:] if is_method else node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    return any(d < len(sizes) and isinstance(sizes[d], int) and sizes[d] not in (-1, 1) for d in dims)


def _split_dims(fn, args, kwargs, x_lab: torch.Tensor) -> list[int]:
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
    if fn in {"narrow", torch.narrow}:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if fn in {"unbind", torch.unbind}:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    return [dim % ndim]


def _reduced_dims(args, kwargs, ndim: int) -> list[int]:
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:
        return list(range(ndim))
    dims = dim if isinstance(dim, (tuple, list)) else [dim]
    return [d % ndim for d in dims]
