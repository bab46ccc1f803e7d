"""Which score normalisation buys the most speed: MACs and latency after removing a share of channels.

For each `normalize` option of filterprune.Pruner, with the l1 criterion (weights only, no data),
global scope and every nn.Linear ignored (the classifier keeps its hidden units), remove a share of
the channels of random-weight torchvision models and print the MACs factor (unpruned / pruned,
per example, torch.utils.flop_counter) and the measured batch-1 speed change (filterprune.speed_change:
"no measurable change" inside the timings' spreads) as a markdown table.

    python benchmarks/bench_policy.py --size 64 --share 0.3 [--no-latency] [--models resnet18 ...]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torchvision
from torch import nn

import filterprune as fp
from filterprune.measure import latency_spread_ms
from filterprune.pruner import NORMALIZE

MODELS = [
    "vgg16_bn", "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "efficientnet_b0",
    "googlenet", "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_x_400mf", "resnet34", "vgg11_bn", "alexnet",
]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def run(name: str, normalize: str, size: int, share: float, latency: bool, threads: int) -> dict:
    model = build(name)
    x = torch.randn(1, 3, size, size)
    before = latency_spread_ms(model, x, threads=threads, min_run_time=0.3) if latency else (math.nan, 0.0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    pruner = fp.Pruner(model, x, criterion="l1", normalize=normalize, ignore=linears, round_to=1)
    result = pruner.prune(ratio=share)
    after = latency_spread_ms(model, x, threads=threads, min_run_time=0.3) if latency else (math.nan, 0.0)
    said = fp.speed_change(before[0], after[0], before[1], after[1]) if latency else ""
    return {"macs": result.macs_before / result.macs_after, "latency": before[0] / after[0], "said": said}


def factor(value: float) -> str:
    """A factor unpruned / pruned as words: '1.41x' (fewer / faster) or '1.15x slower'."""
    return f"{value:.2f}x" if value >= 1 else f"{1 / value:.2f}x slower"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--share", type=float, default=0.3, help="share of the channels to remove")
    parser.add_argument("--no-latency", action="store_true", help="MACs only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--normalize", nargs="+", default=list(NORMALIZE))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {(m, n): run(m, n, args.size, args.share, not args.no_latency, args.threads)
               for m in args.models for n in args.normalize}
    heads = [f"{n} MACs" for n in args.normalize] + ([] if args.no_latency else [f"{n} b1" for n in args.normalize])
    print(f"\n{args.share:.0%} of the channels removed (l1, global, Linear layers ignored), {args.size}x{args.size}, "
          f"CPU {args.threads} threads; factor = unpruned / pruned\n")
    print("| model | " + " | ".join(heads) + " |")
    print("|---|" + "---:|" * len(heads))
    keys = ["macs"] + ([] if args.no_latency else ["latency"])
    for m in args.models:  # latency cells: speed_change's words (within the timings' spreads: no measurable change)
        cells = [f"{results[m, n]['macs']:.2f}x" for n in args.normalize]
        cells += [] if args.no_latency else [results[m, n]["said"] for n in args.normalize]
        print(f"| {m} | " + " | ".join(cells) + " |")
    geo = [math.exp(sum(math.log(results[m, n][k]) for m in args.models) / len(args.models))
           for k in keys for n in args.normalize]
    print("| geometric mean | " + " | ".join(factor(g) for g in geo) + " |")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
