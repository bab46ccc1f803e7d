"""The demo's speed-ups at 1 and at 2 threads: baseline against pruned, batch 1 and 64.

    python benchmarks/bench_threads.py runs/bench_demo/seed0 runs/bench_demo/seed1 ...

Each directory is a `filterprune demo` output (baseline.safetensors, pruned.safetensors). The two
models are timed as the demo times them (recipes.demo.costs_in_turns: in turns, 5 rounds, each
keeping its lowest median with that timing's IQR), at each thread count, on inputs of the run's
image size (its report.json). Each speed-up is given twice: the median of the rounds' paired
ratios (report.speed_vs_baseline, as the loop and the report judge it) and the ratio of the two
lowest times through speed_change (inside the spreads: no measurable change). On a 2-core machine
a 2-thread timing shares both cores with everything else that runs; a 1-thread one leaves a core
free.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import filterprune as fp
from filterprune.measure import latency
from filterprune.recipes.demo import costs_in_turns
from filterprune.report import speed_vs_baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="demo output directories")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print("| run | threads | batch 1 ms: baseline -> pruned | batch 1 (paired / lowests) | batch 64 ms: baseline -> pruned | "
          "batch 64 (paired / lowests) |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        models = {k: fp.load(f"{run}/{k}.safetensors") for k in ("baseline", "pruned")}
        config = json.loads(Path(run, "report.json").read_text())["config"]
        size = config.get("image_size", config.get("size"))  # the demo's name, and the CLI's
        for threads in args.threads:
            costs = costs_in_turns(models, torch.randn(1, 3, size, size), args.rounds, threads)
            cells = []
            for b in (1, 64):
                (t0, s0), (t1, s1) = ((latency(costs[k], b)["ms"], latency(costs[k], b)["iqr_ms"]) for k in ("baseline", "pruned"))
                cells += [f"{t0:.2f} ({s0:.2f}) -> {t1:.2f} ({s1:.2f})",
                          f"{speed_vs_baseline(costs['baseline'], costs['pruned'], b)} / {fp.speed_change(t0, t1, s0, s1)}"]
            print(f"| {run} | {threads} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
