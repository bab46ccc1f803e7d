"""Trace a model into groups of coupled channels.

A front end (trace.py: torch.fx; trace_export.py: torch.export) gives the model's graph and each node's
value on the example inputs. Beside every value we carry a *label tensor* of the same shape whose
entries are channel ids:

- a layer that creates channels (a conv or Linear) gives its outputs fresh ids; a functional call
  (F.conv2d, aten.batch_norm, F.layer_norm ...) made with one layer's own tensors maps like a call
  of that layer (timm's BatchNormAct2d, std-convs); values computed from layer tensors alone (a
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

channels.py keeps the books (which ids go together, the slots, the groups); building a graph
never changes the model.

What comes out is a list of *slots*: each is one axis of one layer (the output rows of a conv,
the input columns of the next one, the features of a BatchNorm ...) with the channel id at every
index. Channels whose ids end up united form one removable unit; units touching the same slots
form a group, the thing a user sees as "a layer".
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import graph_ops as ops
from .channels import PINNED, Books, Group, Slot
from .trace import FxTrace, GraphError, Trace
from .utils import dropped_indices

__all__ = ["ChannelGraph", "GraphError", "Group", "PINNED", "Slot"]

FRONTENDS = ("auto", "fx", "export")


class ChannelGraph:
    """The coupled-channel structure of a model, traced on example inputs.

    `slots` lists every sliceable axis with the unit that owns each index; `groups` lists the
    removable groups; `skipped` says which ops were left out of pruning and why. Building it
    leaves the model's parameters, buffers and every module's train/eval mode as they were.
    frontend: "fx" (trace.py), "export" (trace_export.py) or "auto": fx where it traces and its graph
    runs, else export; keyword inputs need export. `trace`: a front end's Trace to use instead.
    """

    def __init__(self, model: nn.Module, example_inputs=(), ignore=(), strict: bool = False,
                 example_kwargs: dict | None = None, frontend: str = "auto", trace: Trace | None = None) -> None:
        self.model = model
        self.strict = strict
        self._ignored = {id(m) for m in ignore}
        self._params = dict(model.named_parameters())
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        example_inputs = tuple(example_inputs)
        if frontend not in FRONTENDS:
            raise ValueError(f"frontend must be one of {FRONTENDS}, not {frontend!r}")
        if example_kwargs and frontend == "fx":
            raise ValueError("example_kwargs need frontend='export' (or 'auto'): torch.fx traces positional inputs only")
        from .trace_export import ExportTrace  # torch.export is imported only where it is used

        if trace is not None:
            self._follow(trace)
        elif frontend == "export" or example_kwargs:
            self._follow(ExportTrace(model, example_inputs, example_kwargs))
        elif frontend == "fx" or strict:
            self._follow(FxTrace(model, example_inputs))
        else:
            # auto: fx where it traces and its graph runs; else export (fx refuses control flow on
            # shapes and `*args` forwards, and may trace another program, as MONAI's BasicUNet).
            try:
                self._follow(FxTrace(model, example_inputs))
            except GraphError as fx_error:
                try:
                    self._follow(ExportTrace(model, example_inputs))
                except GraphError as export_error:  # say why both failed: fx's reason is often the clearer one
                    raise GraphError(f"{fx_error}; and {export_error}") from export_error

    def _follow(self, trace: Trace) -> None:
        """Run the label propagation over `trace` into fresh books."""
        self.trace, self.skipped = trace, []
        self._books = Books()
        self._uf = self._books.uf
        self.frontend = "export" if not trace.sees_literals else "fx"
        self._env: dict[fx.Node, object] = {}
        self._labels: dict[fx.Node, object] = {}
        self._static: set[fx.Node] = set()  # computed from a layer's own tensors only: no channels
        try:
            trace.run(self._visit)
        except Exception as err:  # a graph that does not run, or a rule that does not fit it: one error type
            if isinstance(err, GraphError):
                raise
            hint = "; try frontend='export'" if trace.sees_literals else ""
            raise GraphError(f"the channel labels could not follow {type(self.model).__name__}'s graph "
                             f"({' '.join(str(err).split())}){hint}") from err
        finally:
            self._env, self._labels = {}, {}
        self.groups, self.num_units = self._books.finish()

    def _visit(self, node: fx.Node, value) -> None:
        if node.op == "output":
            self._pin(fx.node.map_arg(self.trace.user_outputs(node), self._labels.get))
            return
        self._env[node] = value
        self._labels[node] = self._label(node, value)

    # ---- labels -------------------------------------------------------------------------------

    @staticmethod
    def _pinned_like(x):
        return torch.zeros(x.shape, dtype=torch.long) if isinstance(x, torch.Tensor) else None

    def _pin(self, *label_trees) -> None:
        for lab in ops.tensors(label_trees):
            self._uf.pin(lab)

    def _skip(self, node: fx.Node, what: str, why: str, in_labels, value):
        """Leave the channels an op touches out of pruning (or refuse, in strict mode)."""
        # fx keys the stack by module name; export by an id, with (name, type) as the value.
        scope = [v[0] if isinstance(v, tuple) else k for k, v in node.meta.get("nn_module_stack", {}).items()]
        where = f"in module '{scope[-1]}'" if scope and scope[-1] else "at the model's top level"
        message = f"{what} {where} (node '{node.name}'): {why}; its channels are left out of pruning"
        message += ops.source_line(node)
        if self.strict:
            raise GraphError(message)
        self.skipped.append(message)
        self._pin(in_labels)
        return fx.node.map_aggregate(value, self._pinned_like)

    def _label(self, node: fx.Node, value):
        trace = self.trace
        if node.op == "placeholder" and trace.attribute(node) is None or not ops.tensors(value):
            return fx.node.map_aggregate(value, self._pinned_like)
        target = trace.attribute(node)
        if target is not None:
            if trace.layer_of(target) is None:
                return self._param_labels(target, value)
            self._static.add(node)  # a layer's own tensor: the layer's op maps it
            return fx.node.map_aggregate(value, self._pinned_like)
        sources = [n for n in node.all_input_nodes if ops.tensors(self._env[n])]
        if sources and all(n in self._static for n in sources):
            self._static.add(node)
            return fx.node.map_aggregate(value, self._pinned_like)
        # Ops are replayed on label tensors: tensor arguments become their labels, the rest stay.
        label_of = lambda n: self._labels[n] if ops.tensors(self._env[n]) else self._env[n]  # noqa: E731
        label_args = fx.node.map_arg(node.args, label_of)
        label_kwargs = fx.node.map_arg(node.kwargs, label_of)
        in_labels = ops.tensors((label_args, label_kwargs))
        if node.op == "call_module":
            return self._module(node, node.target, self.model.get_submodule(node.target), in_labels, value)
        owner = trace.layer_call(node)
        if owner is not None:
            name, module, derived = owner
            return self._module(node, name, module, in_labels, value, derived)
        if not any(lab.any() for lab in in_labels):  # only pinned inputs (noise for a drop path): no channels
            return fx.node.map_aggregate(value, self._pinned_like)
        args = fx.node.map_arg(node.args, self._env.get)
        kwargs = fx.node.map_arg(node.kwargs, self._env.get)
        return self._function(node, args, kwargs, label_args, label_kwargs, in_labels, value)

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
        return self._books.add_slot(Slot(name, role, labels, macs, exact=exact))

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
        owner, _, attr = target.rpartition(".")
        ids = self._books.add_slot(Slot(owner, "param", self._uf.fresh(value.shape[dim]), param=attr, dim=dim))
        return ops.along(ids, value.shape, dim)

    # ---- functions and methods ----------------------------------------------------------------

    def _function(self, node, args, kwargs, label_args, label_kwargs, in_labels, value):
        fn, is_method = self.trace.op(node)

        def among(functions, methods=frozenset()):
            return fn in methods if is_method else fn in functions

        if among(ops.SHAPE_QUERIES, {"size", "dim"}) or not in_labels:  # no channels (zeros, arange ...)
            return fx.node.map_aggregate(value, self._pinned_like)
        if isinstance(fn, type) and issubclass(fn, tuple):  # a named tuple of outputs
            return fn(*label_args, **label_kwargs)
        call = self.trace.call(node)
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
            return in_labels[0].reshape(value.shape)  # a view of the labels' strides might not exist
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
                pieces = ops.equal_pieces(fn, node, args, kwargs, x_lab.shape[d], self.trace.sees_literals)
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
        if among(ops.SLICES, ops.SLICES):
            return self._slice(node, fn, args, label_args, in_labels, value)
        if among(ops.MATMULS, ops.MATMUL_METHODS):
            why = "it multiplies two channel-carrying tensors (attention), which removing a channel changes"
            return self._skip(node, f"'{ops.name_of(fn)}'", why if len(in_labels) > 1 else
                              "it multiplies by a fixed matrix along an axis", in_labels, value)
        return self._skip(node, f"'{ops.name_of(fn)}'", "no channel mapping is known for it", in_labels, value)

    def _slice(self, node, fn, args, label_args, in_labels, value):
        """ATen's indexing of one axis (x[:, a:b], x[:, i]): fine off the channel axis, or whole."""
        x_lab, dim = in_labels[0], args[1] % in_labels[0].dim()
        whole = fn == "slice" and value.shape[dim] == x_lab.shape[dim]
        if ops.varies_along(x_lab, dim) and not whole:
            return self._skip(node, f"'{fn}'", "it cuts the channel axis at fixed positions", in_labels, value)
        return self.trace.call(node)(*label_args)

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

    # ---- the result ---------------------------------------------------------------------------

    @property
    def slots(self) -> list[Slot]:
        return list(self._books.slots.values())

    def drop(self, remove: torch.Tensor) -> None:
        """Update the books after the units in `remove` (a bool mask) were cut from the model.

        Removing channels changes no structure, so instead of tracing again the removed positions
        leave every slot, the units are numbered anew, and the MACs per index of a conv's or
        Linear's inputs (outputs) follow the new number of its outputs (inputs).
        """
        slots = self._books.slots
        sizes = {key: len(slot.owner) for key, slot in slots.items()}
        for slot in slots.values():
            keep = ~dropped_indices(slot.owner, remove)
            slot.owner, slot.labels, slot.spread = slot.owner[keep], slot.labels[keep], slot.spread[keep]
        partner = {"in": "out", "out": "in"}
        for key, slot in slots.items():
            other = slots.get((slot.module, partner.get(slot.role), None))
            if other is not None:
                slot.macs_per_index *= len(other.owner) / sizes[other.key]
        self._renumber(remove)

    def exclude(self, groups: list[Group], why: list[str]) -> None:
        """Leave `groups` out of pruning (their positions become pinned), saying why in `skipped`."""
        gone = torch.zeros(self.num_units, dtype=torch.bool)
        for group, reason in zip(groups, why):
            gone[group.offset:group.offset + group.size] = True
            self.skipped.append(f"group '{group.name}' ({group.size} channels): {reason}; its channels are left out of pruning")
        for slot in self.slots:
            slot.owner = torch.where(dropped_indices(slot.owner, gone), -1, slot.owner)
        self._renumber(gone)

    def _renumber(self, gone: torch.Tensor) -> None:
        """Number the units that stay 0, 1, ... in order; drop groups left with none."""
        new = torch.cumsum(~gone, 0) - 1
        for slot in self.slots:
            slot.owner = torch.where(slot.owner >= 0, new[slot.owner.clamp_min(0)], -1)
        offset, groups = 0, []
        for group in self.groups:
            group.size -= int(gone[group.offset:group.offset + group.size].sum())
            group.offset = offset
            offset += group.size
            if group.size:
                groups.append(group)
        self.groups, self.num_units = groups, offset

    def unit_cost(self) -> torch.Tensor:
        """MACs (for one example) that removing each unit saves, from every slot it touches."""
        cost = torch.zeros(self.num_units, dtype=torch.float64)
        for slot in self.slots:
            mask = slot.owner >= 0
            cost.index_add_(0, slot.owner[mask], torch.full((int(mask.sum()),), slot.macs_per_index, dtype=torch.float64))
        return cost

