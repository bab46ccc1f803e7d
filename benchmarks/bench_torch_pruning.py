"""filterprune beside Torch-Pruning: the demo's network pruned to the same MACs with the same fine-tuning.

    pip install torch-pruning          # optional; the library never imports it
    filterprune demo                   # once: caches the transferred network this starts from
    python benchmarks/bench_torch_pruning.py --macs 3 --steps 3 --epochs 3 --final-epochs 3
    python benchmarks/bench_torch_pruning.py --speedup 2.5 --seeds 0 1 2  # to a measured batch-64 speed-up
    python benchmarks/bench_torch_pruning.py --macs 6 --rerank 1.1 --seeds 0 1 2  # ranked afresh every 1.1x, as --speedup is

Five methods, each iterative in the same number of steps: step i prunes until the model has
base / macs^(i/steps) MACs (measured the same way for all, filterprune.profile), or with
--speedup until its measured latency is speedup^(i/steps) times lower, then fine-tunes.

- filterprune taylor / l1: Pruner with its defaults (global ranking, "mean" normalisation), pruned
  with prune(macs=...); "+ distillation": taylor, fine-tuned with 0.5 x the distillation loss from
  the unpruned network (T=4);
  taylor ranks on the 2000 training images without augmentation, as the demo does.
- Torch-Pruning TaylorImportance (|w * dL/dw| per channel, Molchanov 2019) with gradients summed
  over the same 2000 images, and MagnitudeImportance(p=1); both with global_pruning=True and
  TP's default per-group "mean" normaliser, removing ~1/400 of the channels per pruner.step()
  until the MACs target is met (the recipe of TP's own benchmarks).
- Both may prune every conv and both hidden Linear layers; only the last Linear (the two class
  scores) is kept, for both. No rounding of channel counts for either.
- Same fine-tuning for all: SGD (momentum 0.9, weight decay 5e-4), the same learning rate, a
  cosine schedule per step, the demo's augmented training set in the same order.

Writes OUT/seedN/results.json and results.md per seed (OUT/mean.md for several) and prints the tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from filterprune import Pruner, latency_ms, profile
from filterprune.criteria import DATA_CRITERIA
from filterprune.measure import latency
from filterprune.data import make_loader
from filterprune.recipes.demo import DemoConfig, cached_transferred, pair_data
from filterprune.train import evaluate, fine_tune

METHODS = ("filterprune taylor", "filterprune taylor + distillation", "filterprune l1", "Torch-Pruning taylor",
           "Torch-Pruning magnitude (L1)")


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    return profile(model, example, latency=False).macs


def filterprune_to(model: nn.Module, example: torch.Tensor, criterion: str, target: float, rank_loader) -> None:
    """Prune `model` in place with filterprune until it has at most `target` MACs (Pruner.prune(macs=...))."""
    pruner = Pruner(model, example, criterion=criterion, ignore=[model.classifier[6]])
    if criterion in DATA_CRITERIA:  # channels changed since the last ranking
        pruner.rank(rank_loader, F.cross_entropy, progress=False)
    pruner.prune(macs=pruner.macs_at_start / target)


def torch_pruning_to(model: nn.Module, example: torch.Tensor, kind: str, target: float, rank_loader,
                     ignored: list[nn.Module] | None = None) -> None:
    """Prune `model` in place with Torch-Pruning until it has at most `target` MACs; `ignored`: layers
    it keeps (default: the demo network's output layer)."""
    import torch_pruning as tp

    if kind == "taylor":
        importance = tp.importance.TaylorImportance()
        model.eval()  # as filterprune ranks: running BN statistics, no dropout
        model.zero_grad()
        for inputs, targets in rank_loader:
            F.cross_entropy(model(inputs), targets).backward()
    else:
        importance = tp.importance.MagnitudeImportance(p=1)
    pruner = tp.pruner.MetaPruner(model, example, importance=importance, global_pruning=True, pruning_ratio=1.0,
                                  iterative_steps=400,
                                  ignored_layers=ignored if ignored is not None else [model.classifier[6]])
    while count_macs(model, example) > target:
        pruner.step()
    model.zero_grad(set_to_none=True)


def run_method(name: str, base: nn.Module, example: torch.Tensor, sets: dict, args, base_ms: float) -> tuple[nn.Module, float]:
    """Prune a copy of `base` in args.steps steps with fine-tuning; returns it and the wall time.

    Step i ends at base / macs^(i/steps) MACs, or with --speedup once the measured latency at
    --latency-batch is speedup^(i/steps) times lower than the unpruned model's (`base_ms`)."""
    torch.manual_seed(args.seed)
    model = copy.deepcopy(base)
    train_loader = make_loader(sets["train"], args.batch_size, shuffle=True, seed=args.seed)
    rank_loader = make_loader(sets["ranking"], 100, shuffle=False)
    base_macs = count_macs(model, example)
    teacher = copy.deepcopy(base).eval().requires_grad_(False) if "distillation" in name else None
    x = example.expand(args.latency_batch, *example.shape[1:]).contiguous()

    def prune_to(macs: float) -> None:
        if name.startswith("filterprune"):
            filterprune_to(model, example, "l1" if "l1" in name else "taylor", macs, rank_loader)
        else:
            torch_pruning_to(model, example, "taylor" if "taylor" in name else "magnitude", macs, rank_loader)

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        if args.speedup is None:  # with --rerank: in sub-steps of that MACs factor, each ranked afresh
            goal = base_macs / args.macs ** (step / args.steps)
            while count_macs(model, example) > goal:
                prune_to(max(goal, count_macs(model, example) / args.rerank) if args.rerank else goal)
        else:  # MACs steps of 1.1x until the measured speed-up of this step is reached
            while base_ms / latency_ms(model, x, min_run_time=0.5) < args.speedup ** (step / args.steps):
                prune_to(count_macs(model, example) / 1.1)
        fine_tune(model, train_loader, args.epochs, args.lr, "sgd", 5e-4, progress=False, desc=name, teacher=teacher,
                  distill=args.distill if teacher is not None else 0.0)
        print(f"  {name}: step {step}, {base_macs / count_macs(model, example):.2f}x fewer MACs", flush=True)
    fine_tune(model, train_loader, args.final_epochs, args.lr, "sgd", 5e-4, progress=False, desc=name, teacher=teacher,
              distill=args.distill if teacher is not None else 0.0)
    return model, time.perf_counter() - start


def widths(model: nn.Module) -> dict[str, int]:
    return {n: getattr(m, "out_channels", getattr(m, "out_features", 0)) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def measure(models: dict[str, nn.Module], example: torch.Tensor, test_loader, rounds: int = 2) -> dict[str, dict]:
    """Accuracy on the test set and cost; latency is the lowest of `rounds` medians, the models
    taking turns, so that load from other processes hits them alike."""
    rows = {name: {"accuracy": evaluate(m, test_loader, progress=False)["accuracy"]} for name, m in models.items()}
    for _ in range(rounds):
        for name, model in models.items():
            prof = profile(model, example, batch_sizes=(1, 64), min_run_time=1.0).as_dict()
            row = rows[name]
            for b in (1, 64):
                row[f"latency_ms_b{b}"] = min(row.get(f"latency_ms_b{b}", float("inf")), latency(prof, b)["ms"])
            row.update({k: prof[k] for k in ("macs", "params", "size_mb", "threads", "device", "dtype")})
    return rows


def table(rows: dict[str, dict]) -> str:
    base = rows["unpruned"]
    lines = ["| method | test accuracy (2000) | MACs | params | MB | latency b1 (ms) | latency b64 (ms) | pruning run (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        wall = f"{r['wall_s']:.0f}" if "wall_s" in r else "–"
        lines.append(f"| {name} | {100 * r['accuracy']:.2f}% | {r['macs'] / 1e6:.2f} M ({base['macs'] / r['macs']:.2f}x) | "
                     f"{r['params'] / 1e6:.2f} M | {r['size_mb']:.1f} | {r['latency_ms_b1']:.2f} | {r['latency_ms_b64']:.1f} | {wall} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--macs", type=float, default=3.0, help="MACs reduction target (default 3x fewer)")
    parser.add_argument("--speedup", type=float, help="instead of --macs: measured latency reduction at --latency-batch")
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--rerank", type=float, help="with --macs: rank afresh after every cut of this MACs factor (e.g. 1.1, as "
                                                     "--speedup does), instead of once per step")
    parser.add_argument("--distill", type=float, default=0.5, help="distillation weight of the '+ distillation' method (T=4)")
    parser.add_argument("--steps", type=int, default=3, help="pruning steps, each followed by fine-tuning")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs after each step")
    parser.add_argument("--final-epochs", type=int, default=3, help="fine-tuning epochs after the last step")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="each seed a whole run; more than one adds a mean table")
    parser.add_argument("--out", default="runs/bench_torch_pruning")
    args = parser.parse_args()

    config = DemoConfig()
    base = cached_transferred(config)
    sets = pair_data(config)
    example = sets["test"][0][0].unsqueeze(0)
    per_seed = {seed: run_seed(args, seed, base, sets, example) for seed in args.seeds}
    if len(per_seed) > 1:
        text = mean_table(per_seed)
        print(f"\n{text}")
        (Path(args.out) / "mean.md").write_text(text + "\n")


def run_seed(args, seed: int, base: nn.Module, sets: dict, example: torch.Tensor) -> dict[str, dict]:
    args.seed = seed
    goal = (f"a {args.speedup}x lower measured batch-{args.latency_batch} latency" if args.speedup else f"{args.macs}x fewer MACs"
            + (f", ranked afresh every {args.rerank}x" if args.rerank else ""))
    budget = (f"budget per method, seed {seed}: {args.steps} steps to {goal}, {args.epochs} epochs after each and "
              f"{args.final_epochs} at the end (SGD momentum 0.9, lr {args.lr}, weight decay 5e-4, cosine per step, "
              f"batch {args.batch_size}, {len(sets['train'])} augmented training images)")
    print(budget, flush=True)
    models, walls = {"unpruned": base}, {}
    x = example.expand(args.latency_batch, *example.shape[1:]).contiguous()
    base_ms = min(latency_ms(base, x, min_run_time=1.0) for _ in range(2))
    for name in args.methods:
        models[name], walls[name] = run_method(name, base, example, sets, args, base_ms)
    rows = measure(models, example, make_loader(sets["test"], 500, shuffle=False))
    for name, wall in walls.items():
        rows[name].update(wall_s=round(wall, 1), channels=widths(models[name]))
    text = table(rows)
    device = rows["unpruned"]
    note = (f"Latency: {device['device']}, {device['dtype']}, {device['threads']} threads, lowest of 2 medians "
            "(torch.utils.benchmark); MACs from torch's FlopCounterMode / 2.")
    print(f"\n{text}\n\n{note}")
    out = Path(args.out) / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"budget": budget, "args": vars(args), "rows": rows}, indent=2))
    (out / "results.md").write_text(f"{budget}\n\n{text}\n\n{note}\n")
    return rows


def mean_table(per_seed: dict[int, dict[str, dict]]) -> str:
    """Per method: test accuracy (mean and per seed), MACs and latency factors against the unpruned model (means)."""
    seeds = sorted(per_seed)
    lines = [f"| method | test accuracy, mean of seeds {', '.join(map(str, seeds))} | per seed | MACs fewer | "
             "batch 1 speed-up | batch 64 speed-up |", "|---|---|---|---|---|---|"]
    for name in per_seed[seeds[0]]:
        rows = [per_seed[s][name] for s in seeds]
        bases = [per_seed[s]["unpruned"] for s in seeds]
        acc = [100 * r["accuracy"] for r in rows]
        factor = lambda key: sum(b[key] / r[key] for b, r in zip(bases, rows)) / len(rows)  # noqa: E731
        lines.append(f"| {name} | {sum(acc) / len(acc):.2f}% | {' / '.join(f'{a:.2f}' for a in acc)} | {factor('macs'):.2f}x | "
                     f"{factor('latency_ms_b1'):.2f}x | {factor('latency_ms_b64'):.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
