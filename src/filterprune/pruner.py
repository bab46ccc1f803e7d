"""The pruning policy: rank units with a criterion, pick the lowest ones, remove them, check the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from . import criteria
from .graph import ChannelGraph, GraphError, Group
from .surgery import remove_units

_SIZE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features", "num_channels",
               "num_groups", "num_parameters")


@dataclass
class PruneResult:
    """What one call to Pruner.prune removed."""

    removed: dict[str, list[int]]  # layer (or parameter) name -> ORIGINAL indices of removed output channels
    removed_per_group: dict[str, int]  # group name -> units removed in this call
    channels: dict[str, int] = field(default_factory=dict)  # group name -> units left
    requested: int = 0

    @property
    def count(self) -> int:
        return sum(self.removed_per_group.values())


class Pruner:
    """Ranks the channels of `model` with a criterion and removes the lowest ones, in place.

    criterion: one of criteria.CRITERIA. ignore: modules whose outputs are never pruned (the
    classifier, typically; the model's outputs are never pruned anyway). min_channels: the fewest
    channels a group may keep, an int or {group name: int}; at least 1. round_to: keep channel
    counts at multiples of this (8 suits most CPU and GPU kernels). normalize: per-group L2
    normalisation of scores (1611.06440; on by default). flops_lambda: subtract lambda * (MMACs a
    unit costs) from its score (the paper uses 1e-3). scope: "global" ranks all groups together,
    "layer" removes the same share from every group. combine: how coupled layers' scores merge.
    unit_cost: replaces the MACs in the regularisation (e.g. measured latency per unit).
    verify: after every removal, compare the pruned model with the unpruned one whose removed
    channels are zeroed, on the example inputs; undo the removal and raise if they differ.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs,
        criterion: str = "taylor",
        ignore: Iterable[nn.Module] = (),
        min_channels: int | dict[str, int] = 1,
        round_to: int = 1,
        normalize: bool = True,
        flops_lambda: float = 0.0,
        scope: str = "global",
        combine: str = "mean",
        strict: bool = False,
        verify: bool = True,
        seed: int = 0,
        unit_cost: Callable[["Pruner"], torch.Tensor] | None = None,
    ) -> None:
        if criterion not in criteria.CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(criteria.CRITERIA)}")
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', not {scope!r}")
        if combine not in criteria.COMBINE:
            raise ValueError(f"combine must be one of {criteria.COMBINE}, not {combine!r}")
        if round_to < 1:
            raise ValueError("round_to must be at least 1")
        self.model = model
        self.example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        self.criterion, self.ignore, self.min_channels, self.round_to = criterion, list(ignore), min_channels, round_to
        self.normalize, self.flops_lambda, self.scope, self.combine = normalize, flops_lambda, scope, combine
        self.strict, self.verify, self.seed, self.unit_cost = strict, verify, seed, unit_cost
        self._ranked: torch.Tensor | None = None
        self._origin: dict[str, torch.Tensor] = {}
        self._retrace()

    def _retrace(self) -> None:
        self.graph = ChannelGraph(self.model, self.example_inputs, ignore=self.ignore, strict=self.strict)
        for slot in self.graph.slots:
            if slot.role != "in":
                self._origin.setdefault(_layer_name(slot.module), torch.arange(len(slot.owner)))
        self._ranked = None

    @property
    def groups(self) -> list[Group]:
        return self.graph.groups

    @property
    def skipped(self) -> list[str]:
        """Ops whose channels were left out of pruning, and why."""
        return self.graph.skipped

    def rank(self, loader: Iterable, loss_fn: Callable, device=None, max_batches: int | None = None,
             progress: bool = True, reduce: Callable | None = None) -> torch.Tensor:
        """Forward (and backward) over `loader` to score channels; weights are not updated.

        Weight-only criteria (l1, l2, bn-scale, random) need no data; for them this only returns
        the scores.
        """
        if self.criterion in criteria.DATA_CRITERIA:
            self._ranked = criteria.accumulate(self.model, self.graph, loader, loss_fn, [self.criterion], self.combine,
                                               device, max_batches, progress, reduce)[self.criterion]
        return self.scores()

    def raw_scores(self) -> torch.Tensor:
        """The criterion's score of every unit, before normalisation and regularisation."""
        if self._ranked is not None:
            return self._ranked
        if self.criterion in criteria.WEIGHT_CRITERIA:
            return criteria.weight_scores(self.criterion, self.model, self.graph, self.combine, self.seed)
        raise RuntimeError(
            f"criterion {self.criterion!r} needs data: call pruner.rank(loader, loss_fn) first "
            "(and again after every prune, since the channels have changed)"
        )

    def scores(self) -> torch.Tensor:
        """The scores ranking uses: normalised per group and regularised by cost, if asked."""
        scores = self.raw_scores()
        if self.normalize:
            scores = criteria.normalize_per_group(scores, self.graph)
        if self.flops_lambda:
            cost = self.unit_cost(self) if self.unit_cost else self.graph.unit_cost() / 1e6
            scores = scores - self.flops_lambda * cost
        return scores

    def prunable(self) -> int:
        """How many units could still be removed under the per-group minimums."""
        return sum(max(0, g.size - self._minimum(g)) for g in self.groups)

    def select(self, n: int, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Which units prune(n) would remove (a bool mask over the graph's units), removing nothing."""
        return self._select(n, self.scores() if scores is None else scores)

    def prune(self, n: int) -> PruneResult:
        """Remove the n lowest-ranked units (fewer if minimums or rounding forbid), physically, in place."""
        if n < 0:
            raise ValueError("n must be >= 0")
        remove = self._select(n, self.scores())
        result = self._result(remove, n)
        if remove.any():
            self._remove(remove)
        for group in self.groups:
            result.channels[group.name] = group.size
        return result

    # ---- selection ----------------------------------------------------------------------------

    def _minimum(self, group: Group) -> int:
        wanted = self.min_channels.get(group.name, 1) if isinstance(self.min_channels, dict) else self.min_channels
        return max(1, wanted)

    def _select(self, n: int, scores: torch.Tensor) -> torch.Tensor:
        ranked = torch.where(scores.isnan(), torch.inf, scores)
        group_of = torch.empty(self.graph.num_units, dtype=torch.long)
        for i, group in enumerate(self.groups):
            group_of[group.offset:group.offset + group.size] = i
        room = [max(0, g.size - self._minimum(g)) for g in self.groups]
        if self.scope == "layer":
            total = sum(g.size for g in self.groups) or 1
            room = [min(r, int(n * g.size / total)) for r, g in zip(room, self.groups)]
        taken = [[] for _ in self.groups]
        left = n
        for unit in torch.argsort(ranked, stable=True).tolist():
            if left == 0 or ranked[unit].isinf():
                break
            g = int(group_of[unit])
            if len(taken[g]) < room[g]:
                taken[g].append(unit)
                left -= 1
        remove = torch.zeros(self.graph.num_units, dtype=torch.bool)
        for group, units in zip(self.groups, taken):
            kept = group.size - len(units)
            if self.round_to > 1 and units:
                kept = min(group.size, -(-kept // self.round_to) * self.round_to)
            remove[units[:group.size - kept]] = True  # units are in rank order: keep the best
        return remove

    def _result(self, remove: torch.Tensor, requested: int) -> PruneResult:
        removed: dict[str, list[int]] = {}
        for slot in self.graph.slots:
            if slot.role == "in":
                continue
            owned = slot.owner >= 0
            dropped = torch.zeros_like(owned)
            dropped[owned] = remove[slot.owner[owned]]
            if dropped.any():
                removed[_layer_name(slot.module)] = self._origin[_layer_name(slot.module)][dropped].tolist()
        per_group = {g.name: int(remove[g.offset:g.offset + g.size].sum()) for g in self.groups}
        return PruneResult(removed, {k: v for k, v in per_group.items() if v}, requested=requested)

    # ---- removal and its check ----------------------------------------------------------------

    def _remove(self, remove: torch.Tensor) -> None:
        backup = _backup(self.model)
        reference = self._zeroed_outputs(remove) if self.verify else None
        try:
            kept = remove_units(self.model, self.graph, remove)
            if reference is not None:
                self._check(reference)
        except Exception:
            _restore(self.model, backup)
            raise
        for name, keep in kept.items():
            self._origin[_layer_name(name)] = self._origin[_layer_name(name)][keep]
        self._retrace()

    def _zeroed_outputs(self, remove: torch.Tensor) -> list[torch.Tensor]:
        """The unpruned model's outputs with the removed channels zeroed where they are consumed."""
        handles = []
        for slot in self.graph.slots:
            if slot.role != "in":
                continue
            owned = slot.owner >= 0
            keep = torch.ones(len(slot.owner), dtype=torch.bool)
            keep[owned] = ~remove[slot.owner[owned]]
            if keep.all():
                continue
            module = self.model.get_submodule(slot.module)
            last = isinstance(module, nn.Linear)

            def zero(mod, args, keep=keep, last=last):
                x = args[0]
                shape = [1] * x.dim()
                shape[-1 if last else 1] = -1
                return (x * keep.to(x.dtype).to(x.device).view(shape),) + tuple(args[1:])

            handles.append(module.register_forward_pre_hook(zero))
        try:
            return self._outputs()
        finally:
            for handle in handles:
                handle.remove()

    def _outputs(self) -> list[torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model(*self.example_inputs)
        finally:
            self.model.train(was_training)
        flat: list[torch.Tensor] = []
        torch.utils._pytree.tree_map(lambda x: flat.append(x) if isinstance(x, torch.Tensor) else None, out)
        return flat

    def _check(self, reference: list[torch.Tensor]) -> None:
        try:
            outputs = self._outputs()
        except RuntimeError as err:
            raise GraphError(f"the pruned model no longer runs ({err}); the removal was undone") from err
        for ref, out in zip(reference, outputs):
            scale = ref.abs().max().clamp_min(1e-12)
            error = ((ref - out).abs().max() / scale).item()
            if ref.shape != out.shape or error > 1e-3:
                raise GraphError(
                    f"the pruned model's output differs from the zeroed unpruned model (relative error {error:.2e}); "
                    "an op in this model changes meaning when channels are removed. The removal was undone; "
                    "use strict=True to find unmapped ops, or ignore= the layers around it."
                )


def _layer_name(slot_module: str) -> str:
    return slot_module.split("@")[0]


def _backup(model: nn.Module) -> dict:
    """References to every module's tensors and sizes; surgery swaps tensors, never edits them."""
    return {name: (dict(m._parameters), dict(m._buffers), {a: getattr(m, a) for a in _SIZE_ATTRS if hasattr(m, a)})
            for name, m in model.named_modules()}


def _restore(model: nn.Module, backup: dict) -> None:
    for name, module in model.named_modules():
        params, buffers, sizes = backup[name]
        module._parameters.update(params)
        module._buffers.update(buffers)
        for attr, value in sizes.items():
            setattr(module, attr, value)
