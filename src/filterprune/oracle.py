"""The oracle ranking of 1611.06440: remove each unit alone and measure the change of the loss.

oracle-loss = C(W') - C(W) and oracle-abs = |C(W') - C(W)|, C the mean loss on held-out data.
Removing a unit is the same as zeroing its channel at the input of every layer that consumes it
(the graph's "in" slots it owns), so that is what is done here, without any surgery.

One model evaluation per unit would be thousands of forward passes. Instead, for each group the
part of the network that no ablation can change (the prefix) runs once, and the rest (the suffix,
everything downstream of the group's consumers) runs on K ablated copies at a time, stacked along
the batch dimension: copy k has unit k zeroed. Both parts run on torch.fx.Interpreter over the
traced model, so this works for any network the channel graph handles, residual and concatenating
ones included. How well each criterion agrees with the oracle is in study.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from .graph import ChannelGraph, Group
from .trace import FxTrace


class _Plan:
    """What to run once (prefix) and per ablation chunk (suffix) for one group."""

    def __init__(self, prefix: set[fx.Node], suffix: set[fx.Node], frontier: set[fx.Node],
                 owners: dict[fx.Node, tuple[torch.Tensor, int]], width: int) -> None:
        self.prefix, self.suffix, self.frontier = prefix, suffix, frontier
        self.owners = owners  # consumer node -> (unit of each input index, channel dim)
        self.width = width  # largest per-example size of a stacked activation, to size the chunks


class _Prefix(fx.Interpreter):
    """Runs only the `needed` nodes and keeps the values of `keep` in `kept`; the Interpreter frees
    every other value after its last use."""

    def __init__(self, module: fx.GraphModule, needed: set[fx.Node], keep: set[fx.Node]) -> None:
        super().__init__(module)
        self.needed, self.keep, self.kept = needed, keep, {}

    def run_node(self, node: fx.Node):
        if node not in self.needed:
            return None
        value = super().run_node(node)
        if node in self.keep:
            self.kept[node] = value
        return value


class _Ablated(fx.Interpreter):
    """Runs a plan's suffix on len(ablated) stacked copies of the batch; in copy k, unit ablated[k]
    is zeroed at the input of every consumer. Prefix values enter stacked, at their own node."""

    def __init__(self, traced: _Traced, plan: _Plan, prefix: dict, ablated: torch.Tensor) -> None:
        super().__init__(traced.module)
        self.traced, self.plan, self.prefix, self.ablated = traced, plan, prefix, ablated

    def run_node(self, node: fx.Node):
        copies = len(self.ablated)
        if node in self.plan.frontier:
            value = self.prefix[node]
            stack = node in self.traced.batched and isinstance(value, torch.Tensor)
            return torch.cat([value] * copies) if stack else value  # cat keeps channels-last
        if node not in self.plan.suffix:
            return None
        if node not in self.plan.owners:
            return super().run_node(node)
        owner, dim = self.plan.owners[node]
        source = node.args[0]
        if node.op == "call_module" and source in self.plan.frontier and len(node.args) == 1 and not node.kwargs:
            module = self.module.get_submodule(node.target)
            if isinstance(module, nn.Linear):
                return _linear_without_units(module, self.prefix[source], owner, self.ablated)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        x = _mask_input(args[0], owner[None, :] != self.ablated[:, None], copies, dim)
        # A consumer is a layer module or a functional call with a layer's weight (timm's std-convs).
        return getattr(self, node.op)(node.target, (x, *args[1:]), kwargs)


class _Traced:
    """The model as an fx GraphModule (the front end of trace.py), with per-node facts from one real run."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        # Traced in eval mode: the oracle measures the deployed network (no dropout, running BN stats).
        self.trace = FxTrace(model, (example[:1],), train=False)
        self.module = self.trace.module
        self.nodes = list(self.module.graph.nodes)
        self.order = {node: i for i, node in enumerate(self.nodes)}
        facts = _Prefix(self.module, set(self.nodes), set(self.nodes))
        facts.run(example[:1])
        self.batched = self._data_dependent()
        self.is_tensor = {n: isinstance(v, torch.Tensor) for n, v in facts.kept.items()}
        self.per_example = {n: v.numel() for n, v in facts.kept.items() if isinstance(v, torch.Tensor) and n in self.batched}

    def _data_dependent(self) -> set[fx.Node]:
        found: set[fx.Node] = set()
        for node in self.nodes:
            if node.op == "placeholder" or any(n in found for n in node.all_input_nodes):
                found.add(node)
        return found

    def plan(self, graph: ChannelGraph, group: Group) -> _Plan | None:
        """Split the graph for `group`; None if no layer consumes its channels (removal changes nothing)."""
        units = range(group.offset, group.offset + group.size)
        by_layer = {}
        for slot in graph.slots:
            in_group = (slot.owner >= units.start) & (slot.owner < units.stop)
            if slot.role == "in" and bool(in_group.any()):
                linear = isinstance(self.trace.model.get_submodule(slot.module), nn.Linear)
                by_layer[slot.module] = (torch.where(in_group, slot.owner, -1), -1 if linear else 1)
        owners = {}
        for node in self.nodes:
            layer = self.trace.layer_call(node) if node.op in ("call_module", "call_function") else None
            if layer is not None and layer[0] in by_layer:
                owners[node] = by_layer[layer[0]]
        consumers = set(owners)
        if not consumers:
            return None
        suffix = set(consumers)
        for node in self.nodes:
            if any(n in suffix for n in node.all_input_nodes):
                suffix.add(node)
        # Sizes read from prefix tensors (x.size(0) ...) must be re-read from the stacked copies.
        pending = list(suffix)
        while pending:
            for source in pending.pop().all_input_nodes:
                if source not in suffix and source in self.batched and not self.is_tensor[source]:
                    suffix.add(source)
                    pending.append(source)
        if self.nodes[-1] not in suffix:
            raise RuntimeError("the oracle needs every group's consumers to reach the model's output")
        frontier = {n for node in suffix for n in node.all_input_nodes if n not in suffix}
        prefix = set(frontier)
        for node in reversed(self.nodes):
            if node in prefix:
                prefix.update(node.all_input_nodes)
        width = max((self.per_example.get(n, 0) for n in suffix | frontier), default=1)
        return _Plan(prefix, suffix, frontier, owners, max(width, 1))


def _mask_input(x: torch.Tensor, keep: torch.Tensor, copies: int, dim: int) -> torch.Tensor:
    """Zero, in copy k of the stacked batch, the input indices that keep[k] marks False."""
    stacked = x.reshape(copies, -1, *x.shape[1:])
    shape = [copies] + [1] * (stacked.dim() - 1)
    shape[dim + 1 if dim >= 0 else dim] = keep.shape[1]
    return (stacked * keep.to(device=x.device, dtype=x.dtype).view(shape)).reshape(x.shape)


def _linear_without_units(linear: nn.Linear, x: torch.Tensor, owner: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor:
    """The Linear's output for every copy, with copy k's unit's input columns zeroed, stacked.

    Zeroing columns only subtracts x[..., cols] @ W[:, cols]^T: a few columns per copy instead of
    a whole Linear, about 1000x less work for the hidden layers of a VGG head.
    """
    columns = [torch.nonzero(owner == u).flatten() for u in ablated.tolist()]
    index = torch.zeros(len(columns), max(len(c) for c in columns), dtype=torch.long)
    used = torch.zeros(index.shape, dtype=x.dtype)
    for k, c in enumerate(columns):
        index[k, :len(c)], used[k, :len(c)] = c, 1
    index, used = index.to(x.device), used.to(x.device)
    weight = linear.weight[:, index] * used  # [out, copies, columns]; padding columns weigh 0
    delta = torch.einsum("...km,okm->k...o", x[..., index], weight)
    return (linear(x).unsqueeze(0) - delta).flatten(0, 1)


def _chunk_losses(traced: _Traced, plan: _Plan, prefix: dict, inputs: torch.Tensor, targets: torch.Tensor,
                  units: torch.Tensor, loss_fn: Callable) -> torch.Tensor:
    """Summed loss over the batch for an unablated copy followed by one copy per unit in `units`."""
    ablated = torch.cat([torch.tensor([-2]), units])  # -2 owns nothing: copy 0 is the unablated reference
    copies, batch = len(ablated), inputs.shape[0]
    out = _Ablated(traced, plan, prefix, ablated).run(enable_io_processing=False)
    targets = targets.to(out.device)
    # One vmapped call, not one per copy: thousands of tiny calls cost more than the copies' passes.
    per_copy = torch.func.vmap(lambda o: loss_fn(o, targets))(out.reshape(copies, batch, *out.shape[1:]))
    return per_copy.double().cpu() * batch


def _ablate_group(traced: _Traced, plan: _Plan, group: Group, inputs: torch.Tensor, targets: torch.Tensor,
                  loss_fn: Callable, budget: int, total: torch.Tensor, bar) -> None:
    """Add each unit's summed loss change on this batch to `total`, a chunk of units per pass."""
    runner = _Prefix(traced.module, plan.prefix, plan.frontier)
    runner.run(inputs, enable_io_processing=False)
    chunk = max(1, min(group.size, budget // (inputs.shape[0] * plan.width) - 1))
    end = group.offset + group.size
    for start in range(group.offset, end, chunk):
        units = torch.arange(start, min(start + chunk, end))
        losses = _chunk_losses(traced, plan, runner.kept, inputs, targets, units, loss_fn)
        # Against the unablated copy of the same pass, so numerics cancel and a unit that changes
        # nothing scores exactly 0.
        total[units] += losses[1:] - losses[0]
        bar.update(len(units))


def _runs_channels_last(model: nn.Module, inputs: torch.Tensor) -> bool:
    """Switch `model` to channels-last if it runs so: the oracle is thousands of passes, and oneDNN's
    convolutions and pooling are about 1.5x faster on it; a .view() of a conv output fails on it."""
    if inputs.dim() != 4:
        return False
    try:
        with torch.no_grad():
            model.to(memory_format=torch.channels_last)(inputs[:1].contiguous(memory_format=torch.channels_last))
        return True
    except RuntimeError:
        model.to(memory_format=torch.contiguous_format)
        return False


def oracle(
    model: nn.Module,
    graph: ChannelGraph,
    loader: Iterable,
    loss_fn: Callable = F.cross_entropy,
    device: torch.device | str | None = None,
    budget: int = 2**25,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Remove each unit of `graph` alone; return {"loss": C(W') - C(W), "abs": |C(W') - C(W)|} per unit
    and "base": C(W).

    C is the mean of `loss_fn` (which must return the batch mean) over all examples of `loader`,
    with the model in eval mode. `budget` caps the elements of one stacked activation: more
    ablations share a forward pass where activations are small. Units no layer consumes get 0.
    """
    device = torch.device(device or "cpu")
    runner = copy.deepcopy(model).eval()  # the caller's model keeps its mode and memory layout
    total = torch.zeros(graph.num_units, dtype=torch.float64)
    base, examples = 0.0, 0
    traced, plans = None, {}
    batches = list(loader)
    channels_last = bool(batches) and _runs_channels_last(runner, batches[0][0].to(device))
    bar = tqdm(total=graph.num_units * len(batches), desc="oracle", unit="ablation", disable=not progress)
    with torch.no_grad():
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            if channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            if traced is None:
                traced = _Traced(runner, inputs)
                plans = {id(g): traced.plan(graph, g) for g in graph.groups}
            for group in graph.groups:
                if plans[id(group)] is None:
                    bar.update(group.size)
                else:
                    _ablate_group(traced, plans[id(group)], group, inputs, targets, loss_fn, budget, total, bar)
            base += float(loss_fn(runner(inputs), targets)) * inputs.shape[0]
            examples += inputs.shape[0]
    bar.close()
    if examples == 0:
        raise ValueError("the loader gave no batches for the oracle")
    change = total / examples
    return {"loss": change, "abs": change.abs(), "base": torch.tensor(base / examples, dtype=torch.float64)}
