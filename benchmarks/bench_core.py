"""Core costs of filterprune, measured on this machine, printed as one table.

    python benchmarks/bench_core.py [--threads N] [--device cpu|cuda] [--quick]

1. Graph and pruning: time to build the channel graph (Pruner construction) of resnet50 at
   224x224 and to prune 30% of its channels (criterion l1), with verify=True and verify=False;
   verification's cost is their difference (end to end, so as noisy as the two timings). Then
   construction with each front end, torch.fx and torch.export (section "frontends").
2. rank() per batch with criterion taylor, relative to a plain forward + backward of the same batch
   (target: at most 1.3x).
3. VGG16 with 50% of every conv layer's channels removed: MACs reduction against measured latency
   reduction, at batch 1 and batch 64 (target: latency reduction / MACs reduction >= 0.8).

Models have random weights: none of these costs depends on the weights' values. Every timing is a
median with its interquartile range (filterprune.measure.time_ms: torch.utils.benchmark, warmed up,
synchronised on CUDA), and every speed claim goes through filterprune.speed_change, which says "no
measurable change" inside the noise. On a GPU, batch 1 is launch-bound: judge batch 64.
Public API only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torchvision
from torch import nn

import filterprune as fp
from filterprune.measure import latency_spread_ms, launch_note, time_ms

ROWS: list[tuple[str, str, str, str]] = []  # section, quantity, value, unit


def row(section: str, quantity: str, value, unit: str = "") -> None:
    ROWS.append((section, quantity, f"{value:.3f}" if isinstance(value, float) else str(value), unit))
    print(f"  {quantity}: {ROWS[-1][2]} {unit}", flush=True)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def spread(median_iqr: tuple[float, float]) -> str:
    return f"{median_iqr[0]:.2f} (IQR {median_iqr[1]:.2f})"


def total_channels(pruner: fp.Pruner) -> int:
    return sum(g.size for g in pruner.groups)


# ---- 1. graph and pruning ----------------------------------------------------------------------------


def bench_graph_and_prune(size: int) -> None:
    section = "resnet50 graph+prune"
    print(f"[{section}] {size}x{size} example input, criterion l1, 30% of prunable channels", flush=True)
    example = torch.randn(1, 3, size, size)
    prune_s = {}
    for verify in (True, False):
        torch.manual_seed(0)
        model = torchvision.models.resnet50().eval()
        holder = {}
        build = seconds(lambda: holder.setdefault("p", fp.Pruner(model, example, criterion="l1", verify=verify)))
        pruner = holder["p"]
        n = int(0.3 * total_channels(pruner))
        prune_s[verify] = seconds(lambda: holder.setdefault("r", pruner.prune(n)))
        tag = "verify=True" if verify else "verify=False"
        if verify:
            row(section, "groups / prunable channels", f"{len(pruner.groups)} / {n / 0.3:.0f}")
            row(section, "channels removed", holder["r"].count)
        row(section, f"build graph (Pruner construction), {tag}", build, "s")
        row(section, f"prune 30% (select+cut+check+retrace), {tag}", prune_s[verify], "s")
    cost = prune_s[True] - prune_s[False]
    row(section, "verification: difference of the two", cost, "s")
    row(section, "  verification share of prune", 100 * cost / prune_s[True], "%")


def bench_frontends(size: int, repeats: int = 3) -> None:
    """Pruner construction with torch.fx (the front end before torch.export came) and with
    torch.export (export, ATen label run, probe of every group, MACs); target: at most 2x."""
    section = "resnet50 front ends"
    print(f"[{section}] Pruner construction at {size}x{size}, criterion l1, median of {repeats}", flush=True)
    example = torch.randn(1, 3, size, size)
    model = torchvision.models.resnet50().eval()
    median = {}
    for frontend in ("fx", "export"):
        times = sorted(seconds(lambda: fp.Pruner(model, example, criterion="l1", frontend=frontend)) for _ in range(repeats))
        median[frontend] = times[len(times) // 2]
        row(section, f"Pruner construction, frontend={frontend} (min..max {times[0]:.2f}..{times[-1]:.2f})",
            median[frontend], "s")
    ratio = median["export"] / median["fx"]
    row(section, "export / fx (target <= 2)", ratio, f"x  {'MET' if ratio <= 2 else 'NOT MET'}")


# ---- 2. rank() overhead ----------------------------------------------------------------------------------


def bench_rank(arch: str, batch: int, size: int, min_run_time: float, device: str) -> None:
    section = "rank() overhead"
    print(f"[{section}] {arch}, batch {batch} at {size}x{size}, criterion taylor, on {device}", flush=True)
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=10).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    pruner = fp.Pruner(model, x[:1], criterion="taylor", ignore=[model.fc])

    def plain():  # what a training step costs, without the optimizer: eval mode, like rank()
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def ranking():
        pruner.rank([(x, y)], loss_fn, progress=False)

    base, ranked = time_ms(plain, min_run_time=min_run_time), time_ms(ranking, min_run_time=min_run_time)
    row(section, "plain forward+backward, median (IQR)", spread(base), "ms/batch")
    row(section, "rank() taylor, median (IQR)", spread(ranked), "ms/batch")
    ratio = ranked[0] / base[0]
    row(section, "ratio rank / plain (target <= 1.3)", ratio, f"x  {'MET' if ratio <= 1.3 else 'NOT MET'}")
    row(section, "rank() against plain", fp.speed_change(base[0], ranked[0], base[1], ranked[1]))


# ---- 3. VGG16: MACs vs latency -------------------------------------------------------------------------------


def bench_vgg(cases: list[tuple[int, int]], min_run_time: float, device: str) -> None:
    section = "vgg16 50% conv channels"
    print(f"[{section}] 50% of every conv layer's channels (scope=layer), criterion l1, 1000 classes", flush=True)
    torch.manual_seed(0)
    dense = torchvision.models.vgg16().eval()
    pruned = torchvision.models.vgg16().eval()
    pruned.load_state_dict(dense.state_dict())
    # Only conv channels: the classifier's hidden Linear layers keep their 4096 outputs.
    pruner = fp.Pruner(pruned, torch.randn(1, 3, 64, 64), criterion="l1", scope="layer",
                       ignore=[pruned.classifier[0], pruned.classifier[3]])
    before = total_channels(pruner)
    pruner.prune(before // 2)
    row(section, "conv channels before -> after", f"{before} -> {total_channels(pruner)}")
    for batch, size in cases:
        example = torch.randn(1, 3, size, size)
        macs = [fp.profile(m, example, latency=False).macs for m in (dense, pruned)]
        x = torch.randn(batch, 3, size, size)
        times = [latency_spread_ms(m, x, device=device, min_run_time=min_run_time) for m in (dense, pruned)]
        macs_cut, latency_cut = 1 - macs[1] / macs[0], 1 - times[1][0] / times[0][0]
        tag = f"b{batch} @{size}x{size}"
        row(section, f"{tag} MACs/example dense -> pruned", f"{macs[0] / 1e9:.3f} -> {macs[1] / 1e9:.3f}", "GMACs")
        row(section, f"{tag} latency dense -> pruned, median (IQR)", f"{spread(times[0])} -> {spread(times[1])}", "ms/batch")
        row(section, f"{tag} MACs speed-up", f"{macs[0] / macs[1]:.2f}", "x")
        note = launch_note(device, batch)
        row(section, f"{tag} measured", fp.speed_change(times[0][0], times[1][0], times[0][1], times[1][1]),
            f"({note})" if note else "")
        ratio = latency_cut / macs_cut
        row(section, f"{tag} latency cut / MACs cut (target >= 0.8)", ratio, "MET" if ratio >= 0.8 else "NOT MET")


# ---- main -------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="for sections 2 and 3; graph building always runs on the CPU")
    parser.add_argument("--rank-arch", default="resnet18")
    parser.add_argument("--rank-batch", type=int, default=32)
    parser.add_argument("--rank-size", type=int, default=128, help="224 takes ~15 s a batch on 2 loaded cores")
    parser.add_argument("--graph-size", type=int, default=224, help="example input side for section 1")
    parser.add_argument("--b64-size", type=int, default=32, help="input side for the batch-64 latency row")
    parser.add_argument("--b1-size", type=int, default=224, help="input side for the batch-1 latency row")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per blocked_autorange")
    parser.add_argument("--skip", nargs="*", default=[], choices=["graph", "frontends", "rank", "vgg"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if "graph" not in args.skip:
        bench_graph_and_prune(args.graph_size)
    if "frontends" not in args.skip:
        bench_frontends(args.graph_size)
    if "rank" not in args.skip:
        bench_rank(args.rank_arch, args.rank_batch, args.rank_size, args.min_run_time, args.device)
    if "vgg" not in args.skip:
        bench_vgg([(1, args.b1_size), (64, args.b64_size)], args.min_run_time, args.device)
    print_table(args, time.perf_counter() - started)


def print_table(args, elapsed: float) -> None:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else (os.uname().machine + " CPU")
    print()
    print(f"command: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {args.device} ({device}), "
          f"dtype float32, threads {torch.get_num_threads()}, cpu cores {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f} (at end), total {elapsed:.0f} s")
    widths = [max(len(r[i]) for r in ROWS) for i in range(4)]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    print(line)
    for r in ROWS:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")
    print(line)


if __name__ == "__main__":
    main()
