"""Core costs of filterprune, measured on this machine, printed as one table.

    python benchmarks/bench_core.py [--threads N] [--device cpu|cuda] [--quick]

1. Graph and pruning: time to build the channel graph (Pruner construction) of resnet50 at
   224x224 and to prune 30% of its channels (criterion l1), with the share spent in verification.
2. rank() per batch with criterion taylor, relative to a plain forward + backward of the same batch
   (target: at most 1.3x).
3. VGG16 with 50% of every conv layer's channels removed: MACs reduction against measured latency
   reduction, at batch 1 and batch 64 (target: latency reduction / MACs reduction >= 0.8).

Models have random weights: none of these costs depends on the weights' values. Timings on a shared
machine are noisy, so the load average is printed, runs are interleaved and medians reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torchvision
from torch import nn
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

import filterprune as fp

ROWS: list[tuple[str, str, str, str]] = []  # section, quantity, value, unit


def row(section: str, quantity: str, value, unit: str = "") -> None:
    ROWS.append((section, quantity, f"{value:.3f}" if isinstance(value, float) else str(value), unit))
    print(f"  {quantity}: {ROWS[-1][2]} {unit}", flush=True)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def total_channels(pruner: fp.Pruner) -> int:
    return sum(g.size for g in pruner.groups)


# ---- 1. graph and pruning ----------------------------------------------------------------------------


class VerifyClock:
    """Times the pruner's own verification steps (reference outputs and the comparison) in place.

    Wrapping the two methods measures verification directly, which is steadier on a loaded machine
    than subtracting two noisy end-to-end timings; the verify=False run is printed as a cross-check.
    """

    def __init__(self, pruner: fp.Pruner) -> None:
        self.seconds = 0.0
        for name in ("_zeroed_outputs", "_check"):
            method = getattr(pruner, name, None)
            if method is not None:
                setattr(pruner, name, self._timed(method))

    def _timed(self, method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return wrapper


def bench_graph_and_prune() -> None:
    section = "resnet50 graph+prune"
    print(f"[{section}] 224x224 example input, criterion l1, 30% of prunable channels", flush=True)
    example = torch.randn(1, 3, 224, 224)
    for verify in (True, False):
        torch.manual_seed(0)
        model = torchvision.models.resnet50().eval()
        holder = {}
        build = seconds(lambda: holder.setdefault("p", fp.Pruner(model, example, criterion="l1", verify=verify)))
        pruner = holder["p"]
        clock = VerifyClock(pruner)
        n = int(0.3 * total_channels(pruner))
        prune = seconds(lambda: holder.setdefault("r", pruner.prune(n)))
        if verify:
            row(section, "groups / prunable channels", f"{len(pruner.groups)} / {n / 0.3:.0f}")
            row(section, "channels removed", holder["r"].count)
            row(section, "build graph (Pruner construction)", build, "s")
            row(section, "prune 30% (select+cut+verify+retrace)", prune, "s")
            row(section, "  of which verification", clock.seconds, "s")
            row(section, "  verification share of prune", 100 * clock.seconds / prune, "%")
        else:
            row(section, "build graph, 2nd run (verify=False)", build, "s")
            row(section, "prune 30% with verify=False", prune, "s")


# ---- 2. rank() overhead ----------------------------------------------------------------------------------


def bench_rank(arch: str, batch: int, size: int, repeats: int, device: str) -> None:
    section = "rank() overhead"
    print(f"[{section}] {arch}, batch {batch} at {size}x{size}, criterion taylor, {repeats} interleaved repeats",
          flush=True)
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=10).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    pruner = fp.Pruner(model, x[:1], criterion="taylor", ignore=[model.fc])

    def plain():  # what a training step costs, without the optimizer: eval mode, like rank()
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        sync(device)

    def ranking():
        pruner.rank([(x, y)], loss_fn, progress=False)
        sync(device)

    times = {plain: [], ranking: []}
    for fn in times:  # warm-up: allocator, kernels' first-call costs
        fn()
    for i in range(repeats):  # interleave, alternating the order, so that load drifts hit both alike
        for fn in (times if i % 2 == 0 else reversed(list(times))):
            times[fn].append(seconds(fn))
    base, ranked = statistics.median(times[plain]), statistics.median(times[ranking])
    row(section, "plain forward+backward, median", 1e3 * base, "ms/batch")
    row(section, "rank() taylor, median", 1e3 * ranked, "ms/batch")
    row(section, "ratio rank / plain (target <= 1.3)", ranked / base, f"x  {'MET' if ranked / base <= 1.3 else 'NOT MET'}")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- 3. VGG16: MACs vs latency -------------------------------------------------------------------------------


def macs_per_example(model: nn.Module, size: int, device: str) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(1, 3, size, size, device=device))
    return counter.get_total_flops() // 2  # the counter counts a multiply-add as 2 FLOPs


def latency_samples(model: nn.Module, x: torch.Tensor, min_run_time: float) -> list[float]:
    timer = Timer("model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads())
    with torch.inference_mode():  # Timer runs in this thread, so inference mode applies to it
        return list(timer.blocked_autorange(min_run_time=min_run_time).times)


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
    dense, pruned = dense.to(device), pruned.to(device)
    for batch, size in cases:
        macs = [macs_per_example(m, size, device) for m in (dense, pruned)]
        x = torch.randn(batch, 3, size, size, device=device)
        samples = {0: [], 1: []}
        for order in ((0, 1), (1, 0)):  # two rounds, alternating, pooled
            for i in order:
                samples[i] += latency_samples((dense, pruned)[i], x, min_run_time)
        ms = [1e3 * statistics.median(samples[i]) for i in (0, 1)]
        macs_cut, latency_cut = 1 - macs[1] / macs[0], 1 - ms[1] / ms[0]
        tag = f"b{batch} @{size}x{size}"
        row(section, f"{tag} MACs/example dense -> pruned", f"{macs[0] / 1e9:.3f} -> {macs[1] / 1e9:.3f}", "GMACs")
        row(section, f"{tag} latency dense -> pruned (median)", f"{ms[0]:.2f} -> {ms[1]:.2f}", "ms/batch")
        row(section, f"{tag} speed-up MACs / latency", f"{macs[0] / macs[1]:.2f} / {ms[0] / ms[1]:.2f}", "x")
        row(section, f"{tag} reduction MACs / latency", f"{100 * macs_cut:.1f} / {100 * latency_cut:.1f}", "%")
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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--b64-size", type=int, default=32, help="input side for the batch-64 latency row")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per blocked_autorange")
    parser.add_argument("--skip", nargs="*", default=[], choices=["graph", "rank", "vgg"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if "graph" not in args.skip:
        bench_graph_and_prune()
    if "rank" not in args.skip:
        bench_rank(args.rank_arch, args.rank_batch, args.rank_size, args.repeats, args.device)
    if "vgg" not in args.skip:
        bench_vgg([(1, 224), (64, args.b64_size)], args.min_run_time, args.device)
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
