"""How well each criterion agrees with the oracle (1611.06440, Table 1): Spearman correlation in
the paper's three scopes, the share of the oracle's lowest units each criterion finds, and the
study's files (criteria.json, criteria.md, criteria.png). The oracle itself is in oracle.py.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from . import criteria as crit
from .graph import ChannelGraph, Group
from .oracle import oracle
from .utils import atomic_path, atomic_write

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


def study_result(truth: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], graph: ChannelGraph,
                 conv: list[Group], share: float = 0.1) -> dict:
    """The criteria.json content from the oracle's output (`truth`) and each criterion's raw scores.

    "spearman" and "oracle_lowest_share" cover all units; the "_conv" keys only the units of `conv`,
    the conv feature maps of the paper's Table 1 (hidden Linear units, often dead after ReLU, are easy to rank).
    """
    spearman, lowest = _agreement(scores, truth["abs"], graph, graph.groups, share)
    spearman_conv, lowest_conv = _agreement(scores, truth["abs"], graph, conv, share)
    return {
        "spearman": spearman,
        "spearman_conv": spearman_conv,
        "oracle_lowest_share": lowest,
        "oracle_lowest_share_conv": lowest_conv,
        "lowest_share_of_units": share,
        "units": graph.num_units,
        "conv_units": sum(g.size for g in conv),
        "oracle_zero_units": int((truth["abs"] == 0).sum()),
        "oracle_negative_units": int((truth["loss"] < 0).sum()),
        "base_loss": float(truth["base"]),
        "groups": {g.name: g.size for g in graph.groups},
    }


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
    """The oracle, every criterion on the same data, and their agreement (`study_result`), with the
    number of images and the time each part took."""
    start = time.perf_counter()
    loader = list(loader)  # read (and decode) the images once for the oracle and the criteria
    graph = ChannelGraph(model, loader[0][0][:1])
    t0 = time.perf_counter()
    truth = oracle(model, graph, loader, loss_fn, device=device, progress=progress)
    oracle_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = all_scores(model, graph, loader, names, loss_fn, device=device, seed=seed, progress=progress)
    criteria_s = time.perf_counter() - t0
    return {
        **study_result(truth, scores, graph, conv_groups(model, graph), share),
        "images": sum(len(targets) for _, targets in loader),
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
    from matplotlib.figure import Figure  # here: the study is run rarely, matplotlib imports slowly

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
    """Write out/criteria.json, out/criteria.md and out/criteria.png atomically; returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "criteria.json", "markdown": out / "criteria.md", "plot": out / "criteria.png"}
    with atomic_path(paths["plot"]) as tmp:
        study_plot(result).savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    atomic_write(paths["markdown"], study_markdown(result))
    atomic_write(paths["json"], json.dumps(result, indent=2))  # the JSON last: a new one means the whole study is new
    return paths
