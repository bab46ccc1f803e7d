"""The torch.export front end: the model's ATen graph, as export gives it before decompositions.

Non-strict export runs the model's forward as plain Python on the example inputs, so shape checks,
`*args, **kwargs` forwards and `isinstance` tests run as they do for the user; fx symbolic tracing
refuses or mistraces those. Every node carries its value's shape and dtype (node.meta["val"]), so
the label run needs no second pass of the model. Parameters and buffers are graph inputs; the
graph signature names the model tensor behind each. The price: every size is concrete, so a view
with a literal channel count looks like one whose size is read from the tensor; the pruner's
probe (probe.py) checks each group instead.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from typing import Callable, Iterator

import torch
from torch import fx, nn

from . import graph_ops as ops
from .trace import GraphError, Trace
from .utils import preserved_state, training


class ExportTrace(Trace):
    """The model exported by torch.export (non-strict, train mode), leaving the model as it was."""

    sees_literals = False

    def __init__(self, model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> None:
        program = export(model, example_inputs, example_kwargs)
        signature = program.graph_signature
        self._tensors = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
        self._user_outputs = {i for i, spec in enumerate(signature.output_specs)
                              if spec.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT}
        super().__init__(model, program.graph)

    def attribute(self, node: fx.Node) -> str | None:
        return self._tensors.get(node.name) if node.op == "placeholder" else None

    def op(self, node: fx.Node) -> tuple[object, bool]:
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            fn = ops.ATEN.get(target.overloadpacket, target)
            return fn, isinstance(fn, str)
        return target, False

    def call(self, node: fx.Node) -> Callable:
        return node.target

    def user_outputs(self, node: fx.Node):
        return [value for i, value in enumerate(node.args[0]) if i in self._user_outputs]

    def run(self, visit: Callable[[fx.Node, object], None]) -> None:
        for node in self.nodes:
            visit(node, fx.node.map_aggregate(node.meta.get("val"), _shape_only))


def _shape_only(value):
    """A meta tensor of the value's shape and dtype: the rules read shapes, never values."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    return value


def export(model: nn.Module, args: tuple, kwargs: dict | None = None) -> torch.export.ExportedProgram:
    """torch.export.export in train mode (BatchNorms in eval mode: batch statistics of a batch of
    one would refuse a 1x1 map, and the mode changes no channel), leaving the model as it was."""
    with _modules_kept(model), training(model), preserved_state(model), _quiet_failures():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        try:
            return torch.export.export(model, tuple(args), kwargs or {}, strict=False)
        except Exception as err:  # export raises many types; all mean the same thing to the user
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise GraphError(f"torch.export could not trace {type(model).__name__}: {first}. Check that the "
                             "model runs on the example inputs (and example_kwargs) as given.") from err


@contextlib.contextmanager
def _quiet_failures() -> Iterator[None]:
    """A forward export refuses makes it log warnings and print its partial graph to stderr; the
    GraphError says why in one line, so keep those off the user's terminal (and pass on what a
    successful export wrote there)."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level, written = logger.level, io.StringIO()
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(written):
            yield
    finally:
        logger.setLevel(level)
    sys.stderr.write(written.getvalue())


@contextlib.contextmanager
def _modules_kept(model: nn.Module) -> Iterator[None]:
    """Put back every module attribute the forward set while exporting (a detector caching its
    anchors, say, as fake tensors), and drop the ones it added."""
    saved = [(m, dict(vars(m))) for m in model.modules()]
    try:
        yield
    finally:
        for module, attrs in saved:
            current = vars(module)
            for name in set(current) - set(attrs):
                del current[name]
            current.update(attrs)
