"""Recovery tools chosen by evidence: before a planned run prunes for real, its first step is tried
with each tool switched, on a copy of the network, with the same seed and a short fine-tune, and
scored on the validation images. A tool is taken only when it beats the setting it would replace by
more than a margin, at least the validation images' noise (schedule.accuracy_noise): on 1000 images
two short trials differ by a point and more by chance, and the default costs nothing.

The tools: how layers' scores are normalised before the global ranking ("mean" or the paper's
"l2"), whether hidden Linear layers of the head are pruned with the filters or kept, and
distillation from the unpruned network while fine-tuning (Hinton et al. 2015). Each is tried
against the choices made before it, in that order (one at a time, not every combination: four
short trials instead of eight).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable

from torch import nn

from .schedule import Schedule, check_reachable

DISTILL = 0.5  # the weight tried when distillation is off (the usual even mix of hard and soft labels)


@dataclass(frozen=True)
class Setting:
    """What a trial of the first step runs with: the schedule's recovery fields and the modules never pruned."""

    schedule: Schedule
    ignore: tuple[str, ...]

    def used(self, model: nn.Module) -> dict:
        """The tools as the report states them."""
        hidden = _hidden_linear(model)
        head = "no hidden Linear layers" if not hidden else "kept" if set(hidden) <= set(self.ignore) else "pruned"
        return {"normalize": self.schedule.normalize, "head": head, "distill": self.schedule.distill}


@dataclass(frozen=True)
class Switch:
    """One tool to try: `label` says what is tried, `apply` makes the setting that tries it; `reshapes`:
    whether it changes which channels the step removes (distillation does not: the same network,
    timed again, differs only by noise)."""

    tool: str
    label: str
    apply: Callable[[Setting], Setting]
    reshapes: bool = True


def switches(model: nn.Module, example_inputs, setting: Setting, fixed: Iterable[str] = ()) -> tuple[list[Switch], list[dict]]:
    """The tools worth trying on `model` from `setting`, and the ones left out, with why (as log rows).
    `fixed`: modules the user asked never to prune, which no trial prunes."""
    schedule, found, left_out = setting.schedule, [], []
    other = "l2" if schedule.normalize != "l2" else "mean"
    found.append(Switch("normalize", f"normalize {other} (not {schedule.normalize})",
                        lambda s: replace(s, schedule=replace(s.schedule, normalize=other))))
    fixed = set(fixed)
    hidden = [name for name in _hidden_linear(model) if name not in fixed]
    if not hidden:
        left_out.append({"tool": "head", "why": "no hidden Linear layer that may be pruned (an output layer never is, nor an "
                                                "ignored one): nothing to choose"})
    else:
        kept = set(hidden) <= set(setting.ignore)
        ignore = tuple(n for n in setting.ignore if n not in hidden) if kept else tuple(sorted({*setting.ignore, *hidden}))
        try:  # a head kept may leave a size target out of reach: then it is no choice
            check_reachable(model, example_inputs, schedule, ignore)
            found.append(Switch("head", f"head {'pruned' if kept else 'kept'} ({', '.join(hidden)})",
                                lambda s: replace(s, ignore=ignore)))
        except ValueError as err:
            left_out.append({"tool": "head", "why": f"the head {'pruned' if kept else 'kept'} cannot reach the targets: {err}"})
    weight = DISTILL if schedule.distill == 0 else 0.0
    found.append(Switch("distill", f"distill {weight:g} (not {schedule.distill:g})",
                        lambda s: replace(s, schedule=replace(s.schedule, distill=weight)), reshapes=False))
    return found, left_out


def choose(setting: Setting, candidates: Iterable[Switch], trial: Callable[[Setting], tuple[float, dict]], margin: float,
           deadline: float | None = None, clock: Callable[[], float] | None = None) -> tuple[Setting, list[dict], list[str]]:
    """Try the first step with `setting`, then with each switch on top of the best so far.

    trial(setting) -> (validation score 0-1, reached: {target: factor the step reached}, for the
    targets set, e.g. {"speed": 1.7, "size": 2.1}). A switch is used when it beats the best
    score by more than `margin` points, or when it changes the network (Switch.reshapes), is no
    worse, and gets the step closer to the targets: 15% further on one and not 15% behind on any
    (one network timed twice in turns on a loaded machine differed by 12%). (A head pruned with
    the filters costs few MACs but much latency at batch 1 and size: at the same MACs the two
    settings reach different speed-ups.) Gains are compared at 0.01-point resolution, so that
    float error cannot tip a tie.

    Returns (the chosen setting, one row per trial, what the deadline left untried). A trial whose
    expected time (the first trial's) would end past `deadline` is not started."""
    rows, gave_up = [], []
    start = clock() if clock else 0.0
    best, reached = trial(setting)
    cost = (clock() - start) if clock else 0.0
    rows.append({"tool": "defaults", "tried": "as given", "score": best, "reached": reached, "outcome": "the reference"})
    for switch in candidates:
        if deadline is not None and clock and clock() + cost > deadline:
            gave_up.append(f"choosing {switch.tool}: its trial (about {cost:.0f} s) would pass the budget's share for choosing tools")
            continue
        tried = switch.apply(setting)
        score, further = trial(tried)
        gain = round(100 * (score - best), 2)
        row = {"tool": switch.tool, "tried": switch.label, "score": score, "against": best, "reached": further}
        said = (f"{gain:+.2f} points on validation (needs more than +{margin:.2f}"
                + (", or at least level and 15% closer to the targets" if switch.reshapes else "; it leaves the network as it is"))
        used = gain > margin or (switch.reshapes and gain >= 0 and _closer(further, reached))
        row["outcome"] = f"{'used' if used else 'not used'}: {said}; reached {_reach(further)} against {_reach(reached)})"
        if used:
            setting, best, reached = tried, score, further
        rows.append(row)
    return setting, rows, gave_up


def _closer(reached: dict, than: dict, noise: float = 1.15) -> bool:
    return any(reached[k] > noise * than[k] for k in than) and all(reached[k] * noise >= than[k] for k in than)


def _reach(reached: dict) -> str:
    return ", ".join(f"{k} {v:.2f}x" for k, v in reached.items()) or "no target left"


def _hidden_linear(model: nn.Module) -> list[str]:
    """Names of the Linear layers before the last one (taken as the output, which is never pruned)."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return linear[:-1]
