"""Front ends: a model traced into a graph of ops, and what graph.py and oracle.py ask of it.

A front end gives an fx.Graph and answers four questions about its nodes: which model tensor a
node is (`attribute`), which op a node calls in torch's own terms (`op`), which layer's op a call
is (`layer_call`: a conv module, or F.conv2d / aten.conv2d with a conv's weight), and what every
node's value is on the example inputs (`run`). Two front ends exist: torch.fx symbolic tracing
(here) and torch.export (trace_export.py). Both trace in train mode, so that branches only used in
training (auxiliary heads) are seen.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import graph_ops as ops
from .utils import evaluating, preserved_state, training


class GraphError(RuntimeError):
    """The model could not be traced into channel groups; the message says why and what to do."""


class Trace:
    """A traced model: its graph, and what each node is. Subclasses fill in how it was traced."""

    # Whether sizes written in the user's code show as literals (fx) or every size is concrete
    # (export); where they cannot be told apart, the pruner's probe checks each group.
    sees_literals = True

    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.model, self.graph = model, graph
        self.nodes = list(graph.nodes)
        # Nodes computed from the model's own tensors alone (a standardised conv weight).
        self.static: set[fx.Node] = set()
        for node in self.nodes:
            inputs = node.all_input_nodes
            if self.attribute(node) is not None or (node.op != "placeholder" and inputs
                                                    and all(n in self.static for n in inputs)):
                self.static.add(node)

    def attribute(self, node: fx.Node) -> str | None:
        """The qualified name of the model's parameter or buffer this node is, if it is one."""
        return node.target if node.op == "get_attr" else None

    def op(self, node: fx.Node) -> tuple[object, bool]:
        """(the torch function or method name a node calls, whether it is a method)."""
        return node.target, node.op == "call_method"

    def call(self, node: fx.Node) -> Callable:
        """A callable doing this node's op, to replay it on label tensors."""
        if node.op == "call_method":
            return lambda *a, **k: getattr(a[0], node.target)(*a[1:], **k)
        return node.target

    def user_outputs(self, node: fx.Node):
        """The output node's arguments that are the model's outputs (not buffer updates)."""
        return node.args[0]

    def run(self, visit: Callable[[fx.Node, object], None]) -> None:
        """Call visit(node, value) for every node in order, with its value on the example inputs."""
        raise NotImplementedError

    def layer_of(self, target: str) -> tuple[str, nn.Module] | None:
        """The layer (conv, norm, Linear ...) a tensor attribute belongs to, if it is one."""
        name = target.rpartition(".")[0]
        module = self.model.get_submodule(name)
        return (name, module) if isinstance(module, ops.LAYERS) else None

    def layer_call(self, node: fx.Node) -> tuple[str, nn.Module, bool] | None:
        """(name, module, derived) of the one layer whose op this node is, if any.

        derived: the weight is computed from the layer's tensor (weight standardisation), not the
        tensor itself; input channels then change the weight of the channels that stay.
        """
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            return (node.target, module, False) if isinstance(module, ops.LAYERS) else None
        fn, _ = self.op(node)
        if fn not in ops.FUNCTIONAL_LAYERS:
            return None
        kind, position = ops.FUNCTIONAL_LAYERS[fn]
        found, todo = set(), [n for n in node.all_input_nodes if n in self.static]
        while todo:
            n = todo.pop()
            target = self.attribute(n)
            if target is not None:
                layer = self.layer_of(target)
                if layer is not None and isinstance(layer[1], kind):
                    found.add(layer[0])
            todo.extend(n.all_input_nodes)
        if len(found) != 1:
            return None
        name = found.pop()
        weight = node.args[position] if len(node.args) > position else node.kwargs.get("weight")
        derived = isinstance(weight, fx.Node) and self.attribute(weight) is None
        return name, self.model.get_submodule(name), derived


class _Tracer(fx.Tracer):
    """fx's tracer, with some conv subclasses kept whole (see _untraceable_convs)."""

    def __init__(self, leaves: set[type] = frozenset()) -> None:
        super().__init__()
        self.leaves = leaves
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in self.leaves or super().is_leaf_module(m, qualname)


class _EvalRun(fx.Interpreter):
    """Runs the traced graph; functional norms use their running statistics, as in eval mode."""

    def __init__(self, module: fx.GraphModule, visit: Callable[[fx.Node, object], None]) -> None:
        super().__init__(module)
        self.visit = visit

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        self.visit(node, value)
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


class FxTrace(Trace):
    """The model traced by torch.fx (in train mode unless train=False); values come from a run of
    the traced graph in eval mode."""

    def __init__(self, model: nn.Module, example_inputs: tuple, train: bool = True) -> None:
        with preserved_state(model):  # tracing in train mode runs timm's `num_batches_tracked.add_(1)` for real
            self.module = trace(model, train)
        self.example_inputs = example_inputs
        super().__init__(model, self.module.graph)

    def run(self, visit: Callable[[fx.Node, object], None]) -> None:
        # The traced graph updates buffers again (the same add_): give them back.
        with preserved_state(self.model), evaluating(self.model), torch.no_grad():
            _EvalRun(self.module, visit).run(*self.example_inputs)


def trace(model: nn.Module, train: bool = True) -> fx.GraphModule:
    """Trace in train mode so that branches only used in training (auxiliary heads) are seen too
    (train=False: in eval mode, the network as deployed).

    A conv subclass whose own forward fx cannot trace (timm's Conv2dSame computes its padding
    from the input's size) is kept whole and mapped as the conv it is; the pruner's self-check
    still compares every removal with the zeroed unpruned model, so that assumption is verified.
    """
    with training(model) if train else evaluating(model):
        try:
            return fx.GraphModule(model, _Tracer().trace(model))
        except Exception as err:  # fx raises many types; all mean the same thing to the user
            leaves = _untraceable_convs(model)
            try:
                if leaves:
                    return fx.GraphModule(model, _Tracer(leaves).trace(model))
            except Exception:
                pass
            raise GraphError(
                f"torch.fx could not trace {type(model).__name__}: {err}. Data-dependent Python control flow "
                "cannot be traced; use frontend='export', move it into a submodule or make the branch depend on "
                "module attributes."
            ) from err


def _untraceable_convs(model: nn.Module) -> set[type]:
    """Types of the conv subclasses in `model` that fx cannot trace on their own."""
    found: set[type] = set()
    for module in model.modules():
        kind = type(module)
        if isinstance(module, nn.modules.conv._ConvNd) and kind.__module__.split(".")[0] != "torch" and kind not in found:
            try:
                fx.symbolic_trace(module)
            except Exception:
                found.add(kind)
    return found
