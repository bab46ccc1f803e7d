"""The iterative loop of 1611.06440: rank, remove the lowest channels, fine-tune, evaluate, repeat.

Each iteration is logged and checkpointed (model + state, written atomically), and starts from
a seed derived from its number, so a run resumed from iteration k's checkpoint continues exactly
as the uninterrupted run would have.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from . import io
from .criteria import DATA_CRITERIA
from .measure import latency_ms, profile
from .pruner import Pruner
from .surgery import remove_units
from .train import evaluate, fine_tune


@dataclass
class Schedule:
    """How to prune: step size, fine-tuning between steps, and when to stop.

    step: units removed per iteration, a count (>= 1) or a fraction of the original units (the
    blog: 512 of VGG16's 4224 filters, 0.12). Stops at the first target met: target_macs (MACs
    reduction factor), target_speedup (measured latency at batch latency_batch), target_size
    (size on disk reduction), max_iterations, or max_accuracy_drop (percentage points on the
    evaluation data: the last model within it is kept). latency_aware: measure what each group's
    channels cost in time on this device and use that in place of MACs in the regularisation.
    """

    criterion: str = "taylor"
    step: float = 0.12
    epochs: int = 10
    final_epochs: int = 0
    max_iterations: int | None = 5
    target_macs: float | None = None
    target_speedup: float | None = None
    target_size: float | None = None
    max_accuracy_drop: float | None = None
    lr: float = 1e-3
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    flops_lambda: float = 0.0
    latency_aware: bool = False
    latency_batch: int = 1
    round_to: int = 1
    min_channels: int | dict = 1
    rank_batches: int | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or from a different run."""


def _measure(model: nn.Module, example: torch.Tensor, evaluation: dict, batch: int, device: str) -> dict:
    prof = profile(model, example, batch_sizes=(batch,), device=device, min_run_time=0.3).as_dict()
    return {**evaluation, **{k: prof[k] for k in ("params", "size_mb", "macs", f"latency_ms_b{batch}", "device", "dtype", "threads")}}


def _on_main(fn: Callable):
    """fn() in rank 0 only, its result in every process of a torch.distributed run: measured latency
    (and accuracy, BN statistics being per process) would differ, and decisions must not."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return fn()
    box = [fn() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def measured_unit_cost(pruner: Pruner, batch: int = 1, device: str = "cpu", share: float = 0.25) -> torch.Tensor:
    """Milliseconds each unit costs on this device: prune `share` of one group at a time from a copy
    and time it. Scaled so the total equals the MACs total (in MMACs): only the spread changes,
    and flops_lambda keeps its meaning."""
    example = pruner.example_inputs[0][:1].expand(batch, *pruner.example_inputs[0].shape[1:]).contiguous()
    base = latency_ms(pruner.model, example, device=device, min_run_time=0.3)
    cost = torch.zeros(pruner.graph.num_units, dtype=torch.float64)
    for group in pruner.groups:
        k = max(1, int(group.size * share))
        if group.size - k < 1:
            continue
        trial = copy.deepcopy(pruner.model)
        remove = torch.zeros(pruner.graph.num_units, dtype=torch.bool)
        remove[group.offset:group.offset + k] = True
        remove_units(trial, pruner.graph, remove)
        saved = base - latency_ms(trial, example, device=device, min_run_time=0.3)
        cost[group.offset:group.offset + group.size] = max(saved, 0.0) / k
    macs = pruner.graph.unit_cost() / 1e6
    return cost * (macs.sum() / cost.sum()) if cost.sum() > 0 else macs


def _seed(schedule: Schedule, iteration: int, loaders: Iterable) -> None:
    torch.manual_seed(schedule.seed * 100_003 + iteration)
    for loader in loaders:
        generator = getattr(loader, "generator", None)
        if generator is not None:
            generator.manual_seed(schedule.seed * 100_003 + iteration)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(folder: Path, model: nn.Module, log: dict, iteration: int) -> None:
    """Model first, then the state that names it: a crash between the two leaves the old pair intact."""
    folder.mkdir(parents=True, exist_ok=True)
    model_file = folder / f"model-{iteration:03d}.safetensors"
    io.save(model, model_file)
    _write_json(folder / "state.json", {"iteration": iteration, "model": model_file.name, "sha256": _sha256(model_file), "log": log})
    for old in folder.glob("model-*.safetensors"):
        if old != model_file:
            old.unlink()
    for stale in folder.glob(".model-*"):  # temporary files of a write that was killed
        stale.unlink(missing_ok=True)


def load_checkpoint(folder: Path) -> tuple[nn.Module, dict, int]:
    """The last finished iteration's model, log and number; damage is reported, never used."""
    state_file = folder / "state.json"
    if not state_file.exists():
        raise CheckpointError(f"no checkpoint in {folder}: start without --resume")
    try:
        state = json.loads(state_file.read_text())
        model_file = folder / state["model"]
        if _sha256(model_file) != state["sha256"]:
            raise CheckpointError(f"checkpoint {model_file} does not match its recorded checksum: it is damaged; "
                                  f"delete it to start over (without --resume)")
        return io.load(model_file), state["log"], state["iteration"]
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise CheckpointError(f"checkpoint in {folder} is damaged ({err}); delete it to start over") from err


def prune_iteratively(
    model: nn.Module,
    example_inputs: torch.Tensor,
    train_loader: Iterable,
    eval_loader: Iterable,
    schedule: Schedule,
    rank_loader: Iterable | None = None,
    ignore: Iterable[str] = (),
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
    log_fn: Callable[[str], None] = print,
    reduce: Callable | None = None,
    is_main: bool = True,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[nn.Module, dict]:
    """Prune `model` by `schedule`; returns the pruned model and the run log.

    ignore: names of modules whose outputs are kept (the classifier). eval_loader decides
    max_accuracy_drop, so it should be validation data, not the final test set.
    reduce / is_main / wrap: for distributed runs (see distributed.py): how to sum statistics
    across processes, whether this process writes files, and how to wrap the model for training.
    """
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    start = time.perf_counter()
    batch = schedule.latency_batch

    def measured() -> dict:  # of the current `model`, taken on rank 0 and shared so every process decides alike
        return _on_main(lambda: _measure(model, example_inputs, evaluate(model, eval_loader, device=device, progress=progress), batch, device))
    if resume and folder is not None:
        model, log, done = load_checkpoint(folder)
        _check_same_run(folder, log.get("schedule", {}), schedule)
        log_fn(f"resumed from {folder} after iteration {done}")
    else:
        check_reachable(model, example_inputs, schedule, ignore)  # fails before any work if it cannot succeed
        baseline = measured()
        log = {"schedule": asdict(schedule), "baseline": baseline, "iterations": [], "stopped": None, "wall_s": 0.0}
        done = 0
    model.to(device)
    base = log["baseline"]
    pruner = _pruner(model, example_inputs, schedule, ignore)
    log.setdefault("original_units", sum(g.size for g in pruner.groups))
    log.setdefault("channels_before", {g.name: g.size for g in pruner.groups})
    step = int(schedule.step if schedule.step >= 1 else round(schedule.step * log["original_units"]))
    if folder is not None and is_main and not resume:  # the unpruned model: a run killed in iteration 1 resumes here
        save_checkpoint(folder, model, log, 0)
    best = None
    iteration = done
    while True:
        stop = _target_reached(schedule, base, log["iterations"][-1] if log["iterations"] else None, iteration)
        if stop:
            log["stopped"] = stop
            break
        iteration += 1
        _seed(schedule, iteration, (train_loader, rank_loader))
        if schedule.max_accuracy_drop is not None:
            best = copy.deepcopy(model)
        if schedule.latency_aware and schedule.flops_lambda:
            cost = _on_main(lambda: measured_unit_cost(pruner, batch, device))
            pruner.unit_cost = lambda _p, cost=cost: cost
        if schedule.criterion in DATA_CRITERIA:
            pruner.rank(rank_loader or train_loader, nn.functional.cross_entropy, device=device,
                        max_batches=schedule.rank_batches, progress=progress, reduce=reduce)
        result = pruner.prune(step)
        if result.count == 0:
            log["stopped"] = "nothing left to remove within the per-layer minimums"
            break
        trained = wrap(model) if wrap else model
        history = fine_tune(trained, train_loader, schedule.epochs, schedule.lr, schedule.optimizer, schedule.weight_decay,
                            device, progress, desc=f"iteration {iteration}")
        train_loss = history[-1]["loss"] if history else None
        if train_loss is not None and reduce is not None:  # the mean over all processes' (equal) shards
            one = torch.ones(1, dtype=torch.float64)
            train_loss = (reduce(one * train_loss) / reduce(one)).item()
        entry = measured()
        entry.update(iteration=iteration, removed=result.count, removed_per_group=result.removed_per_group,
                     channels=result.channels, train_loss=train_loss,
                     wall_s=round(time.perf_counter() - start, 1))
        log["iterations"].append(entry)
        log_fn(_line(entry, base, batch))
        if schedule.max_accuracy_drop is not None and 100 * (base["accuracy"] - entry["accuracy"]) > schedule.max_accuracy_drop:
            model, log["iterations"][-1]["rejected"] = best, True
            log["stopped"] = f"iteration {iteration} lost more than {schedule.max_accuracy_drop} points; kept iteration {iteration - 1}"
            break
        if folder is not None and is_main:
            save_checkpoint(folder, model, log, iteration)
    if schedule.final_epochs:
        _seed(schedule, 10_000, (train_loader,))
        fine_tune(wrap(model) if wrap else model, train_loader, schedule.final_epochs, schedule.lr, schedule.optimizer,
                  schedule.weight_decay, device, progress, desc="final fine-tune")
    log["final"] = measured()
    log["wall_s"] = round(log.get("wall_s", 0.0) + time.perf_counter() - start, 1)
    return model, log


# Options that change what a run computes: a resumed run must use the same ones (targets and the
# number of iterations may change).
_SAME_ON_RESUME = ("criterion", "step", "epochs", "lr", "optimizer", "weight_decay", "flops_lambda", "latency_aware",
                   "latency_batch", "round_to", "min_channels", "rank_batches", "seed")


def _check_same_run(folder: Path, saved: dict, schedule: Schedule) -> None:
    now = asdict(schedule)
    changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in _SAME_ON_RESUME if saved.get(k) != now[k]]
    if changed:
        raise CheckpointError(f"the checkpoint in {folder} was made with other options ({', '.join(changed)}): resume with "
                              "the same options, or start without --resume (or with another output folder)")


def check_reachable(model: nn.Module, example_inputs, schedule: Schedule, ignore: Iterable[str] = ()) -> dict[str, float]:
    """Fail before any training: trace `model` (GraphError if it cannot be), and prune a copy to the per-layer
    minimums; ValueError if schedule.target_macs or target_size asks for more than that reaches.

    Returns the best reachable {"macs": factor, "size": factor} (empty when no such target is set).
    """
    trial = copy.deepcopy(model)
    pruner = Pruner(trial, example_inputs, criterion="l1", ignore=_modules(trial, ignore),
                    min_channels=schedule.min_channels, round_to=schedule.round_to, verify=False)
    if schedule.target_macs is None and schedule.target_size is None:
        return {}
    before = profile(trial, example_inputs, latency=False)
    pruner.prune(pruner.prunable())
    after = profile(trial, example_inputs, latency=False)
    least = schedule.min_channels if isinstance(schedule.min_channels, int) else min(schedule.min_channels.values(), default=1)
    least = -(-max(least, 1) // schedule.round_to) * schedule.round_to
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
                  min_channels=schedule.min_channels, round_to=schedule.round_to, flops_lambda=schedule.flops_lambda,
                  seed=schedule.seed)


def _target_reached(schedule: Schedule, base: dict, last: dict | None, iteration: int) -> str | None:
    if last is not None:
        batch = f"latency_ms_b{schedule.latency_batch}"
        checks = [
            (schedule.target_macs, base["macs"] / last["macs"], "MACs reduction"),
            (schedule.target_speedup, base[batch] / last[batch], "measured speed-up"),
            (schedule.target_size, base["size_mb"] / last["size_mb"], "size reduction"),
        ]
        for target, reached, what in checks:
            if target is not None and reached >= target:
                return f"{what} {reached:.2f}x reached the target {target}x"
    if schedule.max_iterations is not None and iteration >= schedule.max_iterations:
        return f"{iteration} iterations done"
    return None


def _line(entry: dict, base: dict, batch: int) -> str:
    key = f"latency_ms_b{batch}"
    return (f"iteration {entry['iteration']}: removed {entry['removed']}, accuracy {100 * entry['accuracy']:.2f}% "
            f"(baseline {100 * base['accuracy']:.2f}%), MACs {base['macs'] / entry['macs']:.2f}x fewer, "
            f"size {entry['size_mb']:.1f} MB, latency b{batch} {entry[key]:.2f} ms ({base[key] / entry[key]:.2f}x faster)")
