"""The iterative loop of 1611.06440: rank, remove the lowest channels, fine-tune, evaluate, repeat.

Each iteration is logged and checkpointed (see checkpoint.py), and starts from a seed derived from
its number, so a run resumed from iteration k's checkpoint continues exactly as the uninterrupted
run would have. Loss, evaluation and fine-tuning are the caller's to choose (defaults: cross-entropy,
argmax accuracy, train.fine_tune); a distributed.Context shares the work among processes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import torch
from torch import nn

from . import checkpoint
from .criteria import CRITERIA
from .distributed import Context
from .measure import deployment_batch, latency, paired_change, paired_speedup, profile, speed_change
from .pruner import NORMALIZE, Pruner
from .runtimes import RUNTIMES
from .runtimes import get as get_runtime
from .surgery import removed
from .train import evaluate, fine_tune


def _option(default, help: str, flag: str | None = None, choices: tuple | None = None):
    """A field whose command-line flag (cli_args) is derived from it: --name-with-dashes unless `flag`
    (an older name kept), with this help and, where given, these choices."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


@dataclass
class Schedule:
    """How to prune: step size, fine-tuning between steps, and when to stop.

    step: units removed per iteration, a count (>= 1) or a fraction of the original units (the
    blog: 512 of VGG16's 4224 filters, 0.12); or, with macs_step, each iteration removes the
    lowest-ranked units until MACs are macs_step times fewer than after the previous one (the
    baseline's / macs_step**i, whatever the rounding did before). Stops at the first target met: target_macs (MACs
    reduction factor), target_speedup (measured latency at batch latency_batch), target_size
    (size on disk reduction), max_iterations, or max_accuracy_drop (percentage points of `metric`,
    a higher-is-better fraction from the evaluation: the last model within it is kept).
    Recovery: distill (weight a of the distillation loss from the unpruned model, Hinton et al.
    2015: (1 - a) * task loss + a * KD at `temperature`), amp (bf16 autocast while training),
    channels_last. latency_aware: measure what each group's channels cost in time on this device,
    at latency_batch, and use that in place of MACs in the regularisation (flops_lambda).
    runtime: where latency is measured for target_speedup and latency_aware (runtimes.RUNTIMES,
    e.g. "onnxruntime"): the runtime the model ships on; eager PyTorch is measured beside it.
    """

    criterion: str = _option("taylor", "how units are ranked", choices=CRITERIA)
    step: float = _option(0.12, "units removed per iteration: a count, or a fraction (<1) of the original units")
    macs_step: float | None = _option(None, "instead of --step: each iteration cuts MACs by this factor (e.g. 1.5), rounding included")
    epochs: int = _option(10, "fine-tuning epochs after each iteration", flag="--epochs-between")
    final_epochs: int = _option(0, "fine-tuning epochs after the last iteration")
    max_iterations: int | None = _option(5, "stop after this many iterations", flag="--iterations")
    target_macs: float | None = _option(None, "stop once MACs are this many times fewer")
    target_speedup: float | None = _option(None, "stop once measured latency (at --latency-batch) is this many times lower")
    target_size: float | None = _option(None, "stop once the model is this many times smaller on disk")
    max_accuracy_drop: float | None = _option(None, "never keep a model more than this many accuracy points below the baseline "
                                                    "(on the validation images)", flag="--max-drop")
    metric: str = "accuracy"  # library only: the CLI's evaluation gives accuracy
    lr: float = _option(1e-3, "learning rate of fine-tuning (and of training a fresh --arch first)")
    optimizer: str = _option("sgd", "optimizer of fine-tuning", choices=("sgd", "adam"))
    weight_decay: float = _option(0.0, "weight decay of fine-tuning")
    distill: float = _option(0.0, "weight of distillation from the unpruned model while fine-tuning (0: off; Hinton et al. 2015)")
    temperature: float = _option(4.0, "softmax temperature of --distill")
    amp: bool = _option(False, "bf16 autocast while training and fine-tuning")
    channels_last: bool = _option(False, "channels-last memory format while training and fine-tuning")
    flops_lambda: float = _option(0.0, "FLOPs regularisation of the ranking (paper: 1e-3)")
    latency_aware: bool = _option(False, "regularise by measured latency per channel instead of MACs")
    latency_batch: int | None = _option(None, "batch size of the measured latency (targets, --latency-aware; "
                                              "default 64 on a GPU, 1 on the CPU)")
    runtime: str = _option("eager", "where latency is measured (--target-speedup, --latency-aware, the report): the runtime "
                                    "you ship on; eager PyTorch is measured beside it", choices=tuple(RUNTIMES))
    round_to: int | str = _option("auto", "keep channel counts at multiples of this ('auto': 8 on CUDA, 1 on the CPU)")
    normalize: str = _option("mean", "how scores of different layers are made comparable (mean: each layer's scores divided by "
                                     "their mean, size-neutral; l2: the paper's per-layer L2 norm; macs: mean, then per MAC a "
                                     "channel costs)", choices=NORMALIZE)
    min_channels: int | dict = _option(1, "fewest channels kept in any layer")
    rank_batches: int | None = _option(None, "rank on at most this many batches")
    seed: int = 0  # the CLI's --seed, shared by every command


def timed(model: nn.Module, example, runtime: str, batch: int, device: str, min_run_time: float = 0.3) -> dict:
    """The loop's one way to time a model: the latency record (measure.latency) of `runtime` at
    `batch`, the model prepared for it once (exported, compiled or captured)."""
    return profile(model, example, batch_sizes=(batch,), device=device, min_run_time=min_run_time, runtime=runtime).records()[0]


def measured_unit_cost(pruner: Pruner, batch: int = 1, device: str = "cpu", share: float = 0.25,
                       min_run_time: float = 0.3, runtime: str = "eager") -> torch.Tensor:
    """Milliseconds each unit costs on this device in `runtime` at this batch size (in the model's
    dtype): cut `share` of one group at a time, time it and put it back (surgery.removed; min_run_time:
    seconds per timing block). Scaled so the total equals the MACs total (in MMACs): only the spread changes,
    and flops_lambda keeps its meaning."""
    example = pruner.example_inputs
    base = timed(pruner.model, example, runtime, batch, device, min_run_time)["ms"]
    cost = torch.zeros(pruner.graph.num_units, dtype=torch.float64)
    for group in pruner.groups:
        k = max(1, int(group.size * share))
        if group.size - k < 1:
            continue
        remove = torch.zeros(pruner.graph.num_units, dtype=torch.bool)
        remove[group.offset:group.offset + k] = True
        with removed(pruner.model, pruner.graph, remove):
            saved = base - timed(pruner.model, example, runtime, batch, device, min_run_time)["ms"]
        cost[group.offset:group.offset + group.size] = max(saved, 0.0) / k
    macs = pruner.graph.unit_cost() / 1e6
    return cost * (macs.sum() / cost.sum()) if cost.sum() > 0 else macs


def prune_iteratively(
    model: nn.Module,
    example_inputs: torch.Tensor,
    train_loader: Iterable | None,
    eval_loader: Iterable | None,
    schedule: Schedule,
    *,
    loss_fn: Callable = nn.functional.cross_entropy,
    evaluate_fn: Callable[[nn.Module], dict] | None = None,
    fine_tune_fn: Callable[[nn.Module, int], None] | None = None,
    rank_loader: Iterable | None = None,
    ignore: Iterable[str] = (),
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
    log_fn: Callable[[str], None] = print,
    context: Context | None = None,
) -> tuple[nn.Module, dict]:
    """Prune `model` by `schedule`; returns the pruned model and the run log.

    loss_fn(logits, targets): for ranking and the default fine-tuning. evaluate_fn(model) -> dict
    with schedule.metric (default: accuracy and loss on eval_loader); eval_loader decides
    max_accuracy_drop, so it should be validation data, not the final test set.
    fine_tune_fn(model, epochs): your own training loop in place of train.fine_tune (then
    train_loader is only ranked on, when rank_loader is None; distill/amp/channels_last are yours).
    ignore: names of modules whose outputs are kept (the classifier). context: for distributed runs
    (distributed.setup()); None is one process.
    """
    ctx = context or Context(device=device)
    if schedule.latency_batch is None:
        schedule = replace(schedule, latency_batch=deployment_batch(device))
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    example_inputs = _to(example_inputs, device)
    evaluate_fn = evaluate_fn or (lambda m: evaluate(m, eval_loader, device=device, progress=progress))
    start = time.perf_counter()

    def measured(m: nn.Module) -> dict:  # taken on rank 0 and shared, so every process decides alike
        return ctx.on_main(lambda: {**_measure(m, example_inputs, evaluate_fn(m), schedule, device),
                                    "wall_s": round(time.perf_counter() - start, 1)})

    model, log, teacher, iteration = _start(model, example_inputs, schedule, ignore, folder, resume, ctx, device, measured, log_fn)
    tune = _Tuner(schedule, train_loader, loss_fn, fine_tune_fn, teacher, ctx, device, progress)
    pruner = _pruner(model, example_inputs, schedule, ignore)
    log.setdefault("original_units", sum(g.size for g in pruner.groups))
    log.setdefault("channels_before", {g.name: g.size for g in pruner.groups})
    log.setdefault("skipped", pruner.skipped)  # ops left out of pruning, and why: for the report
    step = int(schedule.step if schedule.step >= 1 else round(schedule.step * log["original_units"]))
    last = log["iterations"][-1] if log["iterations"] else None
    verdict = decide(schedule, log["baseline"], last, iteration)
    while not verdict.stop:
        iteration += 1
        _seed(schedule, iteration, (train_loader, rank_loader))
        previous = copy.deepcopy(model) if schedule.max_accuracy_drop is not None else None
        # With macs_step, iteration i ends at the baseline's MACs / macs_step**i (right after a resume too:
        # the pruner counts from the resumed model).
        target = ({"macs": pruner.macs_at_start * schedule.macs_step ** iteration / log["baseline"]["macs"]}
                  if schedule.macs_step else {"n": step})
        result = _prune_step(pruner, schedule, rank_loader or train_loader, loss_fn, ctx, device, progress, target)
        if result.count == 0:
            verdict = decide(schedule, log["baseline"], None, iteration, removed=0)
            break
        train_loss = tune(model, schedule.epochs, f"iteration {iteration}")
        entry = {**measured(model), "iteration": iteration, "removed": result.count, "removed_per_group": result.removed_per_group,
                 "channels": result.channels, "check": result.check, "train_loss": train_loss}
        log["iterations"].append(entry)
        log_fn(_line(entry, log["baseline"], schedule))
        verdict = decide(schedule, log["baseline"], entry, iteration)
        if verdict.roll_back:
            model, entry["rejected"] = previous, True
        elif folder is not None and ctx.is_main:
            checkpoint.save(folder, model, log, iteration)
    log["stopped"] = verdict.reason
    if schedule.final_epochs:
        _seed(schedule, 10_000, (train_loader,))
        log["final_fine_tune"] = {"epochs": schedule.final_epochs, "train_loss": tune(model, schedule.final_epochs, "final fine-tune")}
    log["final"] = measured(model)
    log["wall_s"] = round(log.get("wall_s", 0.0) + log["final"].pop("wall_s"), 1)
    return model, log


def _start(model: nn.Module | None, example_inputs, schedule: Schedule, ignore, folder: Path | None, resume: bool, ctx: Context,
           device: str, measured: Callable, log_fn: Callable) -> tuple[nn.Module, dict, nn.Module | None, int]:
    """The model, log, teacher and iteration to start from: a checkpoint's, or the baseline's."""
    if resume and folder is not None:
        model, log, done = checkpoint.load(folder)
        checkpoint.check_same_run(folder, log.get("schedule", {}), asdict(schedule), _SAME_ON_RESUME)
        teacher = checkpoint.load_teacher(folder) if schedule.distill else None
        log_fn(f"resumed from {folder} after iteration {done}")
        model.to(device)
    else:
        check_reachable(model, example_inputs, schedule, ignore)  # fails before any work if it cannot succeed
        if schedule.channels_last:  # the layout fine-tuning will leave it in: the baseline is timed alike
            model.to(memory_format=torch.channels_last)
        baseline = measured(model.to(device))  # on the device it is measured and evaluated on
        baseline.pop("wall_s")
        log = {"schedule": asdict(schedule), "baseline": baseline, "iterations": [], "stopped": None, "wall_s": 0.0}
        done = 0
        # The unpruned model, frozen: the teacher of distillation
        teacher = copy.deepcopy(model).requires_grad_(False) if schedule.distill else None
        if folder is not None and ctx.is_main:  # a run killed in iteration 1 resumes here
            if teacher is not None:
                checkpoint.save_teacher(folder, teacher)
            checkpoint.save(folder, model, log, 0)
    if teacher is not None:
        teacher.to(device).eval()
    return model, log, teacher, done


class _Tuner:
    """Fine-tunes the model between steps and at the end: the caller's function, or train.fine_tune
    (with distillation from the teacher); returns the mean training loss over processes, if known."""

    def __init__(self, schedule: Schedule, loader, loss_fn, fine_tune_fn, teacher, ctx: Context, device: str, progress: bool):
        self.schedule, self.loader, self.loss_fn, self.fine_tune_fn, self.teacher = schedule, loader, loss_fn, fine_tune_fn, teacher
        self.ctx, self.device, self.progress = ctx, device, progress

    def __call__(self, model: nn.Module, epochs: int, desc: str) -> float | None:
        if epochs == 0:
            return None
        s, trained = self.schedule, self.ctx.wrap(model)  # DDP after every surgery: the shapes changed
        if self.fine_tune_fn is not None:
            self.fine_tune_fn(trained, epochs)
            return None
        history = fine_tune(trained, self.loader, epochs, s.lr, s.optimizer, s.weight_decay, self.device, self.progress, desc,
                            loss_fn=self.loss_fn, teacher=self.teacher, distill=s.distill, temperature=s.temperature, amp=s.amp,
                            channels_last=s.channels_last)
        return self.ctx.mean(history[-1]["loss"])  # the mean over all processes' (equal) shards


def _prune_step(pruner: Pruner, schedule: Schedule, loader, loss_fn, ctx: Context, device: str, progress: bool,
                target: dict):
    """Rank with the measured cost if asked, and remove units: `target` is Pruner.prune's keyword."""
    if schedule.latency_aware and schedule.flops_lambda:
        cost = ctx.on_main(lambda: measured_unit_cost(pruner, schedule.latency_batch, device, runtime=schedule.runtime))
        pruner.unit_cost = lambda _p: cost
    pruner.rank(loader, loss_fn, device=device, max_batches=schedule.rank_batches, progress=progress, reduce=ctx.reduce)
    return pruner.prune(**target)


def _measure(model: nn.Module, example, evaluation: dict, schedule: Schedule, device: str, timing: bool = True) -> dict:
    """An entry of the log: the evaluation, size, MACs, and one latency record per runtime (none with
    timing=False, for a caller that times the model in turns itself)."""
    if schedule.metric not in evaluation:
        raise ValueError(f"the evaluation gave {sorted(evaluation)}, not {schedule.metric!r}: return it from evaluate_fn, "
                         "or set Schedule(metric=...) to one of these")
    prof = profile(model, example, latency=False, device=device).as_dict()
    # Eager PyTorch beside the runtime the model ships on, so that the report can show both.
    records = [timed(model, example, name, schedule.latency_batch, device)
               for name in dict.fromkeys(("eager", schedule.runtime))] if timing else []
    kept = ("params", "size_mb", "macs", "device", "dtype", "threads")
    return {**evaluation, **{k: prof[k] for k in kept}, "latency": records}


class Verdict(NamedTuple):
    """decide()'s answer: whether the loop stops, why (None while it goes on), and whether the last
    step is undone (it lost more than the accuracy limit)."""

    stop: bool
    reason: str | None
    roll_back: bool


def accuracy_drop(before: float, after: float) -> float:
    """Percentage points lost from `before` to `after` (fractions), rounded so that float noise cannot
    make a drop of exactly a limit exceed it (0.8745 - 0.8645 is 0.0100000001 in floats)."""
    return round(100 * (before - after), 9)


def within_drop(before: float, after: float, limit: float | None) -> bool:
    """Whether going from `before` to `after` loses at most `limit` points (no limit: always)."""
    return limit is None or accuracy_drop(before, after) <= limit


def accuracy_noise(accuracy: float, examples: int | None) -> float:
    """One standard error, in points, of the difference of two accuracies near `accuracy` measured on
    `examples` images each (binomial: 100 * sqrt(2 p (1 - p) / n)); 0 where the count is unknown. On
    1000 images at 87% it is 1.5 points: two networks that differ by less are not told apart."""
    return 100 * math.sqrt(2 * accuracy * (1 - accuracy) / examples) if examples else 0.0


def decide(schedule: Schedule, base: dict, last: dict | None, iteration: int, removed: int | None = None,
           every: bool = False, against: float | None = None, batches: tuple[int, ...] | None = None) -> Verdict:
    """The one place that decides when pruning stops: `last` is the newest step's measurements (None
    before the first), `removed` how many units that step could remove. In order: nothing left to
    remove; more lost than schedule.max_accuracy_drop (roll that step back) from `against` (default:
    the baseline's score; auto.prune_auto's: the control's); a target reached (with `every`, all of
    those set: prune_auto's reading; `batches`: the speed-up judged at each of them, see
    target_reached); max_iterations done."""
    if removed == 0:
        return Verdict(True, "nothing left to remove within the per-layer minimums", False)
    bar = base[schedule.metric] if against is None else against
    if last is not None and not within_drop(bar, last[schedule.metric], schedule.max_accuracy_drop):
        return Verdict(True, f"iteration {iteration} lost more than {schedule.max_accuracy_drop} points; kept iteration {iteration - 1}",
                       True)
    if last is not None and (reached := target_reached(schedule, base, last, every, batches)):
        return Verdict(True, reached, False)
    if schedule.max_iterations is not None and iteration >= schedule.max_iterations:
        return Verdict(True, f"{iteration} iterations done", False)
    return Verdict(False, None, False)


def _seed(schedule: Schedule, iteration: int, loaders: Iterable) -> None:
    torch.manual_seed(schedule.seed * 100_003 + iteration)
    for loader in loaders:
        generator = getattr(loader, "generator", None)
        if generator is not None:
            generator.manual_seed(schedule.seed * 100_003 + iteration)


def _to(inputs, device: str):
    return tuple(x.to(device) for x in inputs) if isinstance(inputs, (tuple, list)) else inputs.to(device)


# Options that change what a run computes: a resumed run must use the same ones (targets and the
# number of iterations may change).
_SAME_ON_RESUME = ("criterion", "step", "macs_step", "epochs", "lr", "optimizer", "weight_decay", "distill", "temperature", "amp", "channels_last",
                   "flops_lambda", "latency_aware", "latency_batch", "runtime", "round_to", "normalize", "min_channels", "rank_batches", "seed")


def check_reachable(model: nn.Module, example_inputs, schedule: Schedule, ignore: Iterable[str] = ()) -> dict[str, float]:
    """Fail before any training: trace `model` (GraphError if it cannot be), and prune a copy to the per-layer
    minimums; ValueError if schedule.target_macs or target_size asks for more than that reaches.

    Returns the best reachable {"macs": factor, "size": factor} (empty when no such target is set).
    Also RuntimeUnavailable if schedule.runtime is not installed.
    """
    first = example_inputs if isinstance(example_inputs, torch.Tensor) else example_inputs[0]
    get_runtime(schedule.runtime).check(first.device)  # the device the loop measures on
    trial = copy.deepcopy(model)
    pruner = Pruner(trial, example_inputs, criterion="l1", ignore=_modules(trial, ignore),
                    min_channels=schedule.min_channels, round_to=schedule.round_to, verify=False)
    if schedule.target_macs is None and schedule.target_size is None:
        return {}
    before = profile(trial, example_inputs, latency=False)
    pruner.prune(pruner.prunable())
    after = profile(trial, example_inputs, latency=False)
    least = schedule.min_channels if isinstance(schedule.min_channels, int) else min(schedule.min_channels.values(), default=1)
    least = -(-max(least, 1) // pruner.round_to) * pruner.round_to
    best = {"macs": before.macs / max(after.macs, 1), "size": before.size_mb / after.size_mb}
    for target, key, what, flag in ((schedule.target_macs, "macs", "MACs", "--target-macs"),
                                    (schedule.target_size, "size", "size on disk", "--target-size")):
        if target is not None and target > best[key]:
            most = math.floor(10 * best[key]) / 10  # rounded down: asking for the number said is possible
            raise ValueError(f"{what} can be reduced at most {most:.1f}x with at least {least} channels per layer; "
                             f"ask for less ({flag} {most:.1f} or lower), or allow fewer channels per layer")
    return best


def _modules(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            known = [n for n, m in modules.items() if n and not list(m.children())]
            raise ValueError(f"ignore: no module named {name!r} in {type(model).__name__}; its layers are named like "
                             f"{', '.join(known[:4])}, ..., {', '.join(known[-2:])}")
    return [modules[name] for name in names]


def _pruner(model: nn.Module, example_inputs, schedule: Schedule, ignore: Iterable[str]) -> Pruner:
    return Pruner(model, example_inputs, criterion=schedule.criterion, ignore=_modules(model, ignore),
                  min_channels=schedule.min_channels, round_to=schedule.round_to, normalize=schedule.normalize,
                  flops_lambda=schedule.flops_lambda, seed=schedule.seed)


def _latency(entry: dict, batch: int, runtime: str) -> float:
    """An entry's measured latency in `runtime` at `batch`, in ms (measure.latency's record)."""
    return latency(entry, batch, runtime)["ms"]


def speedup(base: dict, entry: dict, batch: int, runtime: str) -> float:
    """entry's measured speed-up over base in `runtime` at `batch`: the one timed in turns beside the
    baseline (entry["speedup"], measure.in_turns) where there is one, else the ratio of their
    latencies."""
    if paired := paired_speedup(entry, batch, runtime):
        return paired["x"]
    return _latency(base, batch, runtime) / _latency(entry, batch, runtime)


def least_speedup(base: dict, entry: dict, batches: Iterable[int], runtime: str) -> float:
    """entry's lowest speed-up over base (speedup) at any of these batch sizes."""
    return min(speedup(base, entry, batch, runtime) for batch in batches)


def target_reached(schedule: Schedule, base: dict, last: dict, every: bool = False,
                   batches: tuple[int, ...] | None = None) -> str | None:
    """The first of schedule's targets that `last` meets against `base` (with `every`: all of them, once
    all are met), in words; None if none (not all). The speed-up is judged at schedule.latency_batch,
    or at every one of `batches` (the lowest of them)."""
    batches = batches or (schedule.latency_batch,)
    at = "" if batches == (schedule.latency_batch,) else f", the lowest of batches {', '.join(map(str, batches))}"
    checks = [
        (schedule.target_macs, base["macs"] / last["macs"], "MACs reduction"),
        (schedule.target_speedup, least_speedup(base, last, batches, schedule.runtime),
         f"measured speed-up ({schedule.runtime}{at})"),
        (schedule.target_size, base["size_mb"] / last["size_mb"], "size reduction"),
    ]
    checks = [(target, reached, what) for target, reached, what in checks if target is not None]
    met = [f"{what} {reached:.2f}x reached the target {target:g}x" for target, reached, what in checks if reached >= target]
    if not met or (every and len(met) < len(checks)):
        return None
    return "; ".join(met) if every else met[0]


def _line(entry: dict, base: dict, schedule: Schedule) -> str:
    metric, batch = schedule.metric, schedule.latency_batch
    before, after = latency(base, batch, schedule.runtime), latency(entry, batch, schedule.runtime)
    paired = paired_speedup(entry, batch, schedule.runtime)  # timed in turns with the baseline (auto.py)
    speed = paired_change(paired) + " in turns" if paired else speed_change(before["ms"], after["ms"], before["iqr_ms"], after["iqr_ms"])
    return (f"iteration {entry['iteration']}: removed {entry['removed']}, {metric} {100 * entry[metric]:.2f}% "
            f"(baseline {100 * base[metric]:.2f}%), MACs {base['macs'] / entry['macs']:.2f}x fewer, "
            f"size {entry['size_mb']:.1f} MB, latency b{batch} {schedule.runtime} {after['ms']:.2f} ms ({speed})")
