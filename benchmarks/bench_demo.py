"""The demo, several seeds: what `filterprune demo` gives, with its spread.

    python benchmarks/bench_demo.py --seeds 0 1 2 [--set final_epochs=24 --set distill=0.5] [--out runs/bench_demo] [--reuse]

Each seed is a whole demo run (its own pretraining, transfer, control and pruning; cached
pretraining is reused). Prints one row per seed and the mean: test accuracy of the baseline, the
control (the unpruned network fine-tuned as many epochs as pruning adds) and the pruned network,
the pruned network against the control on the test and validation images, MACs, size, measured
speed-ups at batch 1 and 64, and wall time. The demo chooses nothing on the test images.
`--set FIELD=VALUE` overrides a DemoConfig field (a recipe on trial).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from filterprune.recipes.demo import TARGETS, DemoConfig, run_demo
from filterprune.report import speed_vs_baseline
from filterprune.schedule import speedup


def overridden(item: str) -> tuple[str, object]:
    """'final_epochs=24' -> ('final_epochs', 24), typed like DemoConfig's default for that field;
    'ignore=classifier.6' -> a tuple (comma-separated), 'min_channels=classifier.0:128' -> a dict."""
    key, _, value = item.partition("=")
    defaults = {f.name: getattr(DemoConfig(), f.name) for f in dataclasses.fields(DemoConfig)}
    if key not in defaults or not value:
        raise SystemExit(f"--set {item!r}: give FIELD=VALUE with one of {', '.join(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
        return key, value.lower() in ("1", "true", "yes")
    if isinstance(default, tuple):
        return key, tuple(value.split(","))
    if isinstance(default, dict):
        return key, {name: int(n) for name, _, n in (pair.partition(":") for pair in value.split(","))}
    return key, type(default)(value) if isinstance(default, (int, float, str)) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a DemoConfig field")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--out", default="runs/bench_demo")
    parser.add_argument("--reuse", action="store_true", help="a seed whose OUT/seedN/report.json exists is read, not run again")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = dict(overridden(item) for item in args.set)
    rows, numbers = [], []
    for seed in args.seeds:
        config = DemoConfig(seed=seed, **overrides)
        done = Path(args.out) / f"seed{seed}" / "report.json"
        if args.reuse and done.is_file():
            report = json.loads(done.read_text())
        else:
            report = run_demo(done.parent, config, progress=False, log=lambda line: None)
        base, control, pruned = report["baseline"], report["control"], report["pruned"]
        speeds = [speed_vs_baseline(base, pruned, b) for b in (1, 64)]
        n = {"baseline": 100 * base["accuracy"], "control": 100 * control["accuracy"], "pruned": 100 * pruned["accuracy"],
             "vs control": 100 * (pruned["accuracy"] - control["accuracy"]),
             "val vs control": 100 * (pruned["val_accuracy"] - control["val_accuracy"]),
             "macs": base["macs"] / pruned["macs"], "size": base["size_mb"] / pruned["size_mb"],
             **{f"b{b}": speedup(base, pruned, b, "eager") for b in (1, 64)},
             "wall": report["wall_s"] / 60}
        numbers.append(n)
        rows.append([str(seed), *(f"{n[k]:.2f}" for k in ("baseline", "control", "pruned")), f"{n['vs control']:+.2f}",
                     f"{n['val vs control']:+.2f}", f"{n['macs']:.2f}x", f"{n['size']:.2f}x", speeds[0], speeds[1], f"{n['wall']:.1f}"])
        print(" | ".join(rows[-1]), flush=True)
    mean = {k: statistics.mean(n[k] for n in numbers) for k in numbers[0]}
    rows.append(["mean", *(f"{mean[k]:.2f}" for k in ("baseline", "control", "pruned")), f"{mean['vs control']:+.2f}",
                 f"{mean['val vs control']:+.2f}", f"{mean['macs']:.2f}x", f"{mean['size']:.2f}x", f"{mean['b1']:.2f}x faster",
                 f"{mean['b64']:.2f}x faster", f"{mean['wall']:.1f}"])
    header = ["seed", "baseline %", "control %", "pruned %", "pruned - control (test)", "pruned - control (val)", "MACs fewer",
              "smaller", "batch 1", "batch 64", "minutes"]
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; overrides: {overrides or 'none'}; targets: {TARGETS}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
