"""How important each removable unit is: the criteria of 1611.06440 and the usual baselines.

Every function returns one score per unit of a ChannelGraph (higher = more important; NaN = this
criterion cannot score that unit). Two kinds of criteria:

- weight criteria read the model's parameters: `l1`, `l2` (filter norms, Li et al.), `bn-scale`
  (|gamma| of the norms), `random`, and `taylor-weight` (|sum of w * dL/dw| over a filter,
  Molchanov et al. 2019) when gradients are at hand;
- data criteria need a pass over data (`accumulate`): `taylor` (1611.06440), `activation-mean`,
  `activation-std`, `apoz` (1 - average percentage of zeros, Hu et al.), and `taylor-weight`.

Activations are observed where channels are *consumed*: at the input of every conv or Linear that
would lose an input column. Zeroing a channel there is exactly what removing it does, so the
first-order Taylor term measured there is the change of the loss that removal causes.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .graph import ChannelGraph, Slot

WEIGHT_CRITERIA = ("l1", "l2", "bn-scale", "random", "taylor-weight")
DATA_CRITERIA = ("taylor", "activation-mean", "activation-std", "apoz", "taylor-weight")
CRITERIA = ("taylor", "taylor-weight", "l1", "l2", "activation-mean", "activation-std", "apoz", "bn-scale", "random")
COMBINE = ("mean", "sum", "max")
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


class _Combiner:
    """Merges the per-member scores of coupled layers (a residual sum's producers, say) into one."""

    def __init__(self, num_units: int, how: str) -> None:
        if how not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, not {how!r}")
        self.how = how
        self.total = torch.zeros(num_units, dtype=torch.float64)
        self.count = torch.zeros(num_units, dtype=torch.float64)
        self.largest = torch.full((num_units,), -torch.inf, dtype=torch.float64)

    def add(self, values: torch.Tensor, present: torch.Tensor) -> None:
        self.total += torch.where(present, values, 0.0)
        self.count += present.double()
        self.largest = torch.where(present, torch.maximum(self.largest, values), self.largest)

    def result(self) -> torch.Tensor:
        scores = {"sum": self.total, "mean": self.total / self.count, "max": self.largest}[self.how]
        return torch.where(self.count > 0, scores, torch.nan)


def _per_unit(slot: Slot, values: torch.Tensor, num_units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum a slot's per-index values into its units; also say which units the slot holds."""
    owned = slot.owner >= 0
    sums = torch.zeros(num_units, dtype=torch.float64)
    # Bookkeeping is on the CPU (slot.owner lives there); values may come from a GPU model.
    sums.index_add_(0, slot.owner[owned], values.detach().to("cpu", torch.float64)[owned])
    present = torch.zeros(num_units, dtype=torch.bool)
    present[slot.owner[owned]] = True
    return sums, present


def _rows(model: nn.Module, slot: Slot, names=("weight", "bias")) -> list[torch.Tensor]:
    module = model.get_submodule(slot.module)
    return [getattr(module, n).detach().flatten(1) if getattr(module, n).dim() > 1 else getattr(module, n).detach()[:, None]
            for n in names if getattr(module, n, None) is not None]


def weight_scores(name: str, model: nn.Module, graph: ChannelGraph, combine: str = "mean", seed: int = 0) -> torch.Tensor:
    """Scores of a weight criterion (`l1`, `l2`, `bn-scale`, `random`, `taylor-weight` from .grad)."""
    units = graph.num_units
    if name == "random":
        return torch.rand(units, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    merged = _Combiner(units, combine)
    for slot in graph.slots:
        if name in ("l1", "l2") and slot.role == "out":
            weight = _rows(model, slot, ("weight",))[0]
            per_index = weight.abs().sum(1) if name == "l1" else weight.pow(2).sum(1)
            sums, present = _per_unit(slot, per_index, units)
            merged.add(sums if name == "l1" else sums.sqrt(), present)
        elif name == "bn-scale" and slot.role == "channel" and isinstance(model.get_submodule(slot.module), _NORM_TYPES):
            gamma = model.get_submodule(slot.module).weight
            if gamma is not None:
                sums, present = _per_unit(slot, gamma.detach().abs(), units)
                merged.add(sums, present)
        elif name == "taylor-weight" and slot.role in ("out", "channel"):
            module = model.get_submodule(slot.module)
            params = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
            if any(p.grad is None for p in params):
                raise RuntimeError("taylor-weight needs gradients: call rank(loader, loss_fn) or run a backward pass first")
            product = sum((p.detach() * p.grad).flatten(1).sum(1) if p.dim() > 1 else p.detach() * p.grad for p in params)
            sums, present = _per_unit(slot, product, units)
            merged.add(sums.abs(), present)
    if name not in WEIGHT_CRITERIA:
        raise ValueError(f"{name!r} is not a weight criterion; weight criteria are {WEIGHT_CRITERIA}")
    return merged.result()


class _Consumed:
    """Hooks on every layer that consumes channels, recording what each criterion needs per batch."""

    def __init__(self, model: nn.Module, graph: ChannelGraph, gates: bool, stats: bool) -> None:
        self.graph, self.gates, self.want_stats = graph, gates, stats
        self.taps: list[tuple[Slot, torch.Tensor, int]] = []  # slot, gate, values per feature map
        self.stats: list[tuple[Slot, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        by_module = {s.module: s for s in graph.slots if s.role == "in" and bool((s.owner >= 0).any())}
        self.handles = [model.get_submodule(name).register_forward_pre_hook(self._hook(slot)) for name, slot in by_module.items()]

    def _hook(self, slot: Slot) -> Callable:
        channel_dim = -1 if slot.role == "in" and isinstance(self._module_of(slot), nn.Linear) else 1

        def hook(module, args):
            x = args[0]
            dim = channel_dim % x.dim()
            other = [d for d in range(1, x.dim()) if d != dim]
            per_map = x[0].numel() // x.shape[dim]
            z = x.detach()
            if self.want_stats:  # per example and feature map: mean, mean of squares, share of exact zeros
                self.stats.append((slot, z.mean(other), z.pow(2).mean(other), (z == 0).double().mean(other)) if other
                                  else (slot, z, z.pow(2), (z == 0).double()))
            if not self.gates:
                return None
            shape = [x.shape[0]] + [x.shape[d] if d == dim else 1 for d in range(1, x.dim())]
            gate = torch.ones(shape, dtype=x.dtype, device=x.device, requires_grad=True)
            self.taps.append((slot, gate, per_map))
            return (x * gate,) + tuple(args[1:])

        return hook

    def _module_of(self, slot: Slot) -> nn.Module:
        return self.graph.model.get_submodule(slot.module)

    def clear(self) -> None:
        self.taps, self.stats = [], []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def accumulate(
    model: nn.Module,
    graph: ChannelGraph,
    loader: Iterable,
    loss_fn: Callable,
    names: Iterable[str],
    combine: str = "mean",
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Score units with data criteria over a loader: forward (and backward) passes, no weight update.

    Each example counts once: per-batch sums are added up and divided by the number of examples,
    so a smaller last batch is weighted correctly. `loss_fn` must return the batch *mean* (as
    nn.CrossEntropyLoss does); gradients are rescaled by the batch size so that every example's
    Taylor term is the derivative of its own loss. `reduce`, if given, sums the accumulators
    across processes (see distributed use) before the scores are formed.
    """
    names = list(dict.fromkeys(names))
    unknown = set(names) - set(DATA_CRITERIA)
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not data criteria; data criteria are {DATA_CRITERIA}")
    units = graph.num_units
    need_gates = "taylor" in names
    weight_slots = [s for s in graph.slots if s.role in ("out", "channel")] if "taylor-weight" in names else []
    weight_params = [[p for p in (model.get_submodule(s.module).weight, getattr(model.get_submodule(s.module), "bias", None)) if p is not None]
                     for s in weight_slots]
    sums = {key: torch.zeros(units, dtype=torch.float64) for key in ("taylor", "mean", "square", "zeros", "count")}
    for i in range(len(weight_slots)):
        sums[f"tw{i}"] = torch.zeros(units, dtype=torch.float64)
    examples = torch.zeros(1, dtype=torch.float64)
    if device is None:  # batches go where the model is (was: always the CPU, which fails for a GPU model)
        first = next(model.parameters(), None)
        device = first.device if first is not None else "cpu"
    was_training = model.training
    model.eval()  # running statistics and dropout must not change while we only measure
    consumed = _Consumed(model, graph, gates=need_gates, stats=bool({"activation-mean", "activation-std", "apoz"} & set(names)))
    try:
        batches = tqdm(loader, desc="rank", total=max_batches or _len(loader), disable=not progress, leave=False)
        for index, (inputs, targets) in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            inputs, targets = inputs.to(device), targets.to(device)
            batch = inputs.shape[0]
            consumed.clear()
            with torch.set_grad_enabled(need_gates or bool(weight_slots)):
                loss = loss_fn(model(inputs), targets)
                wanted = [gate for _, gate, _ in consumed.taps] + [p for ps in weight_params for p in ps]
                grads = list(torch.autograd.grad(loss * batch, wanted, allow_unused=True)) if wanted else []
            per_example = torch.zeros(batch, units, dtype=torch.float64)
            for (slot, _, per_map), grad in zip(consumed.taps, grads):
                if grad is None:  # a consumer the loss does not depend on (an unused branch)
                    continue
                owned = slot.owner >= 0
                # grad of the gate = sum over the map of activation * gradient; / per_map -> the mean.
                # .cpu(): the accumulators and slot tensors are on the CPU, the model may be on a GPU.
                values = grad.detach().reshape(batch, -1).double().cpu()[:, owned] * (slot.spread[owned] / per_map)
                per_example.index_add_(1, slot.owner[owned], values)
            sums["taylor"] += per_example.abs().sum(0)
            for slot, mean, square, zeros in consumed.stats:
                owned = slot.owner >= 0
                weight = slot.spread[owned]
                for key, value in (("mean", mean), ("square", square), ("zeros", zeros)):
                    sums[key].index_add_(0, slot.owner[owned], (value.reshape(batch, -1).double().cpu()[:, owned] * weight).sum(0))
                sums["count"].index_add_(0, slot.owner[owned], weight * batch)
            offset = len(consumed.taps)
            for i, (slot, params) in enumerate(zip(weight_slots, weight_params)):
                param_grads = grads[offset:offset + len(params)]
                offset += len(params)
                # grads are of the summed loss; / batch gives the usual mean-loss gradient.
                product = sum((p.detach() * g / batch).flatten(1).sum(1) if p.dim() > 1 else p.detach() * g / batch
                              for p, g in zip(params, param_grads) if g is not None)
                if isinstance(product, torch.Tensor):
                    sums[f"tw{i}"] += _per_unit(slot, product, units)[0].abs() * batch
            examples += batch
    finally:
        consumed.remove()
        model.train(was_training)
    if reduce is not None:
        for key in sums:
            sums[key] = reduce(sums[key])
        examples = reduce(examples)
    if examples.item() == 0:
        raise ValueError("the loader gave no batches to rank with")
    count = torch.where(sums["count"] > 0, sums["count"], torch.nan)
    mean = sums["mean"] / count
    results = {
        "taylor": sums["taylor"] / examples,
        "activation-mean": mean,
        "activation-std": (sums["square"] / count - mean.pow(2)).clamp_min(0).sqrt(),
        "apoz": 1.0 - sums["zeros"] / count,
    }
    if weight_slots:
        merged = _Combiner(units, combine)
        for i, slot in enumerate(weight_slots):
            merged.add(sums[f"tw{i}"] / examples, _per_unit(slot, torch.zeros(len(slot.owner)), units)[1])
        results["taylor-weight"] = merged.result()
    return {name: results[name] for name in names}


def _len(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def normalize_per_group(scores: torch.Tensor, graph: ChannelGraph) -> torch.Tensor:
    """Divide each group's scores by their L2 norm (1611.06440, eq. 9), so layers compare globally."""
    out = scores.clone()
    for group in graph.groups:
        part = out[group.offset:group.offset + group.size]
        norm = part[~part.isnan()].pow(2).sum().sqrt()
        if norm > 0:
            out[group.offset:group.offset + group.size] = part / norm
    return out
