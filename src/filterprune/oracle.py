"""The oracle ranking of 1611.06440 and how well each criterion agrees with it (the paper's Table 1).

The oracle removes each unit alone and measures the change of the mean loss on held-out data:
oracle-loss = C(W') - C(W) and oracle-abs = |C(W') - C(W)|. Removing a unit is the same as zeroing
its channel at the input of every layer that consumes it (the graph's "in" slots it owns), so that
is what is done here, without any surgery.

One model evaluation per unit would be thousands of forward passes. Instead, for each group the
part of the network that no ablation can change (the prefix) runs once, and the rest (the suffix,
everything downstream of the group's consumers) runs on K ablated copies at a time, stacked along
the batch dimension: copy k has unit k zeroed. The model is traced with torch.fx, so this works
for any network the channel graph handles, residual and concatenating ones included.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import fx, nn
from tqdm.auto import tqdm

from . import criteria as crit
from .graph import ChannelGraph, Group

SCOPES = ("per_layer", "global", "global_l2")
SCOPE_NAMES = {"per_layer": "per layer", "global": "all layers, no norm", "global_l2": "all layers, L2 norm"}
# 1611.06440 Table 1 (VGG-16 on Birds-200, conv feature maps only), keyed by our criterion names;
# the paper's "weight" is the mean of w^2 of a kernel, which ranks like l2 within a layer.
PAPER_TABLE1 = {
    "mutual information": {"per_layer": 0.28, "global": 0.35, "global_l2": 0.47},
    "l2": {"per_layer": 0.27, "global": 0.34, "global_l2": 0.33},
    "activation-mean": {"per_layer": 0.56, "global": 0.35, "global_l2": 0.64},
    "activation-std": {"per_layer": 0.57, "global": 0.30, "global_l2": 0.66},
    "taylor": {"per_layer": 0.73, "global": 0.14, "global_l2": 0.73},
}
PAPER_LABELS = {"mutual information": "MI", "l2": "weight (l2)", "activation-mean": "act. mean",
                "activation-std": "act. std", "taylor": "Taylor"}


# ---- the oracle --------------------------------------------------------------------------------


class _Plan:
    """What to run once (prefix) and per ablation chunk (suffix) for one group."""

    def __init__(self, prefix: list[fx.Node], suffix: list[fx.Node], frontier: set[fx.Node],
                 owners: dict[str, tuple[torch.Tensor, int]], width: int) -> None:
        self.prefix, self.suffix, self.frontier = prefix, suffix, frontier
        self.owners = owners  # consumer module -> (unit of each input index, channel dim)
        self.width = width  # largest per-example size of a stacked activation, to size the chunks
        last_use: dict[fx.Node, int] = {}
        for i, node in enumerate(suffix):
            for source in node.all_input_nodes:
                last_use[source] = i
        # Values freed after each suffix node, so a chunk holds only live activations.
        self.free_after = [[n for n in node.all_input_nodes if last_use[n] == i] for i, node in enumerate(suffix)]


class _Traced:
    """The model as an fx graph that can be run node by node, with per-node facts from one real run."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        self.model = model
        # Traced in eval mode: the oracle measures the deployed network (no dropout, running BN stats).
        self.graph = fx.Tracer().trace(model)
        self.nodes = list(self.graph.nodes)
        self.order = {node: i for i, node in enumerate(self.nodes)}
        env = self.run(self.nodes, example[:1])
        self.batched = self._data_dependent()
        self.is_tensor = {n: isinstance(v, torch.Tensor) for n, v in env.items()}
        self.per_example = {n: v.numel() for n, v in env.items() if isinstance(v, torch.Tensor) and n in self.batched}

    def _data_dependent(self) -> set[fx.Node]:
        found: set[fx.Node] = set()
        for node in self.nodes:
            if node.op == "placeholder" or any(n in found for n in node.all_input_nodes):
                found.add(node)
        return found

    def evaluate(self, node: fx.Node, env: dict, inputs: torch.Tensor, read: Callable[[fx.Node], object] | None = None):
        read = read or env.__getitem__
        if node.op == "placeholder":
            return inputs if node is self.nodes[0] else (node.args[0] if node.args else None)
        args = fx.node.map_arg(node.args, read)
        kwargs = fx.node.map_arg(node.kwargs, read)
        if node.op == "get_attr":
            obj = self.model
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        if node.op == "call_module":
            return self.model.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return args[0]  # output

    def run(self, nodes: list[fx.Node], inputs: torch.Tensor, keep: set[fx.Node] | None = None) -> dict:
        """Evaluate `nodes` in order; with `keep`, values outside it are freed once no later node reads them."""
        last_use = {source: i for i, node in enumerate(nodes) for source in node.all_input_nodes}
        env: dict[fx.Node, object] = {}
        for i, node in enumerate(nodes):
            env[node] = self.evaluate(node, env, inputs)
            if keep is not None:
                for source in node.all_input_nodes:
                    if last_use[source] == i and source not in keep:
                        env.pop(source, None)
        return env

    def plan(self, graph: ChannelGraph, group: Group) -> _Plan | None:
        """Split the graph for `group`; None if no layer consumes its channels (removal changes nothing)."""
        units = range(group.offset, group.offset + group.size)
        owners = {}
        for slot in graph.slots:
            in_group = (slot.owner >= units.start) & (slot.owner < units.stop)
            if slot.role == "in" and bool(in_group.any()):
                linear = isinstance(self.model.get_submodule(slot.module), nn.Linear)
                owners[slot.module] = (torch.where(in_group, slot.owner, -1), -1 if linear else 1)
        consumers = {n for n in self.nodes if n.op == "call_module" and n.target in owners}
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
        ordered = sorted(suffix, key=self.order.get)
        frontier = {n for node in ordered for n in node.all_input_nodes if n not in suffix}
        needed = set(frontier)
        for node in reversed(self.nodes):
            if node in needed:
                needed.update(node.all_input_nodes)
        prefix = [n for n in self.nodes if n in needed]
        width = max((self.per_example.get(n, 0) for n in [*ordered, *frontier]), default=1)
        return _Plan(prefix, ordered, frontier, owners, max(width, 1))


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


def _consumed(traced: _Traced, plan: _Plan, node: fx.Node, env: dict, read: Callable, prefix: dict,
              ablated: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """A consumer's output for every copy: its input with the copy's unit zeroed."""
    owner, dim = plan.owners[node.target]
    module = traced.model.get_submodule(node.target)
    source = node.args[0]
    if isinstance(module, nn.Linear) and source in plan.frontier and len(node.args) == 1 and not node.kwargs:
        return _linear_without_units(module, prefix[source], owner, ablated)
    x = _mask_input(read(source), owner[None, :] != ablated[:, None], len(ablated), dim)
    return traced.evaluate(node, env, inputs, lambda n: x if n is source else read(n))


def _chunk_losses(traced: _Traced, plan: _Plan, prefix: dict, inputs: torch.Tensor, targets: torch.Tensor,
                  units: torch.Tensor, loss_fn: Callable) -> torch.Tensor:
    """Summed loss over the batch for an unablated copy followed by one copy per unit in `units`."""
    ablated = torch.cat([torch.tensor([-2]), units])  # -2 owns nothing: copy 0 is the unablated reference
    copies, batch = len(ablated), inputs.shape[0]
    env: dict[fx.Node, object] = {}

    def read(node: fx.Node):
        if node not in env:  # a prefix value: stacked once per chunk, freed after its last use
            value = prefix[node]
            stack = node in traced.batched and isinstance(value, torch.Tensor)
            env[node] = torch.cat([value] * copies) if stack else value  # cat keeps channels-last
        return env[node]

    for node, free in zip(plan.suffix, plan.free_after):
        if node.op == "call_module" and node.target in plan.owners:
            env[node] = _consumed(traced, plan, node, env, read, prefix, ablated, inputs)
        else:
            env[node] = traced.evaluate(node, env, inputs, read)
        for done in free:
            env.pop(done, None)
    if plan.suffix[-1].op != "output":
        raise RuntimeError("the oracle needs every group's consumers to reach the model's output")
    out = env[plan.suffix[-1]]
    targets = targets.to(out.device)
    # One vmapped call, not one per copy: thousands of tiny calls cost more than the copies' passes.
    per_copy = torch.func.vmap(lambda o: loss_fn(o, targets))(out.reshape(copies, batch, *out.shape[1:]))
    return per_copy.double().cpu() * batch


def _ablate_group(traced: _Traced, plan: _Plan, group: Group, inputs: torch.Tensor, targets: torch.Tensor,
                  loss_fn: Callable, budget: int, total: torch.Tensor, bar) -> None:
    """Add each unit's summed loss change on this batch to `total`, a chunk of units per pass."""
    prefix = traced.run(plan.prefix, inputs, keep=plan.frontier)
    chunk = max(1, min(group.size, budget // (inputs.shape[0] * plan.width) - 1))
    end = group.offset + group.size
    for start in range(group.offset, end, chunk):
        units = torch.arange(start, min(start + chunk, end))
        losses = _chunk_losses(traced, plan, prefix, inputs, targets, units, loss_fn)
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


# ---- agreement with the oracle -----------------------------------------------------------------


def _units_of(groups: list[Group]) -> torch.Tensor:
    return torch.cat([torch.arange(g.offset, g.offset + g.size) for g in groups]) if groups else torch.zeros(0, dtype=torch.long)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if len(a) < 3 or bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return None  # undefined for constant rankings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = spearmanr(a.numpy(), b.numpy()).statistic
    return None if math.isnan(r) else float(r)


def spearman_scopes(scores: torch.Tensor, oracle_abs: torch.Tensor, graph: ChannelGraph,
                    groups: list[Group] | None = None) -> dict[str, float | None]:
    """Spearman correlation of `scores` with the oracle in the paper's three scopes.

    per_layer: within each group, averaged over groups; global: all units of `groups` (default all)
    with raw scores; global_l2: the same after per-group L2 normalisation (1611.06440, eq. 9).
    Units a criterion cannot score (NaN) are left out; None where nothing is left.
    """
    groups = graph.groups if groups is None else groups
    normalised = crit.normalize_per_group(scores, graph)
    index = _units_of(groups)
    valid = index[~scores[index].isnan()]
    per_layer = []
    for g in groups:
        units = _units_of([g])
        units = units[~scores[units].isnan()]
        r = _spearman(scores[units], oracle_abs[units])
        if r is not None:
            per_layer.append(r)
    return {
        "per_layer": sum(per_layer) / len(per_layer) if per_layer else None,
        "global": _spearman(scores[valid], oracle_abs[valid]),
        "global_l2": _spearman(normalised[valid], oracle_abs[valid]),
    }


def lowest_share(scores: torch.Tensor, oracle_abs: torch.Tensor, share: float = 0.1,
                 units: torch.Tensor | None = None) -> float | None:
    """How many of the criterion's k lowest units are among the oracle's k lowest (k = `share` of the
    `units`, default all, that the criterion scores). A unit tied with the oracle's k-th lowest
    counts as among them: many units change the loss by exactly 0. Random choice finds ~share."""
    units = torch.arange(len(scores)) if units is None else units
    valid = units[~scores[units].isnan()]
    if len(valid) == 0:
        return None
    k = max(1, round(share * len(valid)))
    ours = valid[torch.argsort(scores[valid], stable=True)[:k]]
    threshold = oracle_abs[valid].sort().values[k - 1]
    return int((oracle_abs[ours] <= threshold).sum()) / k


def conv_groups(model: nn.Module, graph: ChannelGraph) -> list[Group]:
    """Groups produced by a conv layer: the feature maps the paper's Table 1 is about."""
    def is_conv(member: str) -> bool:
        name, role = member.rsplit(":", 1)
        return role == "out" and isinstance(model.get_submodule(name), nn.modules.conv._ConvNd)

    return [g for g in graph.groups if any(is_conv(m) for m in g.members)]


def all_scores(model: nn.Module, graph: ChannelGraph, loader: Iterable, names: Iterable[str] = crit.CRITERIA,
               loss_fn: Callable = F.cross_entropy, device=None, seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """Every criterion's raw scores: data criteria in one pass over `loader`, the rest from the weights."""
    names = list(names)
    data_names = [n for n in names if n in crit.DATA_CRITERIA]
    scores = crit.accumulate(model, graph, loader, loss_fn, data_names, device=device, progress=progress) if data_names else {}
    for name in names:
        if name not in scores:
            scores[name] = crit.weight_scores(name, model, graph, seed=seed)
    return {name: scores[name] for name in names}


def _agreement(scores: dict[str, torch.Tensor], oracle_abs: torch.Tensor, graph: ChannelGraph, groups: list[Group],
               share: float) -> tuple[dict, dict]:
    """Spearman in the three scopes, and the lowest-k share ranking globally without and with L2
    normalisation, of every criterion over the units of `groups`."""
    units = _units_of(groups)
    spearman = {n: spearman_scopes(s, oracle_abs, graph, groups) for n, s in scores.items()}
    lowest = {n: {"global": lowest_share(s, oracle_abs, share, units),
                  "global_l2": lowest_share(crit.normalize_per_group(s, graph), oracle_abs, share, units)}
              for n, s in scores.items()}
    return spearman, lowest


def run_study(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable = F.cross_entropy,
    names: Iterable[str] = crit.CRITERIA,
    device=None,
    seed: int = 0,
    share: float = 0.1,
    progress: bool = True,
) -> dict:
    """The oracle, every criterion on the same data, and their agreement; the criteria.json content.

    "spearman" and "oracle_lowest_share" cover all units; the "_conv" keys only conv feature maps,
    the units of the paper's Table 1 (hidden Linear units, often dead after ReLU, are easy to rank).
    """
    start = time.perf_counter()
    loader = list(loader)  # read (and decode) the images once for the oracle and the criteria
    graph = ChannelGraph(model, loader[0][0][:1])
    t0 = time.perf_counter()
    truth = oracle(model, graph, loader, loss_fn, device=device, progress=progress)
    oracle_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = all_scores(model, graph, loader, names, loss_fn, device=device, seed=seed, progress=progress)
    criteria_s = time.perf_counter() - t0
    convs = conv_groups(model, graph)
    spearman, lowest = _agreement(scores, truth["abs"], graph, graph.groups, share)
    spearman_conv, lowest_conv = _agreement(scores, truth["abs"], graph, convs, share)
    return {
        "spearman": spearman,
        "spearman_conv": spearman_conv,
        "oracle_lowest_share": lowest,
        "oracle_lowest_share_conv": lowest_conv,
        "lowest_share_of_units": share,
        "units": graph.num_units,
        "conv_units": sum(g.size for g in convs),
        "oracle_zero_units": int((truth["abs"] == 0).sum()),
        "oracle_negative_units": int((truth["loss"] < 0).sum()),
        "images": sum(len(targets) for _, targets in loader),
        "base_loss": float(truth["base"]),
        "groups": {g.name: g.size for g in graph.groups},
        "oracle_s": round(oracle_s, 1),
        "criteria_s": round(criteria_s, 1),
        "wall_s": round(time.perf_counter() - start, 1),
    }


# ---- the report --------------------------------------------------------------------------------


def _cell(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _rows(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])


def study_table(result: dict, key: str = "spearman") -> str:
    """Table 1 of the paper for this run: one row per scope, one column per criterion."""
    names = list(result[key])
    return _rows(["ranking scope", *names], [[SCOPE_NAMES[s], *(_cell(result[key][n][s]) for n in names)] for s in SCOPES])


def _paper_table(result: dict) -> str:
    names = list(PAPER_TABLE1)
    return _rows(["ranking scope", *(PAPER_LABELS[n] for n in names)],
                 [[SCOPE_NAMES[s], *(f"{PAPER_TABLE1[n][s]:.2f} / {_cell(result['spearman_conv'].get(n, {}).get(s))}" for n in names)]
                  for s in SCOPES])


def _lowest_table(result: dict) -> str:
    conv, everything = result["oracle_lowest_share_conv"], result["oracle_lowest_share"]
    return _rows(["criterion", "conv maps, raw", "conv maps, L2 norm", "all units, raw", "all units, L2 norm"],
                 [[n, _cell(conv[n]["global"]), _cell(conv[n]["global_l2"]), _cell(everything[n]["global"]),
                   _cell(everything[n]["global_l2"])] for n in everything])


def study_markdown(result: dict) -> str:
    """criteria.md: Table 1 for conv maps (beside the paper's) and for all units, and the lowest-k overlap."""
    share = 100 * result["lowest_share_of_units"]
    return "\n\n".join([
        "# Criteria against the oracle (1611.06440, Table 1)",
        f"Spearman rank correlation of each criterion with oracle-abs (|C(W') - C(W)| when one unit is removed), on "
        f"{result['images']} held-out images (mean loss {result['base_loss']:.4f}); {result['units']} units, "
        f"{result['conv_units']} of them conv feature maps. Removing {result['oracle_zero_units']} units changes the loss "
        f"by exactly 0 (dead after ReLU); removing {result['oracle_negative_units']} lowers it. Oracle "
        f"{result['oracle_s']:.0f} s, criteria {result['criteria_s']:.0f} s, all {result['wall_s']:.0f} s.",
        "`random` is the floor. With L2 normalisation it is not 0: dividing by a layer's norm scales its scores by "
        "about 1/sqrt(layer size), and the oracle's values shrink in larger layers too.",
        "## Conv feature maps (the paper's setting)\n\n" + study_table(result, "spearman_conv"),
        "Beside the paper (paper / this run); the paper: VGG-16 fine-tuned on Birds-200. Its \"weight\" criterion is "
        "the mean of w^2 per kernel; filterprune has no mutual-information criterion.\n\n" + _paper_table(result),
        "## All units (hidden Linear units included)\n\n" + study_table(result),
        f"## The oracle's lowest {share:.0f}%\n\nOf each criterion's k lowest units when ranking all layers together "
        f"(k = {share:.0f}% of the units it scores), the share that are among the oracle's k lowest (ties with the "
        f"k-th included). Random choice finds about {share / 100:.2f} where few units tie, and more where many change the "
        "loss by exactly 0.\n\n" + _lowest_table(result),
    ]) + "\n"


def study_plot(result: dict):
    """Grouped bars, conv maps and all units: one group per criterion, one bar per scope; the paper as ticks."""
    from matplotlib.figure import Figure

    names = list(result["spearman"])
    fig = Figure(figsize=(max(7.0, 0.9 * len(names) + 2), 7.6), layout="constrained")
    width = 0.8 / len(SCOPES)
    panels = [("spearman_conv", f"conv feature maps ({result['conv_units']})"), ("spearman", f"all units ({result['units']})")]
    for ax, (key, title) in zip(fig.subplots(2, 1, sharex=True), panels):
        for i, scope in enumerate(SCOPES):
            xs = [j + (i - 1) * width for j in range(len(names))]
            ax.bar(xs, [result[key][n][scope] or 0.0 for n in names], width, label=SCOPE_NAMES[scope])
            if key == "spearman_conv":
                paper = [(x, PAPER_TABLE1[n][scope]) for x, n in zip(xs, names) if n in PAPER_TABLE1]
                ax.plot([x for x, _ in paper], [v for _, v in paper], "k_", markersize=12, markeredgewidth=2,
                        label="paper (VGG-16, Birds-200)" if i == 0 else None)
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set(ylabel="Spearman with oracle-abs", ylim=(min(-0.2, ax.get_ylim()[0]), 1.0), title=title)
        ax.grid(axis="y", alpha=0.3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    fig.axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle(f"Criteria against the oracle on {result['images']} held-out images")
    return fig


def write_study(result: dict, out: str | Path) -> dict[str, Path]:
    """Write out/criteria.json, out/criteria.md and out/criteria.png; returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "criteria.json", "markdown": out / "criteria.md", "plot": out / "criteria.png"}
    study_plot(result).savefig(paths["plot"], dpi=110, bbox_inches="tight")
    paths["markdown"].write_text(study_markdown(result))
    paths["json"].write_text(json.dumps(result, indent=2))
    return paths
