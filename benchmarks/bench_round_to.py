"""Does rounding channel counts pay on this device? The demo network pruned to the same MACs target
with round_to 1 and 8 (l1 criterion, default normalisation, classifier kept), timed in turns.

    python benchmarks/bench_round_to.py --macs 4.5 --repeats 3 [--device cuda]

Needs the demo's transferred network (run `filterprune demo` once to cache it).
"""

from __future__ import annotations

import argparse
import copy

import torch

import filterprune as fp
from filterprune.recipes.demo import cached_transferred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--macs", type=float, default=4.5, help="MACs reduction factor asked of both")
    parser.add_argument("--round-to", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    base = cached_transferred()
    x = torch.randn(1, 3, 32, 32)
    models = {"unpruned": base}
    for r in args.round_to:
        model = copy.deepcopy(base)
        pruner = fp.Pruner(model, x, criterion="l1", round_to=r, ignore=[model.classifier[i] for i in (0, 3, 6)])
        result = pruner.prune(macs=args.macs)
        models[f"round_to={r}"] = model
        print(f"round_to={r}: {result.macs_before / result.macs_after:.2f}x fewer MACs, channels {[g.size for g in pruner.groups]}")
    print("\n| repeat | model | MMACs | batch 1 ms (IQR) | batch 64 ms (IQR) | batch-64 ms per GMAC |")
    print("|---|---|---|---|---|---|")
    for rep in range(args.repeats):  # models take turns, so a change in load hits all of them
        for name, model in models.items():
            p = fp.profile(model, x, batch_sizes=(1, 64), device=args.device, min_run_time=1.0)
            print(f"| {rep} | {name} | {p.macs / 1e6:.2f} | {p.latency_ms[1]:.3f} ({p.latency_iqr_ms[1]:.3f}) | "
                  f"{p.latency_ms[64]:.2f} ({p.latency_iqr_ms[64]:.2f}) | {p.latency_ms[64] / (64 * p.macs / 1e9):.1f} |")


if __name__ == "__main__":
    main()
