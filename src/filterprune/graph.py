"""Trace a model into groups of coupled channels.

The model is traced with torch.fx and run once on the example inputs. Beside every real tensor we
carry a *label tensor* of the same shape whose entries are channel ids:

- a layer that creates channels (a conv or Linear) gives its outputs fresh ids; a functional call
  (F.conv2d, F.batch_norm, F.layer_norm ...) made with one layer's own tensors maps like a call of
  that layer (timm's BatchNormAct2d, std-convs); values computed from layer tensors alone (a
  standardised weight) carry no channels;
- an op that only moves data (view, transpose, cat, getitem, pixel_shuffle ...) is applied to the
  label tensor itself, so offsets and permutations are tracked exactly, never assumed;
- an element-wise op between tensors (a residual add, a squeeze-excite multiply, a layer scale)
  unites the ids it combines, because those channels can only be removed together;
- anything else is *pinned*: its ids are united with id 0, which is never removed. So is an op
  whose meaning would change once channels are gone (splitting or indexing the channel axis, a
  literal channel count in a view), and so are the model's outputs. Splitting the channel axis
  into g equal blocks (a channel shuffle's view, chunk) unites index k of every block, so the
  blocks stay equal and the permutation stays the same kind of permutation.

The run is a torch.fx.Interpreter in eval mode; buffers are given back afterwards, so building a
graph never changes the model.

What comes out is a list of *slots*: each is one axis of one layer (the output rows of a conv,
the input columns of the next one, the features of a BatchNorm ...) with the channel id at every
index. Channels whose ids end up united form one removable unit; units touching the same slots
form a group, the thing a user sees as "a layer".
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import graph_ops as ops
from .trace import GraphError, trace
from .utils import evaluating, preserved_state

PINNED = 0


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
    # (a LayerNorm across channels, a weight-standardised conv's inputs): the pruner can then
    # only check that the model still runs.
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


class _LabelRun(fx.Interpreter):
    """Runs the traced model on the example inputs and, beside every value, its label tensor."""

    def __init__(self, gm: fx.GraphModule, graph: "ChannelGraph") -> None:
        super().__init__(gm)
        self.channels = graph
        self.labels: dict[fx.Node, object] = {}
        # Nodes computed from a layer's own tensors only (a standardised conv weight): no channels.
        self.static: set[fx.Node] = set()

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if node.op == "output":
            self.channels._pin(fx.node.map_arg(node.args[0], self.labels.get))
        else:
            self.labels[node] = self.channels._label(node, value, self)
        return value

    def call_function(self, target, args, kwargs):
        # The graph was traced in train mode, so a norm called as a function asks to use (and
        # update) batch statistics; with running statistics given, use them as eval mode does.
        if target is F.batch_norm and len(args) > 2 and args[1] is not None and args[2] is not None:
            if "training" in kwargs or len(args) <= 5:
                kwargs = {**kwargs, "training": False}
            else:
                args = args[:5] + (False,) + args[6:]
        return super().call_function(target, args, kwargs)


class ChannelGraph:
    """The coupled-channel structure of a model, traced on example inputs.

    `slots` lists every sliceable axis with the unit that owns each index; `groups` lists the
    removable groups; `skipped` says which ops were left out of pruning and why. Building it
    leaves the model's parameters, buffers and every module's train/eval mode as they were.
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
        # preserved_state undoes in-place updates of buffers: tracing in train mode runs timm's
        # `num_batches_tracked.add_(1)` for real, and the traced graph does it again.
        with preserved_state(model):
            gm = trace(model)
            with evaluating(model), torch.no_grad():  # norms use their running statistics
                _LabelRun(gm, self).run(*example_inputs)
        self._build_groups()

    # ---- labels -------------------------------------------------------------------------------

    @staticmethod
    def _pinned_like(x):
        return torch.zeros(x.shape, dtype=torch.long) if isinstance(x, torch.Tensor) else None

    def _pin(self, *label_trees) -> None:
        for lab in ops.tensors(label_trees):
            self._uf.unite(lab, torch.zeros((), dtype=torch.long))

    def _skip(self, node: fx.Node, what: str, why: str, in_labels, value):
        """Leave the channels an op touches out of pruning (or refuse, in strict mode)."""
        scope = list(node.meta.get("nn_module_stack", {}))
        where = f"in module '{scope[-1]}'" if scope else "at the model's top level"
        message = f"{what} {where} (node '{node.name}'): {why}; its channels are left out of pruning"
        message += ops.source_line(node)
        if self.strict:
            raise GraphError(message)
        self.skipped.append(message)
        self._pin(in_labels)
        return fx.node.map_aggregate(value, self._pinned_like)

    def _layer_of(self, target: str) -> tuple[str, nn.Module] | None:
        """The layer (conv, norm, Linear ...) a tensor attribute belongs to, if it is one."""
        name = target.rpartition(".")[0]
        module = self.model.get_submodule(name)
        return (name, module) if isinstance(module, ops.LAYERS) else None

    def _label(self, node: fx.Node, value, run: _LabelRun):
        if node.op == "placeholder" or not ops.tensors(value):
            return fx.node.map_aggregate(value, self._pinned_like)
        if node.op == "get_attr":
            if self._layer_of(node.target) is None:
                return self._param_labels(node.target, value)
            run.static.add(node)  # a layer's own tensor: the layer's op maps it
            return fx.node.map_aggregate(value, self._pinned_like)
        sources = [n for n in node.all_input_nodes if ops.tensors(run.env[n])]
        if sources and all(n in run.static for n in sources):
            run.static.add(node)
            return fx.node.map_aggregate(value, self._pinned_like)
        # Ops are replayed on label tensors: tensor arguments become their labels, the rest stay.
        label_of = lambda n: run.labels[n] if ops.tensors(run.env[n]) else run.env[n]  # noqa: E731
        label_args = fx.node.map_arg(node.args, label_of)
        label_kwargs = fx.node.map_arg(node.kwargs, label_of)
        in_labels = ops.tensors((label_args, label_kwargs))
        if node.op == "call_module":
            return self._module(node, node.target, self.model.get_submodule(node.target), in_labels, value)
        owner = self._functional_owner(node, run) if node.target in ops.FUNCTIONAL_LAYERS else None
        if owner is not None:
            name, module, derived = owner
            return self._module(node, name, module, in_labels, value, derived)
        args, kwargs = run.fetch_args_kwargs_from_env(node)
        return self._function(node, args, kwargs, label_args, label_kwargs, in_labels, value)

    def _functional_owner(self, node: fx.Node, run: _LabelRun):
        """(name, module, derived) of the one layer whose tensors a functional call uses, if any.

        derived: the weight is computed from the layer's tensor (weight standardisation), not the
        tensor itself; input channels then change the weight of the channels that stay.
        """
        kind, position = ops.FUNCTIONAL_LAYERS[node.target]
        weight = node.args[position] if len(node.args) > position else node.kwargs.get("weight")
        found, todo = set(), [n for n in node.all_input_nodes if n in run.static]
        while todo:
            n = todo.pop()
            if n.op == "get_attr":
                layer = self._layer_of(n.target)
                if layer is not None and isinstance(layer[1], kind):
                    found.add(layer[0])
            todo.extend(n.all_input_nodes)
        if len(found) != 1:
            return None
        name = found.pop()
        derived = isinstance(weight, fx.Node) and weight.op != "get_attr"
        return name, self.model.get_submodule(name), derived

    # ---- layers -------------------------------------------------------------------------------

    def _module(self, node, name, module, in_labels, value, derived: bool = False):
        if not in_labels:
            return fx.node.map_aggregate(value, self._pinned_like)
        x_lab = in_labels[0]
        if isinstance(module, nn.modules.conv._ConvNd):
            return self._conv(node, name, module, in_labels, value, derived)
        if isinstance(module, nn.Linear):
            return self._linear(name, module, x_lab, value)
        if isinstance(module, ops.NORMS) and (module.affine or module.track_running_stats):
            return self._channel_layer(name, x_lab, value)
        if isinstance(module, nn.GroupNorm):
            # Whole groups only: each group's statistics are its own, so the groups that stay
            # compute exactly what they did.
            self._unite_blocks(x_lab, module.num_channels // module.num_groups)
            return self._channel_layer(name, x_lab, value)
        if isinstance(module, nn.LayerNorm):
            return self._layer_norm(node, name, module, in_labels, value)
        if isinstance(module, nn.PReLU) and module.num_parameters > 1:
            return self._channel_layer(name, x_lab, value)
        if isinstance(module, ops.NORMS + (nn.PReLU,) + ops.CHANNEL_WISE):
            return self._channel_wise(x_lab, value)
        if isinstance(module, ops.SOFTMAX_MODULES):
            dims = list(range(x_lab.dim())) if module.dim is None else [module.dim % x_lab.dim()]
            if not self._across_pieces(x_lab, dims):
                return self._skip(node, f"module '{name}' ({type(module).__name__})", "it normalises across channels", in_labels, value)
            return x_lab
        if isinstance(module, ops.DATA_MOVEMENT_MODULES):
            if isinstance(module, nn.Unflatten) and ops.varies_along(x_lab, module.dim):
                return self._skip(node, type(module).__name__, "it splits the channel axis", in_labels, value)
            if isinstance(module, nn.ChannelShuffle) and ops.varies_along(x_lab, 1):
                self._unite_strided(x_lab, module.groups)
            if isinstance(module, nn.PixelShuffle):
                self._unite_blocks(x_lab, module.upscale_factor**2)
            return module(x_lab)
        return self._skip(node, f"module '{name}' ({type(module).__name__})", "no channel mapping is known for it", in_labels, value)

    def _add_slot(self, name: str, role: str, labels: torch.Tensor, macs: float, exact: bool = True) -> torch.Tensor:
        """Record a slot; a layer called twice shares its channels, so unite both calls' ids."""
        key = (name, role)
        if key in self._slots:
            self._uf.unite(self._slots[key].labels, labels)
            self._slots[key].exact &= exact
            return self._slots[key].labels
        self._slots[key] = Slot(name, role, labels.clone(), macs, exact=exact)
        return labels

    def _channel_ids(self, x_lab: torch.Tensor, dim: int) -> torch.Tensor:
        """One id per index of `dim`: ids that share an index must go together, so unite them."""
        rows = x_lab.movedim(dim, 0).reshape(x_lab.shape[dim], -1)
        self._uf.unite(rows, rows[:, :1])
        return rows[:, 0].clone()

    def _unite_blocks(self, x_lab: torch.Tensor, block: int, dim: int = 1) -> None:
        ids = self._channel_ids(x_lab, dim).view(-1, block)
        self._uf.unite(ids, ids[:, :1])

    def _unite_strided(self, x_lab: torch.Tensor, pieces: int, dim: int = 1) -> None:
        """Index k of every one of `pieces` equal pieces goes together, so the pieces stay equal."""
        ids = self._channel_ids(x_lab, dim).view(pieces, -1)
        self._uf.unite(ids, ids[:1])

    def _conv(self, node, name, conv, in_labels, value, derived):
        x_lab = in_labels[0]
        kernel = conv.weight[0, 0].numel()
        spatial = (x_lab if conv.transposed else value)[0, 0].numel()  # positions the kernel visits
        in_ids = self._channel_ids(x_lab, 1)
        if conv.groups == 1:
            self._add_slot(name, "in", in_ids, conv.out_channels * kernel * spatial, exact=not derived)
            ids = self._fresh_output(name, conv.out_channels, conv.in_channels * kernel * spatial)
        elif conv.in_channels == conv.out_channels:
            # A grouped conv can only lose whole groups (each input group with its output group),
            # or its groups would become unequal; a depthwise conv's groups are single channels.
            self._unite_blocks(x_lab, conv.in_channels // conv.groups)
            ids = self._add_slot(name, "channel", in_ids, conv.in_channels // conv.groups * kernel * spatial)
        else:
            self.skipped.append(
                f"grouped conv '{name}' (groups={conv.groups}, {conv.in_channels} -> {conv.out_channels} channels): "
                "its input and output channels are left out of pruning"
            )
            self._pin(x_lab)
            return torch.zeros(value.shape, dtype=torch.long)
        return ops.along(ids, value.shape, 1)

    def _linear(self, name, linear, x_lab, value):
        rows = value[..., 0].numel() // value.shape[0]
        self._add_slot(name, "in", self._channel_ids(x_lab, -1), linear.out_features * rows)
        ids = self._fresh_output(name, linear.out_features, linear.in_features * rows)
        return ops.along(ids, value.shape, -1)

    def _layer_norm(self, node, name, norm, in_labels, value):
        x_lab = in_labels[0]
        normalized = range(x_lab.dim() - len(norm.normalized_shape), x_lab.dim())
        if not any(ops.varies_along(x_lab, d) for d in normalized):
            return x_lab  # normalises within each channel
        if len(norm.normalized_shape) > 1:
            return self._skip(node, f"LayerNorm '{name}'", "it normalises across channels and other axes", in_labels, value)
        # Channels last (ConvNeXt): removing a channel changes the mean and variance the others see.
        ids = self._add_slot(name, "channel", self._channel_ids(x_lab, -1), 0.0, exact=False)
        return ops.along(ids, value.shape, -1)

    def _fresh_output(self, name: str, n: int, macs: float) -> torch.Tensor:
        ids = self._add_slot(name, "out", self._uf.fresh(n), macs)
        if id(self.model.get_submodule(name)) in self._ignored:
            self._pin(ids)
        return ids

    def _channel_layer(self, name, x_lab, value):
        ids = self._add_slot(name, "channel", self._channel_ids(x_lab, 1), 0.0)
        return ops.along(ids, value.shape, 1)

    def _channel_wise(self, x_lab, value):
        if value.shape == x_lab.shape:
            return x_lab
        if value.dim() == x_lab.dim() and value.shape[:2] == x_lab.shape[:2]:
            return ops.along(self._channel_ids(x_lab, 1), value.shape, 1)
        self._pin(x_lab)
        return torch.zeros(value.shape, dtype=torch.long)

    def _param_labels(self, target: str, value: torch.Tensor):
        sizes = [d for d, s in enumerate(value.shape) if s > 1]
        if target not in self._params or len(sizes) != 1:
            return self._pinned_like(value)
        dim = sizes[0]
        ids = self._add_slot(f"{target}@{dim}", "param", self._uf.fresh(value.shape[dim]), 0.0)
        return ops.along(ids, value.shape, dim)

    # ---- functions and methods ----------------------------------------------------------------

    def _function(self, node, args, kwargs, label_args, label_kwargs, in_labels, value):
        fn = node.target
        is_method = node.op == "call_method"

        def among(functions, methods=frozenset()):
            return fn in methods if is_method else fn in functions

        if among(ops.SHAPE_QUERIES, {"size", "dim"}) or not in_labels:  # no channels (zeros, arange ...)
            return fx.node.map_aggregate(value, self._pinned_like)
        if isinstance(fn, type) and issubclass(fn, tuple):  # a named tuple of outputs
            return fn(*label_args, **label_kwargs)
        call = (lambda *a, **k: getattr(a[0], fn)(*a[1:], **k)) if is_method else fn
        channel_wise = among(ops.CHANNEL_WISE_FUNCTIONS, ops.CHANNEL_WISE_METHODS) or ops.is_stochastic_depth(fn)
        # A channel-wise op with a second tensor (clamp(x, min=per_channel)) ties x to it, like an add.
        if among(ops.ELEMENTWISE, ops.ELEMENTWISE_METHODS) or (channel_wise and len(in_labels) > 1):
            out = torch.broadcast_to(in_labels[0], value.shape)
            for lab in in_labels[1:]:
                self._uf.unite(out, lab)
            return out.clone()
        if channel_wise:
            return self._channel_wise(in_labels[0], value)
        if among(ops.RESHAPES, ops.RESHAPE_METHODS):
            problem = self._reshape(node, in_labels[0], value, is_method)
            if problem:
                return self._skip(node, f"'{ops.name_of(fn)}'", problem, in_labels, value)
            return call(*label_args, **label_kwargs)
        if among(ops.MOVES, ops.MOVE_METHODS):
            if fn is torch.channel_shuffle and ops.varies_along(in_labels[0], 1):
                self._unite_strided(in_labels[0], args[1])
            if fn is F.pixel_shuffle:
                self._unite_blocks(in_labels[0], args[1] ** 2)
            return call(*label_args, **label_kwargs)
        if among(ops.SPLITS, ops.SPLIT_METHODS):
            if fn is operator.getitem and not isinstance(args[0], torch.Tensor):
                return call(*label_args, **label_kwargs)  # picking one result out of a tuple
            x_lab = in_labels[0]
            for d in ops.split_dims(fn, args, kwargs, x_lab):
                if not ops.varies_along(x_lab, d):
                    continue
                pieces = ops.equal_pieces(node, args, kwargs, x_lab.shape[d])
                if pieces is None:
                    return self._skip(node, f"'{ops.name_of(fn)}'", "it cuts the channel axis at fixed positions", in_labels, value)
                self._unite_strided(x_lab, pieces, d)  # equal pieces stay equal
            return call(*label_args, **label_kwargs)
        if among(ops.SOFTMAXES, ops.SOFTMAX_METHODS):
            if not self._across_pieces(in_labels[0], ops.softmax_dims(args, kwargs, in_labels[0].dim())):
                return self._skip(node, f"'{ops.name_of(fn)}'", "it normalises across channels", in_labels, value)
            return in_labels[0]
        if among(ops.REDUCTIONS, ops.REDUCTION_METHODS):
            dims = ops.reduced_dims(args, kwargs, in_labels[0].dim())
            if not self._across_pieces(in_labels[0], dims):
                return self._skip(node, f"'{ops.name_of(fn)}'", "it reduces across channels", in_labels, value)
            keep = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
            return in_labels[0].amax(dim=tuple(dims), keepdim=keep) if dims else in_labels[0].amax()
        return self._skip(node, f"'{ops.name_of(fn)}'", "no channel mapping is known for it", in_labels, value)

    def _across_pieces(self, x_lab: torch.Tensor, dims: list[int]) -> bool:
        """Whether a sum, mean or softmax over `dims` survives pruning; unites what it needs.

        Over axes the channels do not vary along, it acts per channel. Over an axis they do vary
        along while another kept axis still carries channels (the paths of a stack, as in a
        selective-kernel block: (batch, path, channel, h, w) summed over path), it combines
        equal pieces position by position: index k of every piece goes together, so each piece
        loses the same channels and what stays is computed as before. Over the only axis that
        carries channels, it mixes channels, and removing one would change the rest.
        """
        varied = [d for d in dims if ops.varies_along(x_lab, d)]
        if not varied:
            return True
        if not any(ops.varies_along(x_lab, d) for d in range(x_lab.dim()) if d not in dims):
            return False
        for d in varied:
            self._uf.unite(x_lab, x_lab.narrow(d, 0, 1))
        return True

    def _reshape(self, node: fx.Node, x_lab: torch.Tensor, value: torch.Tensor, is_method: bool) -> str | None:
        """Check a reshape survives pruning; say why not if it would not.

        Merging an axis with the ones after it keeps every channel's entries together. Splitting
        the channel axis into (g, c/g) (a channel shuffle) survives if index k of every one of the
        g blocks goes together: the blocks then stay equal, and g, the only size that may be
        written as a literal, stays the same.
        """
        sizes = ops.literal_sizes(node, is_method)
        for block_in, block_out in ops.reshape_blocks(x_lab.shape, value.shape):
            varied = [d for d in block_in if ops.varies_along(x_lab, d)]
            if not varied:
                continue
            out = [d for d in block_out if value.shape[d] > 1]
            if len(out) > 1 and len(block_in) > 1:
                return "it splits the channel axis"
            if ops.is_literal(sizes, out[-1] if out else block_out[-1]):
                return "it uses a literal channel count, which is wrong once channels are removed"
            if len(out) > 1:
                self._unite_strided(x_lab, x_lab.shape[block_in[0]] // value.shape[out[-1]], block_in[0])
        return None

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
