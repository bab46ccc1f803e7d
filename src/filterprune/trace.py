"""Trace a model with torch.fx into a graph of its ops (the first step of graph.py).

Tracing runs in train mode so that branches only used in training (auxiliary heads) are seen.
"""

from __future__ import annotations

from torch import fx, nn

from .utils import training


class GraphError(RuntimeError):
    """The model could not be traced into channel groups; the message says why and what to do."""


class _Tracer(fx.Tracer):
    """fx's tracer, with some conv subclasses kept whole (see _untraceable_convs)."""

    def __init__(self, leaves: set[type] = frozenset()) -> None:
        super().__init__()
        self.leaves = leaves
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in self.leaves or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace in train mode so that branches only used in training (auxiliary heads) are seen too.

    A conv subclass whose own forward fx cannot trace (timm's Conv2dSame computes its padding
    from the input's size) is kept whole and mapped as the conv it is; the pruner's self-check
    still compares every removal with the zeroed unpruned model, so that assumption is verified.
    """
    with training(model):
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
                "cannot be traced; move it into a submodule or make the branch depend on module attributes."
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
