"""A pruning loop that plans its own steps and recovery from the targets (no step sizes or epochs).

Each step asks for a MACs reduction: the first plan.first_step, later ones what the unmet targets
still need (estimated from how each target has fallen with MACs so far), never more than the last
step that held. After each step the network is fine-tuned until the validation score stops
improving (early stopping, once it is within the accuracy limit: short of it, the whole cosine;
the learning rate's cosine restarts at every step) and keeps its best epoch. A step that cannot
recover to within max_accuracy_drop of the control is rolled back and retried at the square root
of its size; once that falls below plan.min_step the plan ends. The control is the unpruned network
fine-tuned alongside, an epoch of it after each of the pruned network's (control.py): it tells what
the epochs alone give, and an unconverged baseline's gain from them is not spent as accuracy budget.
The final fine-tune runs in cosine cycles, each twice as long as the last, until one no longer
beats the best score (_final_fine_tune). Before the first step, the recovery tools (normalisation,
the head pruned or kept, distillation, whose teacher is the control) are chosen on validation by
short trials of that step (recovery.py). A time budget is shared out between those trials, the steps and the final
fine-tune (the control's epochs inside them), and whatever it cut is listed in log["gave_up"].
Speed is judged by each step's speed-up timed in turns beside the unpruned network
(_time_in_turns), and a met speed target is timed again before the plan stops on it.

Stopping is schedule.decide's, with every target required (not the first one met).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable

import torch
from torch import nn

from .control import Control
from .distributed import Context
from .measure import deployment_batch, in_turns, keep_lowest, profile
from .recovery import Setting, choose, switches
from .schedule import (Schedule, Verdict, _line, _measure, _option, _prune_step, _pruner, _seed, _to, accuracy_drop, accuracy_noise,
                       check_reachable, decide, least_speedup, timed, within_drop)
from .train import evaluate, fine_tune_to_plateau, make_optimizer, train_epoch
from .utils import evaluating

# Shares of a time budget, as the deadlines of each phase from the start: choosing the recovery
# tools, then the steps; the final fine-tune gets the rest. The control's epochs run inside the
# steps' and the final fine-tune's, so it costs them time rather than having a share of its own.
_CHOOSE_UNTIL, _STEPS_UNTIL = 0.1, 0.6


@dataclass
class Plan:
    """How prune_auto plans: early stopping of each fine-tune, step sizes, the time budget, the control."""

    patience: int = _option(3, "epochs without a better validation score before a step's fine-tuning stops")
    max_epochs: int = _option(10, "most fine-tuning epochs after a step")
    final_cycle: int = _option(8, "epochs of the final fine-tune's first cosine cycle; each next one is twice as long, run "
                                  "while the last beat the best validation score")
    final_max_epochs: int = _option(24, "most epochs of the final fine-tune")
    first_step: float = _option(1.8, "MACs reduction of the first planned step (later: what the targets need, at most the last "
                                     "step that held)")
    min_step: float = _option(1.05, "the smallest step tried: when even a step this small loses too much, the plan ends")
    speed_margin: float = _option(1.1, "aim this many times beyond --target-speedup: timings during a run are noisy")
    speed_batches: tuple[int, ...] | None = _option(None, "batch sizes at which --target-speedup must hold as well as at "
                                                          "--latency-batch, e.g. 1,64")
    step_allowance: float | None = _option(None, "points a step may end below the control beyond --max-drop while pruning goes "
                                                 "on; the final network is held to --max-drop, else the plan goes back to the "
                                                 "last step within it (default: the validation images' noise, one standard "
                                                 "error of a difference of two accuracies on them)")
    budget_s: float | None = _option(None, "time for the whole planned run, e.g. 20m, 1.5h, 900s; the plan fits its "
                                           "fine-tuning into it and says what it gave up", flag="--budget")
    control: bool = _option(True, "also fine-tune the unpruned network alongside, epoch for epoch, and judge every step "
                                  "against it (off: against the baseline, and the control's time goes to pruning)")
    confirm_rounds: int = _option(10, "rounds of timing in turns that must confirm a speed target met before the plan stops "
                                      "on it (a stop at the first timing to pass the aim is biased to read high)")
    choose_recovery: bool = _option(True, "choose --normalize, the head pruned or kept, and --distill by trials of the first step "
                                          "on the validation images (off: use them as given)")
    trial_epochs: int = _option(2, "fine-tuning epochs of each trial that chooses the recovery tools")
    recovery_margin: float = _option(0.5, "validation points a recovery tool must gain over the setting it replaces to be used "
                                           "(and more than the validation images' noise, as --step-allowance's)")


def reported_plan(log: dict) -> dict:
    """The part of prune_auto's log that a report's "plan" section shows (report._plan)."""
    return {k: log[k] for k in ("plan", "gave_up", "seconds", "final_fine_tune", "recovery", "noise", "fell_back") if k in log}


@dataclass
class _Run:
    """What the planned loop's helpers share: the targets aimed at, the example inputs and device, the
    batches the speed target holds at, a copy of the unpruned network timed beside each step, the
    validation, and the log (log["baseline"]: the unpruned network's measures). aim becomes the recovery
    tools' choice once they are chosen."""

    aim: Schedule
    plan: Plan
    example: object
    device: str
    batches: tuple[int, ...]
    reference: nn.Module
    evaluate_fn: Callable[[nn.Module], dict]
    clock: Callable[[], float]
    log_fn: Callable[[str], None]
    log: dict

    def score(self, net: nn.Module) -> float:
        return self.evaluate_fn(net)[self.aim.metric]

    def measure(self, net: nn.Module) -> dict:
        """A log entry of `net`, not timed (time_in_turns times it)."""
        return _measure(net, self.example, self.evaluate_fn(net), self.aim, self.device, timing=False)

    def time_in_turns(self, entry: dict, net: nn.Module, rounds: int = 5) -> None:
        _time_in_turns(self.log["baseline"], entry, self.reference, net, self.example, self.aim, self.batches, self.device, rounds)

    def reached(self, net: nn.Module) -> dict[str, float]:
        """How far `net` has come towards the targets: {"macs", "speed", "size": factor}."""
        base, aim = self.log["baseline"], self.aim
        entry = {**profile(net, self.example, latency=False, device=self.device).as_dict(), "latency": []}  # timed only if needed
        reached = {}
        if aim.target_macs is not None:
            reached["macs"] = base["macs"] / entry["macs"]
        if aim.target_speedup is not None:
            self.time_in_turns(entry, net)
            reached["speed"] = least_speedup(base, entry, self.batches, aim.runtime)
        if aim.target_size is not None:
            reached["size"] = base["size_mb"] / entry["size_mb"]
        return reached

    def confirm_speed(self, entry: dict, net: nn.Module, judged_by: Schedule, attempt: int, against: float) -> Verdict:
        """The verdict once the step's speed-up is timed again, plan.confirm_rounds rounds in turns: the loop
        stops at the first step whose timing passes the aim, so that timing is the one most likely to have
        read high; the new rounds replace it (entry["first_speedup"] keeps it)."""
        base, rounds = self.log["baseline"], self.plan.confirm_rounds
        first = least_speedup(base, entry, self.batches, self.aim.runtime)
        entry["first_speedup"] = entry["speedup"]
        self.time_in_turns(entry, net, rounds=rounds)
        again = least_speedup(base, entry, self.batches, self.aim.runtime)
        confirmed = decide(judged_by, base, entry, attempt, every=True, against=against, batches=self.batches)
        self.log_fn(f"step {attempt}: {first:.2f}x timed again in {rounds} rounds: {again:.2f}x, "
                    + ("the targets hold" if confirmed.stop else f"short of the aim {self.aim.target_speedup:.2f}x: pruning goes on"))
        return confirmed

    def fall_back(self, model: nn.Module, held: tuple[nn.Module, int], tuner, bar: float, bar_name: str,
                  deadline: float | None) -> nn.Module:
        """The final network missed the accuracy limit after steps kept within the noise allowance: give
        the network of the last step within the limit itself (held: it and its number) a final fine-tune
        too (with `tuner`, without the control: its epochs are done), and return whichever of the two
        scores higher on validation. log["fell_back"] says what was tried and which was kept."""
        t, (net, step), log, metric = self.clock(), held, self.log, self.aim.metric
        missed = accuracy_drop(bar, log["final"][metric])
        self.log_fn(f"the final network is {missed:.2f} points below {bar_name} (limit {self.aim.max_accuracy_drop}): a final "
                    f"fine-tune of step {step}'s network, the last within the limit, to choose between the two")
        _seed(self.aim, 20_000, ())
        again = _final_fine_tune(net, tuner, lambda: self.score(net), self.plan, deadline, self.clock)
        tried = self.measure(net)
        used = tried[metric] > log["final"][metric]
        log["fell_back"] = {"step": step, "final_missed_by": round(missed, 2), "step_final_fine_tune": again, "score": tried[metric],
                            "instead_of": log["final"][metric], "used": used}
        log["seconds"]["fall_back"] = self.clock() - t
        self.log_fn(f"step {step}'s network after its final fine-tune: {metric} {100 * tried[metric]:.2f}%: "
                    + ("kept in place of the final network" if used else "no better: the final network stays"))
        if used:
            log["final"], log["final_fine_tune"] = tried, again
            return net
        return model


def prune_auto(
    model: nn.Module,
    example_inputs: torch.Tensor,
    train_loader: Iterable | None,
    val_loader: Iterable | None,
    schedule: Schedule,
    plan: Plan | None = None,
    *,
    loss_fn: Callable = nn.functional.cross_entropy,
    evaluate_fn: Callable[[nn.Module], dict] | None = None,
    trainer: Callable[[nn.Module, int], Callable[[int], object]] | None = None,
    rank_loader: Iterable | None = None,
    ignore: Iterable[str] = (),
    head_kept: Iterable[str] = (),
    device: str = "cpu",
    progress: bool = True,
    log_fn: Callable[[str], None] = print,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[nn.Module, dict, nn.Module | None]:
    """Prune `model` to schedule's targets (target_macs, target_speedup, target_size: all of those set)
    within schedule.max_accuracy_drop (of the control's validation score, with plan.control; else of
    the baseline's), planning the steps and fine-tuning by `plan`.

    Returns (pruned model, log, control): the log is prune_iteratively's (baseline, iterations, final,
    stopped, ...) plus each step's plan (asked_macs, curve: the validation score per epoch, why), the
    recovery tools' trials and choice (log["recovery"], with plan.choose_recovery) and seconds per
    phase; control is the fine-tuned unpruned network, or None. Of schedule, the recipe fields (step,
    macs_step, epochs, final_epochs, max_iterations) are not used. evaluate_fn(model) -> dict with
    schedule.metric (default: accuracy on val_loader, which should be validation images).
    ignore: names of modules never pruned; head_kept: names of a head's layers kept too, unless a
    recovery trial shows pruning them is better (the CLI: a VGG's hidden Linear layers, which the
    blog keeps). trainer(model, epochs) -> a function training one epoch (its argument: the epoch,
    from 1) of a fine-tune of at most `epochs` (default: train.train_epoch with a cosine learning
    rate over them).
    """
    plan = plan or Plan()
    if schedule.target_macs is None and schedule.target_speedup is None and schedule.target_size is None:
        raise ValueError("prune_auto plans from the targets: set target_macs, target_speedup or target_size")
    # The loop aims beyond a speed target (noisy timings); the recipe's count of iterations does not apply.
    aim = replace(schedule, max_iterations=None, latency_batch=schedule.latency_batch or deployment_batch(device),
                  target_speedup=schedule.target_speedup and schedule.target_speedup * plan.speed_margin)
    batches = tuple(dict.fromkeys((aim.latency_batch, *(plan.speed_batches or ()))))  # the speed target holds at each
    start, example, fixed = clock(), _to(example_inputs, device), list(ignore)
    ignore = fixed + [name for name in head_kept if name not in fixed]
    evaluate_fn = evaluate_fn or (lambda m: evaluate(m, val_loader, loss_fn, device=device, progress=False))
    check_reachable(model, example, aim, ignore)
    model.to(device)
    deadline = _deadlines(plan, start)
    pruner = _pruner(model, example, aim, ignore)
    first = evaluate_fn(model)
    # Validation accuracies of two networks that differ by less than their noise are not told apart:
    # a step's best epoch, judged against the control's best, is judged with that much allowance
    # (a limit at the noise level rolled back steps the final fine-tune would have recovered).
    noise = accuracy_noise(first[aim.metric], first.get("examples")) if aim.metric == "accuracy" else 0.0
    allowance = plan.step_allowance if plan.step_allowance is not None else noise
    plain = trainer or _trainer(replace(aim, distill=0.0), train_loader, loss_fn, None, device, progress)
    log = {"plan": asdict(plan), "baseline": _measure(model, example, first, aim, device), "iterations": [],
           "gave_up": [], "original_units": sum(g.size for g in pruner.groups),
           "channels_before": {g.name: g.size for g in pruner.groups}, "skipped": pruner.skipped,
           "noise": {"points": round(noise, 2), "examples": first.get("examples"), "step_allowance": round(allowance, 2)},
           "seconds": dict.fromkeys(("baseline", "recovery", "prune", "fine_tune", "rolled_back", "final", "control"), 0.0)}
    run = _Run(aim, plan, example, device, batches, reference=copy.deepcopy(model).eval(), evaluate_fn=evaluate_fn, clock=clock,
               log_fn=log_fn, log=log)
    score, base = run.score, log["baseline"]
    control = Control(copy.deepcopy(model), plain, score, first[aim.metric], clock) if plan.control else None
    # The teacher, when distillation is on or may be chosen (not with the caller's own trainer, which
    # distils or not by itself): the control, which gains from its epochs as the bar each step is
    # judged against does. A teacher frozen at an unconverged baseline held the pruned network near
    # the baseline's score while the control rose past it (benchmarks/README.md). Without a control:
    # the unpruned network, frozen. (Until the first step the control is the unpruned network.)
    may_distill = (aim.distill or plan.choose_recovery) and trainer is None
    teacher = (control.model if control else copy.deepcopy(model).requires_grad_(False).eval()) if may_distill else None
    trainer_for = lambda s: trainer or _trainer(s, train_loader, loss_fn, teacher if s.distill else None, device, progress)  # noqa: E731
    bar = lambda: control.best if control else base[aim.metric]  # noqa: E731  (what a step is judged against)
    bar_name = "the control" if control else "the baseline"
    control_seconds = lambda: control.seconds if control else 0.0  # noqa: E731  (its epochs run inside the phases' time)
    log["seconds"]["baseline"] = clock() - start
    loaders = (train_loader, rank_loader or train_loader)

    def cut(net: nn.Module, schedule: Schedule, ignore: list[str], wanted: float, attempt: int):
        """Remove units of `net` for a `wanted` MACs reduction (as far as the per-layer minimums allow)."""
        _seed(schedule, attempt, loaders)
        pruner = _pruner(net, example, schedule, ignore)
        try:
            return _prune_step(pruner, schedule, loaders[1], loss_fn, Context(device=device), device, progress, {"macs": wanted})
        except ValueError:  # the per-layer minimums stop short of this step: take what they allow
            return pruner.prune(pruner.prunable())

    setting = Setting(aim, tuple(ignore))
    if plan.choose_recovery:
        t = clock()
        setting = _choose_recovery(run, model, setting, fixed, cut, _next_step(aim, plan, base, None, plan.first_step, batches),
                                   max(plan.recovery_margin, noise), trainer_for, trainer is not None, deadline["choose"])
        log["seconds"]["recovery"] = clock() - t
    aim, ignore, own_tuner = setting.schedule, list(setting.ignore), trainer_for(setting.schedule)
    run.aim = aim
    # The pruned network's fine-tune, with the control's epochs alongside (control.py).
    fine_tuner = lambda net, n: control.follow(own_tuner(net, n), n) if control else own_tuner(net, n)  # noqa: E731
    log["schedule"] = asdict(replace(schedule, latency_batch=aim.latency_batch, normalize=aim.normalize, distill=aim.distill))
    limit = aim.max_accuracy_drop
    loose = aim if limit is None else replace(aim, max_accuracy_drop=limit + allowance)  # what a step is judged by
    # held: the network after the last step within the limit itself, and its number: where the plan goes
    # back to if the final network misses the limit (None: no step has, or the last one kept is it).
    last, size, attempt, held = None, plan.first_step, 0, None
    while True:
        if deadline["steps"] is not None and clock() >= deadline["steps"]:
            log["gave_up"].append(f"more pruning: the budget's share for steps ({_STEPS_UNTIL:.0%}) was spent "
                                  f"after {attempt} steps tried")
            stopped = "the time budget"
            break
        attempt += 1
        wanted = _next_step(aim, plan, base, last, size, batches)
        previous, mark, t0 = copy.deepcopy(model), control and control.mark(), clock()
        result = cut(model, aim, ignore, wanted, attempt)
        if result.count == 0:
            stopped = decide(aim, base, None, attempt, removed=0).reason
            break
        t1, c1 = clock(), control_seconds()
        # A step still short of the accuracy limit at a plateau gets its whole cosine before it is judged.
        recovered = lambda best: within_drop(bar(), best, aim.max_accuracy_drop)  # noqa: E731
        curve = fine_tune_to_plateau(model, fine_tuner(model, plan.max_epochs), lambda: score(model), plan.max_epochs, plan.patience,
                                     deadline["steps"], clock, enough=recovered)
        control_s = control_seconds() - c1
        t2 = clock() - control_s  # the control's epochs are counted as its own
        entry = {**run.measure(model),  # timed in turns below
                 "iteration": attempt, "asked_macs": round(wanted, 4), "removed": result.count,
                 "removed_per_group": result.removed_per_group, "channels": result.channels, "check": result.check, "curve": curve["scores"], "best_epoch": curve["best_epoch"], "epochs": curve["epochs"],
                 "fine_tune_stopped": curve["stopped"], "against": bar(),
                 "seconds": {"prune": round(t1 - t0, 1), "fine_tune": round(t2 - t1, 1), "control": round(control_s, 1)}}
        run.time_in_turns(entry, model)
        log["iterations"].append(entry)
        log["seconds"]["prune"] += t1 - t0
        log_fn(_line(entry, base, aim) + f"; {bar_name} {100 * bar():.2f}%; asked {wanted:.2f}x fewer MACs, best of "
               f"{curve['epochs']} epochs: {curve['best_epoch']}")
        verdict = decide(loose, base, entry, attempt, every=True, against=bar(), batches=batches)
        if verdict.stop and not verdict.roll_back and aim.target_speedup is not None:
            verdict = run.confirm_speed(entry, model, loose, attempt, bar())
        if verdict.roll_back:
            model, entry["rejected"] = previous, True
            if control:
                control.undo(mark)
            log["seconds"]["rolled_back"] += t2 - t1
            lost = accuracy_drop(entry["against"], entry[aim.metric])
            smaller = math.sqrt(wanted)
            entry["why"] = (f"rolled back: {lost:.2f} points below {bar_name} (limit {limit} + {allowance:.2f} noise) after "
                            f"{curve['epochs']} epochs; "
                            + (f"retrying a {smaller:.2f}x step" if smaller >= plan.min_step else "no smaller step left to try"))
            log_fn(f"step {attempt} {entry['why']}")
            if smaller < plan.min_step:
                stopped = (f"a {wanted:.2f}x step ended more than {loose.max_accuracy_drop:.2f} points below {bar_name} and one below "
                           f"{plan.min_step}x would be needed: smaller steps no longer help")
                break
            size = smaller
            continue
        log["seconds"]["fine_tune"] += t2 - t1
        entry["within_limit"] = within_drop(entry["against"], entry[aim.metric], limit)
        if entry["within_limit"]:
            entry["why"], held = "kept", None
        else:
            entry["why"] = (f"kept within the noise allowance: {accuracy_drop(entry['against'], entry[aim.metric]):.2f} points below "
                            f"{bar_name} (limit {limit} + {allowance:.2f})")
            if last is not None and last["within_limit"]:  # the network before this step was within the limit
                held = (previous, last["iteration"])
        last, size = entry, min(size, wanted)
        if verdict.stop:
            stopped = verdict.reason
            break
    log["stopped"] = stopped
    if last is None and attempt:
        log_fn("no step held: the model is the baseline's")

    t, c1 = clock(), control_seconds()
    _seed(aim, 10_000, (train_loader,))
    final = _final_fine_tune(model, fine_tuner, lambda: score(model), plan, deadline["final"], clock)
    log["seconds"]["final"], log["seconds"]["control"] = clock() - t - (control_seconds() - c1), control_seconds()
    if final["stopped"] == "the time budget":
        log["gave_up"].append(f"final fine-tuning: stopped by the budget after {final['epochs']} of at most {plan.final_max_epochs} epochs")
    log["final_fine_tune"] = final
    log["final"] = run.measure(model)
    log_fn(f"final fine-tune: {final['epochs']} epochs (best {final['best_epoch']}, stopped by {final['stopped']}), "
           f"{aim.metric} {100 * log['final'][aim.metric]:.2f}%")
    if held is not None and not within_drop(bar(), log["final"][aim.metric], limit):
        model = run.fall_back(model, held, own_tuner, bar(), bar_name, deadline["final"])
    run.time_in_turns(log["final"], model)  # the report's speed-up, judged as the steps'

    unpruned = control.finish() if control else None
    if control:
        log["control"] = {**run.measure(unpruned), "extra_epochs": control.epochs,
                          "best_epoch": control.best_epoch, "curve": control.scores}
        run.time_in_turns(log["control"], unpruned)
        log_fn(f"control (unpruned, {control.epochs} epochs alongside, best {control.best_epoch}): {aim.metric} "
               f"{100 * log['control'][aim.metric]:.2f}%")
    log["seconds"] = {k: round(v, 1) for k, v in log["seconds"].items()}
    log["wall_s"] = round(clock() - start, 1)
    return model, log, unpruned


def _choose_recovery(run: _Run, model: nn.Module, setting: Setting, fixed: list[str], cut, wanted: float, margin: float,
                     trainer_for, own_trainer: bool, deadline: float | None) -> Setting:
    """The recovery tools that win short trials of the first step (a `wanted` MACs reduction) on
    validation, each trial on a copy of `model` with the first step's seed (recovery.choose)."""
    epochs, log = run.plan.trial_epochs, run.log

    def trial(tried: Setting) -> tuple[float, dict]:
        net = copy.deepcopy(model)
        cut(net, tried.schedule, list(tried.ignore), wanted, 1)
        curve = fine_tune_to_plateau(net, trainer_for(tried.schedule)(net, epochs), lambda: run.score(net), epochs, epochs + 1)
        return max(curve["scores"]), run.reached(net)

    candidates, left_out = switches(model, run.example, setting, fixed)
    if own_trainer:  # distillation is the caller's trainer's business
        candidates = [c for c in candidates if c.tool != "distill"]
        left_out.append({"tool": "distill", "why": "a trainer was given: distillation is up to it"})
    chosen, trials, gave_up = choose(setting, candidates, trial, margin, deadline, run.clock)
    log["recovery"] = {"asked_macs": round(wanted, 4), "trial_epochs": epochs, "margin": margin,
                       "trials": trials, "left_out": left_out, "used": chosen.used(model)}
    log["gave_up"] += gave_up
    run.log_fn("recovery tools, chosen on validation by trials of the first step: "
               + ", ".join(f"{k} {v}" for k, v in log["recovery"]["used"].items()))
    return chosen


def _final_fine_tune(model: nn.Module, fine_tuner, score, plan: Plan, deadline: float | None, clock) -> dict:
    """Cosine cycles from the model's best weights: plan.final_cycle epochs, then each twice as long
    while the last beat the best validation score, plan.final_max_epochs in all; the best epoch is
    kept. Not early stopping within one cosine: the rate restarts high, the first epochs score below
    the start, and the gain comes as the rate falls, after any patience would have stopped it.
    Returns fine_tune_to_plateau's dict over all cycles ("scores": epoch 0, 1, ...)."""
    scores, best, epochs, length = [score()], 0, 0, plan.final_cycle
    stopped = f"the cap of {plan.final_max_epochs} epochs"
    while epochs < plan.final_max_epochs:
        length = min(length, plan.final_max_epochs - epochs)
        cycle = fine_tune_to_plateau(model, fine_tuner(model, length), score, length, length + 1, deadline, clock,
                                     first_score=max(scores))  # the model comes with the best weights so far
        scores += cycle["scores"][1:]
        best, epochs = (epochs + cycle["best_epoch"] if cycle["best_epoch"] else best), epochs + cycle["epochs"]
        if cycle["stopped"] == "the time budget":
            stopped = cycle["stopped"]
            break
        if not cycle["best_epoch"]:
            stopped = f"a cycle of {length} epochs without a better score"
            break
        length *= 2
    return {"scores": scores, "best_epoch": best, "epochs": epochs, "stopped": stopped}


def _time_in_turns(base: dict, entry: dict, reference: nn.Module, model: nn.Module, example, aim: Schedule,
                   batches: tuple[int, ...], device: str, rounds: int = 5) -> None:
    """Time the unpruned `reference` and the pruned `model` in turns in eager PyTorch and aim.runtime, at each of `batches`:
    entry["speedup"] is the median of the rounds' ratios (measure.in_turns), which the loop judges the
    speed target by; `base` and `entry` keep each one's lowest time, for the tables."""
    runtimes = tuple(dict.fromkeys(("eager", aim.runtime)))
    lowest, speedups = in_turns({"base": reference, "step": model},
                                lambda net: [timed(net, example, r, b, device) for r in runtimes for b in batches], rounds)
    base["latency"] = keep_lowest(base["latency"], lowest["base"])
    entry["latency"], entry["speedup"] = keep_lowest(entry["latency"], lowest["step"]), speedups["step"]


def _next_step(aim: Schedule, plan: Plan, base: dict, last: dict | None, size: float, batches: tuple[int, ...]) -> float:
    """The MACs reduction the next step asks for: what the unmet targets still need, at most `size`,
    at least plan.min_step. A target's need is estimated from how it has fallen with MACs so far
    (MACs reduction = its reduction ** k; k = 1 before there is evidence); the speed-up's is the lowest
    of those at `batches`."""
    now = last or base
    macs_done = base["macs"] / now["macs"]
    needs = []
    for target, reached in ((aim.target_macs, macs_done),
                            (aim.target_speedup, least_speedup(base, last, batches, aim.runtime) if last else 1.0),
                            (aim.target_size, base["size_mb"] / now["size_mb"])):
        if target is None or reached >= target:
            continue
        k = math.log(macs_done) / math.log(reached) if macs_done > 1.05 and reached > 1.05 else 1.0
        needs.append((target / reached) ** min(max(k, 0.5), 3.0))
    return max(plan.min_step, min(size, max(needs, default=plan.min_step)))


def _deadlines(plan: Plan, start: float) -> dict[str, float | None]:
    if plan.budget_s is None:
        return dict.fromkeys(("choose", "steps", "final"))
    return {"choose": start + _CHOOSE_UNTIL * plan.budget_s, "steps": start + _STEPS_UNTIL * plan.budget_s,
            "final": start + plan.budget_s}


def _trainer(aim: Schedule, loader, loss_fn: Callable, teacher: nn.Module | None, device: str, progress: bool):
    """trainer(model, epochs): one epoch at a time of a fine-tune with a fresh optimizer and a cosine
    learning rate over `epochs` (restarted by every call: every step)."""

    def make(model: nn.Module, epochs: int) -> Callable[[int], float]:
        if aim.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model.parameters(), aim.optimizer, aim.lr, aim.weight_decay)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))

        def one_epoch(epoch: int) -> float:
            with evaluating(teacher) if teacher is not None else contextlib.nullcontext():  # the control trains between epochs
                history = train_epoch(model, loader, optimizer, loss_fn, device, progress, desc=f"fine-tune {epoch}/{epochs}",
                                      teacher=teacher, distill=aim.distill, temperature=aim.temperature, amp=aim.amp,
                                      channels_last=aim.channels_last)
            cosine.step()
            return history["loss"]

        return one_epoch

    return make
