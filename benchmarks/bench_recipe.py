"""Which recipe keeps accuracy: normalisation, distillation and epochs, at equal MACs, on the demo task.

Starts from the demo's transferred network (run `filterprune demo` once to cache it), prunes it
with `taylor` in MACs steps (each iteration cuts MACs by target**(1/steps)), fine-tunes between
steps and at the end, and prints the accuracy on the demo's VALIDATION images (training-split
images never trained on): recipes are chosen there, never on the test images. The control is the
unpruned network fine-tuned for the same number of extra epochs.

    python benchmarks/bench_recipe.py --recipes l2:0 mean:0 macs:0 none:0 l2:0.5 --target 4.5 --steps 3 \
        --epochs 3 --final-epochs 3 --seeds 0

A recipe is NORMALIZE:DISTILL (DISTILL: the weight of distillation from the unpruned network).
The seed changes the fine-tuning order and augmentation (the network pruned is the same).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import filterprune as fp
from filterprune.data import make_loader
from filterprune.recipes.demo import DemoConfig, cached_transferred, pair_data
from filterprune.train import evaluate, fine_tune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["l2:0", "mean:0", "macs:0", "none:0"])
    parser.add_argument("--target", type=float, default=4.5, help="MACs reduction factor")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of fine-tuning after each step")
    parser.add_argument("--final-epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 lets two runs share 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = DemoConfig()
    base = cached_transferred(config)
    sets = pair_data(config)
    rank_loader = make_loader(sets["ranking"], 100, shuffle=False)
    val_loader = make_loader(sets["val"], 500, shuffle=False)
    x = sets["val"][0][0].unsqueeze(0)
    extra = args.steps * args.epochs + args.final_epochs
    results: dict[str, list[float]] = {"control": [], **{r: [] for r in args.recipes}}
    macs: dict[str, list[float]] = {r: [] for r in args.recipes}
    print(f"baseline: {100 * evaluate(base, val_loader, progress=False)['accuracy']:.2f}% on {len(sets['val'])} "
          f"validation images; {args.steps} steps to {args.target}x fewer MACs, {args.epochs} epochs each, "
          f"{args.final_epochs} final; control: {extra} epochs", flush=True)
    for seed in args.seeds:
        train_loader = make_loader(sets["train"], config.batch_size, shuffle=True, seed=seed)
        control = copy.deepcopy(base)
        torch.manual_seed(seed + 1)
        fine_tune(control, train_loader, extra, config.lr, "sgd", 5e-4, progress=False)
        results["control"].append(100 * evaluate(control, val_loader, progress=False)["accuracy"])
        for recipe in args.recipes:
            normalize, distill = recipe.split(":")
            schedule = fp.Schedule(criterion="taylor", normalize=normalize, distill=float(distill),
                                   macs_step=args.target ** (1 / args.steps), max_iterations=args.steps,
                                   epochs=args.epochs, final_epochs=args.final_epochs, lr=config.lr, weight_decay=5e-4,
                                   seed=seed)
            start = time.perf_counter()
            model, log = fp.prune_iteratively(copy.deepcopy(base), x, train_loader, val_loader, schedule,
                                              rank_loader=rank_loader, ignore=list(config.ignore), progress=False,
                                              log_fn=lambda line: None)
            results[recipe].append(100 * log["final"]["accuracy"])
            macs[recipe].append(log["baseline"]["macs"] / log["final"]["macs"])
            print(f"seed {seed} {recipe}: {results[recipe][-1]:.2f}% at {macs[recipe][-1]:.2f}x fewer MACs "
                  f"({time.perf_counter() - start:.0f} s); control {results['control'][-1]:.2f}%", flush=True)

    print("\n| recipe (normalize:distill) | validation accuracy, mean | per seed | vs control | MACs |")
    print("|---|---|---|---|---|")
    control = statistics.mean(results["control"])
    for name, values in results.items():
        mean = statistics.mean(values)
        factor = f"{statistics.mean(macs[name]):.2f}x fewer" if name in macs else "1.00x"
        print(f"| {name} | {mean:.2f}% | {' / '.join(f'{v:.2f}' for v in values)} | {mean - control:+.2f} points | {factor} |")


if __name__ == "__main__":
    main()
