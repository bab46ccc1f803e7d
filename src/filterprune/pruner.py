"""The pruning policy: rank units with a criterion, pick the lowest ones, remove them, check the result."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import criteria
from .graph import ChannelGraph, GraphError, Group
from .probe import probe
from .surgery import removed
from .utils import dropped_indices, evaluating, preserved_state

NORMALIZE = ("l2", "none", "mean", "macs")


@dataclass
class PruneResult:
    """What one call to Pruner.prune removed, and what the model costs before and after."""

    removed: dict[str, list[int]]  # layer (or parameter) name -> ORIGINAL indices of removed output channels
    removed_per_group: dict[str, int]  # group name -> units removed in this call
    channels: dict[str, int] = field(default_factory=dict)  # group name -> units left
    macs_before: int = 0  # multiply-accumulates per example (torch.utils.flop_counter)
    macs_after: int = 0
    # "exact": the pruned model equals the unpruned one with the removed channels zeroed;
    # "forward-only": a removal touched a layer that changes meaning (LayerNorm/GroupNorm across
    # channels), so only "it runs and its output shapes are unchanged" was checked.
    check: str = "exact"

    @property
    def count(self) -> int:
        return sum(self.removed_per_group.values())


class Pruner:
    """Ranks the channels of `model` with a criterion and removes the lowest ones, in place.

    criterion: a name of criteria.CRITERIA or a criteria.Criterion object. ignore: modules whose
    outputs are never pruned (the classifier, typically; the model's outputs are never pruned
    anyway). min_channels: the fewest channels a group may keep, an int or {group name: int}; at
    least 1. round_to: keep channel counts at multiples of this; "auto" is 8 for a model on CUDA
    (tensor-core kernels want multiples of 8) and 1 on the CPU (timings here could not tell 1 and 8 apart).
    normalize: how scores of different groups are made comparable before global ranking:
    "mean" (the default: divide by the group's mean, size-neutral), "l2" (per group, 1611.06440 eq. 9:
    scales by about 1/sqrt(width), so wide cheap layers go first), "macs"
    ("mean", then per MAC a unit costs: cost-aware), "none"; True and False mean "l2" and "none".
    flops_lambda: subtract lambda * (MMACs a unit costs) from its score (the paper uses 1e-3).
    scope: "global" ranks all groups together, "layer" removes the same share from every group.
    combine: how coupled layers' weight scores merge. unit_cost: replaces the MACs in the
    regularisation (e.g. measured latency per unit). verify: after every removal, compare the
    pruned model with the unpruned one whose removed channels are zeroed, on the example inputs;
    undo the removal and raise if they differ. example_kwargs: keyword inputs of the model
    (transformers' `pixel_values=`), beside or instead of example_inputs. frontend: how the model
    is traced: "fx" (torch.fx), "export" (torch.export) or "auto" (fx where it traces, else export).
    Then every group is probed (with export always, with fx when verify is on): one unit of each is
    removed, the model run and compared with the zeroed reference, and the groups that break or
    change it are left out, see `skipped`.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs,
        criterion: str | criteria.Criterion = "taylor",
        ignore: Iterable[nn.Module] = (),
        min_channels: int | dict[str, int] = 1,
        round_to: int | str = "auto",
        normalize: str | bool = "mean",
        flops_lambda: float = 0.0,
        scope: str = "global",
        combine: str = "mean",
        strict: bool = False,
        verify: bool = True,
        seed: int = 0,
        unit_cost: Callable[["Pruner"], torch.Tensor] | None = None,
        example_kwargs: dict | None = None,
        frontend: str = "auto",
    ) -> None:
        self.criterion = criteria.get(criterion)
        normalize = {True: "l2", False: "none"}.get(normalize, normalize) if isinstance(normalize, bool) else normalize
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, not {normalize!r}")
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', not {scope!r}")
        if combine not in criteria.COMBINE:
            raise ValueError(f"combine must be one of {criteria.COMBINE}, not {combine!r}")
        if combine != "mean" and not self.criterion.combines:
            raise ValueError(f"combine={combine!r} does not apply to {self.criterion.name!r}: it sums a channel's terms over "
                             "all its consumers; combine only merges per-layer weight scores (l1, l2, bn-scale, taylor-weight)")
        if round_to == "auto":
            first = next(model.parameters(), None)
            round_to = 8 if first is not None and first.is_cuda else 1
        if not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be 'auto' or an int >= 1, not {round_to!r}")
        self.model = model
        self.example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        self.example_kwargs = dict(example_kwargs or {})
        self.ignore, self.min_channels, self.round_to = list(ignore), min_channels, round_to
        self.normalize, self.flops_lambda, self.scope, self.combine = normalize, flops_lambda, scope, combine
        self.strict, self.verify, self.seed, self.unit_cost = strict, verify, seed, unit_cost
        self._ranked: torch.Tensor | None = None
        self._origin: dict[str, torch.Tensor] = {}
        with evaluating(self.model), preserved_state(self.model):  # tracing must not touch the user's model
            self.graph = ChannelGraph(self.model, self.example_inputs, ignore=self.ignore, strict=self.strict,
                                      example_kwargs=self.example_kwargs, frontend=frontend)
        for slot in self.graph.slots:
            if slot.role != "in":
                self._origin.setdefault(slot.name, torch.arange(len(slot.owner)))
        # Every exported group is probed (its sizes are concrete); fx's groups too when removals are
        # verified anyway: a size read from one tensor to reshape another (timm's edgenext) looks
        # derived to fx, and the probe leaves out that block instead of refusing the whole prune.
        if self.graph.frontend == "export" or verify:
            probe(self)
        self.macs_at_start = self._macs = self.macs()

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

        Criteria that record nothing from data (l1, l2, bn-scale, random) only return their scores.
        """
        if self.criterion.records:
            self._ranked = criteria.accumulate(self.model, self.graph, loader, loss_fn, [self.criterion], self.combine,
                                               device, max_batches, progress, reduce)[self.criterion.name]
        return self.scores()

    def raw_scores(self) -> torch.Tensor:
        """The criterion's score of every unit, before normalisation and regularisation."""
        if self._ranked is not None:
            return self._ranked
        if self.criterion.needs_data:
            raise RuntimeError(
                f"criterion {self.criterion.name!r} needs data: call pruner.rank(loader, loss_fn) first "
                "(and again after every prune, since the channels have changed)"
            )
        return self.criterion.scores(self.model, self.graph, None, self.combine, self.seed)

    def scores(self) -> torch.Tensor:
        """The scores ranking uses: normalised per group and regularised by cost, if asked."""
        scores = self.raw_scores()
        if self.normalize == "l2":
            scores = criteria.normalize_per_group(scores, self.graph)
        elif self.normalize in ("mean", "macs"):
            scores = criteria.normalize_per_group(scores, self.graph, "mean")
        if self.normalize == "macs":  # per MAC a unit costs, relative to the average unit
            cost = self.graph.unit_cost()
            scores = scores / (cost / cost.mean()).clamp_min(1e-12)
        if self.flops_lambda:
            cost = self.unit_cost(self) if self.unit_cost else self.graph.unit_cost() / 1e6
            scores = scores - self.flops_lambda * cost
        return scores

    def prunable(self) -> int:
        """How many units could still be removed under the per-group minimums."""
        return sum(max(0, g.size - self._minimum(g)) for g in self.groups)

    def macs(self) -> int:
        """Multiply-accumulates of the model now, per example of the example inputs (flop_counter)."""
        with evaluating(self.model), preserved_state(self.model), torch.no_grad(), \
                FlopCounterMode(display=False) as counter:
            self.model(*self.example_inputs, **self.example_kwargs)
        return counter.get_total_flops() // 2 // self._batch_size()

    def _batch_size(self) -> int:
        first = next(iter(self.example_inputs + tuple(self.example_kwargs.values())), None)
        return first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else 1

    def select(self, n: int, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Which units prune(n) would remove (a bool mask over the graph's units), removing nothing."""
        scores = self.scores() if scores is None else scores
        return self._select(self._rounded_count(n, scores), scores)

    def prune(self, n: int | None = None, *, ratio: float | None = None, macs: float | None = None) -> PruneResult:
        """Remove units in rank order, physically, in place; give exactly one target.

        n: the n lowest-ranked units, or with round_to > 1 the fewest more that rounding allows (fewer
        only if the minimums forbid). ratio: that share of the units the model has now, likewise.
        macs: as many as it takes for the MACs per example to be at most
        1/macs of what they were when the Pruner was created (overshooting by at most one unit).
        """
        if sum(t is not None for t in (n, ratio, macs)) != 1:
            raise ValueError("give exactly one of n, ratio= or macs=")
        scores = self.scores()
        if ratio is not None:
            if not 0 <= ratio <= 1:
                raise ValueError(f"ratio must be between 0 and 1, not {ratio}")
            n = round(ratio * self.graph.num_units)
        elif macs is not None:
            n = self._units_for_macs(self.macs_at_start / macs, scores, macs)
        if n < 0:
            raise ValueError("n must be >= 0")
        if macs is None:  # (the MACs search counts rounding in already)
            n = self._rounded_count(n, scores)
        remove = self._select(n, scores)
        result = self._result(remove)
        if remove.any():
            result.check = self._remove(remove)
        result.macs_after = self._macs
        result.channels = {group.name: group.size for group in self.groups}
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

    def _rounded_count(self, n: int, scores: torch.Tensor) -> int:
        """How many units to take in rank order so that at least n go once rounding has kept
        multiples of round_to (n itself without rounding): rounding keeps more than it is asked
        to remove, so n small steps could otherwise remove nothing."""
        removed = lambda k: int(self._select(k, scores).sum())  # noqa: E731  (monotone in k)
        if self.round_to == 1 or removed(n) >= n:
            return n
        lo, hi = n, self.prunable()  # removed(lo) < n; the answer is the least k with removed(k) >= n
        if removed(hi) < n:
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if removed(mid) >= n else (mid, hi)
        return hi

    def _units_for_macs(self, target: float, scores: torch.Tensor, factor: float) -> int:
        """The fewest units, in rank order, whose removal brings the real MACs to `target` or below.

        graph.unit_cost() estimates the saving (it misses the cross terms of a layer that loses
        inputs and outputs at once), so its answer is only the first guess of a search on real MACs.
        """
        cost = self.graph.unit_cost()
        estimate = lambda k: self._macs - float(cost[self._select(k, scores)].sum())  # noqa: E731
        real: dict[int, int] = {0: self._macs}
        lo, hi = 0, self.prunable()  # invariant: real(lo) > target >= real(hi)
        if self._macs <= target:
            return 0
        real[hi] = self._macs_without(self._select(hi, scores))
        if real[hi] > target:
            raise ValueError(f"macs={factor} is out of reach: removing every unit the minimums allow leaves "
                             f"{self.macs_at_start / real[hi]:.2f}x fewer MACs; lower min_channels or unignore layers")
        offset, step = 0.0, 1  # offset: real - estimated MACs at the last count tried
        while hi - lo > 1:
            k = self._first_below(lambda k: estimate(k) + offset <= target, lo + 1, hi)
            if k >= hi:  # the estimate says hi: gallop down from it to find the boundary
                k, step = max(lo + 1, hi - step), step * 2
            real[k] = self._macs_without(self._select(k, scores))
            offset = real[k] - estimate(k)
            lo, hi = (lo, k) if real[k] <= target else (k, hi)
        return hi

    @staticmethod
    def _first_below(ok: Callable[[int], bool], lo: int, hi: int) -> int:
        """The smallest k in [lo, hi] with ok(k), by bisection (ok is monotone); hi if none."""
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
        return hi

    def _macs_without(self, remove: torch.Tensor) -> int:
        """Real MACs per example after removing `remove`: cut, count, and put the tensors back."""
        with removed(self.model, self.graph, remove):
            return self.macs()

    def _result(self, remove: torch.Tensor) -> PruneResult:
        removed: dict[str, list[int]] = {}
        for slot in self.graph.slots:
            if slot.role == "in":
                continue
            dropped = dropped_indices(slot.owner, remove)
            if dropped.any():
                removed[slot.name] = self._origin[slot.name][dropped].tolist()
        per_group = {g.name: int(remove[g.offset:g.offset + g.size].sum()) for g in self.groups}
        return PruneResult(removed, {k: v for k, v in per_group.items() if v}, macs_before=self._macs)

    # ---- removal and its check ----------------------------------------------------------------

    def _remove(self, remove: torch.Tensor) -> str:
        exact = all(slot.exact for slot in self.graph.slots if dropped_indices(slot.owner, remove).any())
        reference = self._zeroed_outputs(remove) if self.verify else None
        with removed(self.model, self.graph, remove) as trial:
            if reference is not None:
                self._check(reference, exact)
            trial.keep()
        for name, keep in trial.kept.items():
            self._origin[name] = self._origin[name][keep]
        self.graph.drop(remove)  # the structure is the same: no second trace
        self._ranked = None
        self._macs = self.macs()
        return "exact" if exact else "forward-only"

    def _zeroed_outputs(self, remove: torch.Tensor) -> list[torch.Tensor]:
        """The unpruned model's outputs with the removed channels zeroed where they are consumed."""
        handles = []
        for slot in self.graph.slots:
            keep = ~dropped_indices(slot.owner, remove)
            if slot.role != "in" or keep.all():
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
        with evaluating(self.model), preserved_state(self.model), torch.no_grad(), _full_precision():
            out = self.model(*self.example_inputs, **self.example_kwargs)
        flat: list[torch.Tensor] = []
        torch.utils._pytree.tree_map(lambda x: flat.append(x) if isinstance(x, torch.Tensor) else None, out)
        return flat

    def _check(self, reference: list[torch.Tensor], exact: bool) -> None:
        try:
            outputs = self._outputs()
        except RuntimeError as err:
            raise GraphError(f"the pruned model no longer runs ({err}); the removal was undone") from err
        shapes = [tuple(o.shape) for o in outputs]
        if shapes != [tuple(r.shape) for r in reference]:
            raise GraphError(f"the pruned model's outputs have shapes {shapes}, the unpruned model's "
                             f"{[tuple(r.shape) for r in reference]}; the removal was undone")
        for ref, out in zip(reference, outputs) if exact else ():
            error = ((ref.double() - out.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)).item()
            if error > _tolerance(ref.dtype):
                raise GraphError(
                    f"the pruned model's output differs from the zeroed unpruned model (relative error {error:.2e}); "
                    "an op in this model changes meaning when channels are removed. The removal was undone; "
                    "use strict=True to find unmapped ops, or ignore= the layers around it."
                )


def _tolerance(dtype: torch.dtype) -> float:
    """Largest relative difference between a correct removal and its zeroed reference.

    Removing channels changes the order of each sum, so the two differ by rounding: ~1e-6 in
    float32 (with TF32 off, see _full_precision), but bf16 and fp16 keep 8 and 11 bits and every
    layer rounds to them, so allow 16 epsilons there. A wrong cut moves outputs by order 1.
    """
    return max(1e-3, 16 * torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


@contextlib.contextmanager
def _full_precision() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN convs (its 10-bit products differ by ~1e-3), then as it was."""
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn
