"""Speed-up per runtime against the MACs cut: where does pruning turn into time? (issue 18)

    python benchmarks/bench_runtimes.py                  # the table at 1 thread: 446 s on the idle 2-core CPU
    python benchmarks/bench_runtimes.py --threads 2      # one thread count per run: ExecuTorch's pool is per process
    python benchmarks/bench_runtimes.py --quick          # tiny settings: checks the script, the numbers mean nothing
    python benchmarks/bench_runtimes.py --runtimes eager compile onnxruntime --models resnet18

Models: the demo network (the cached transferred one if `filterprune demo` has run, else an untrained
vgg16_layout of the demo's width, 32x32) and torchvision resnet18, mobilenet_v2 and efficientnet_b0
at 224 (weights=None: speed does not depend on the weights), each pruned with `l1` to 2x and 4x
fewer MACs (the classifier's output kept). Runtimes: eager PyTorch, ONNX Runtime, OpenVINO,
ExecuTorch (XNNPACK, on this CPU as the phone's proxy), and ONNX Runtime int8 (static QDQ,
calibrated on random images: its speed, not its accuracy), plus torch.compile if asked (its
Inductor compile costs tens of seconds per model and batch on 2 cores, so it is not in the default
10-minute run). Each model is exported once per format and opened once per thread count.

Timing: at batch 1 and the deployment batch (64 for the demo's 32x32 inputs, 8 at 224), at the
given threads; the three variants of one network (unpruned, 2x, 4x) in every runtime are timed in turns,
`--rounds` times, each keeping its lowest median (load from elsewhere slows a timing, never speeds
one up) with that timing's IQR. Speed-ups are against the unpruned model in the same runtime
(int8: against the unpruned float model in ONNX Runtime), worded by speed_change (inside the
spreads: "no measurable change"); "of the cut" divides the speed-up by the MACs cut (1.00 = time
fell as much as MACs did).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

import filterprune as fp
from filterprune.export import export_executorch, export_onnx, export_openvino, quantize_int8
from filterprune.measure import speed_change, time_ms
from filterprune.runtimes import RUNTIMES

FILE_RUNTIMES = {"onnxruntime": export_onnx, "openvino": export_openvino, "executorch": export_executorch}
SUFFIX = {"onnxruntime": ".onnx", "openvino": ".xml", "executorch": ".pte"}


def demo_network() -> tuple[nn.Module, str]:
    from filterprune.recipes.demo import DemoConfig, default_cache, transferred_path

    path = transferred_path(DemoConfig(), default_cache())
    if path.is_file():
        return fp.load(path), "the demo's transferred network"
    return fp.vgg16_layout(num_classes=2, width=DemoConfig().width), f"an untrained vgg16_layout (width {DemoConfig().width})"


def networks(names: list[str], quick: bool) -> dict[str, tuple[nn.Module, int, str, str]]:
    """name -> (unpruned model, image size, the classifier's output layer, description)."""
    size = 32 if quick else 224
    out = {}
    for name in names:
        if name == "demo":
            model, what = demo_network()
            out[name] = (model, 32, "classifier.6", what)
        else:
            model = torchvision.models.get_model(name, weights=None)
            out[name] = (model, size, "fc" if name == "resnet18" else "classifier.1", f"torchvision {name}, untrained")
    return out


def variants(model: nn.Module, x: torch.Tensor, keep: str, cuts: list[float]) -> dict[str, tuple[nn.Module, float]]:
    """The unpruned model and copies pruned with l1 to each MACs cut: name -> (model, MACs cut reached)."""
    model.eval()
    out = {"unpruned": (model, 1.0)}
    for cut in cuts:
        pruned = copy.deepcopy(model)
        result = fp.Pruner(pruned, x, criterion="l1", ignore=[pruned.get_submodule(keep)]).prune(macs=cut)
        out[f"{cut:g}x fewer MACs"] = (pruned.eval(), result.macs_before / result.macs_after)
    return out


def prepared(model: nn.Module, x: torch.Tensor, runtimes: list[str], batches: list[int], threads: list[int],
             folder: Path) -> dict[tuple[str, int, int], object]:
    """(runtime, batch, threads) -> a call to time. Files are exported once and opened once per thread count."""
    calls = {}
    inputs = {b: (x[:1].repeat(b, 1, 1, 1),) for b in batches}
    for runtime in runtimes:
        if runtime in ("eager", "compile"):  # torch's threads are set by the timer, at call time
            for b in batches:
                call = RUNTIMES[runtime].prepare(model, inputs[b], max(threads))
                calls.update({(runtime, b, t): call for t in threads})
            continue
        if runtime == "int8":
            onnx_file = folder / "model.onnx"
            if not onnx_file.exists():
                export_onnx(model, x, onnx_file)
            path, opener = quantize_int8(onnx_file, folder / "model.int8.onnx", torch.randn(32, *x.shape[1:]).split(8)), "onnxruntime"
        else:
            path, opener = folder / f"model{SUFFIX[runtime]}", runtime
            if not path.exists():
                writer = FILE_RUNTIMES[runtime]
                writer(model, x, path, max(batches)) if runtime == "executorch" else writer(model, x, path)
        for t in threads:
            run = RUNTIMES[opener].open(path, t)
            calls.update({(runtime, b, t): (lambda run=run, b=b: run(inputs[b])) for b in batches})
    return calls


def timed_in_turns(calls: dict[str, dict], threads: int, rounds: int, min_run_time: float) -> dict[tuple, tuple[float, float]]:
    """(variant, runtime, batch) -> the lowest (median, IQR) of `rounds`, every call timed once a round."""
    best: dict[tuple, tuple[float, float]] = {}
    for _ in range(rounds):
        for variant, by_key in calls.items():
            for (runtime, batch, t), call in by_key.items():
                if t != threads:
                    continue
                median, iqr = time_ms(call, threads, min_run_time)
                key = (variant, runtime, batch)
                if key not in best or median < best[key][0]:
                    best[key] = (median, iqr)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo", "resnet18", "mobilenet_v2", "efficientnet_b0"])
    parser.add_argument("--runtimes", nargs="+", default=["eager", "onnxruntime", "openvino", "executorch", "int8"],
                        choices=[*RUNTIMES, "int8"])
    parser.add_argument("--cuts", type=float, nargs="+", default=[2.0, 4.0], help="MACs cuts to prune to")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.1, help="seconds of each timing block")
    parser.add_argument("--quick", action="store_true", help="32x32 inputs, batches 1 and 2, 1 thread, 1 round, short blocks, a 2x cut only")
    args = parser.parse_args()
    if args.quick:
        args.threads, args.rounds, args.min_run_time, args.cuts = [1], 1, 0.01, [2.0]
    if "executorch" in args.runtimes and len(args.threads) > 1:
        parser.error("ExecuTorch's thread pool is one per process: give one --threads per run (e.g. run with --threads 1, then --threads 2)")
    start = time.perf_counter()
    rows = []
    print(f"runtimes: {', '.join(f'{r} {RUNTIMES[r].version()}' for r in args.runtimes if r in RUNTIMES)}; "
          f"torch {torch.__version__}; {args.rounds} rounds, {args.min_run_time} s blocks", flush=True)
    for name, (model, size, keep, what) in networks(args.models, args.quick).items():
        x = torch.randn(1, 3, size, size)
        batches = [1, 2] if args.quick else [1, 64 if size == 32 else 8]
        models = variants(model, x, keep, args.cuts)
        with tempfile.TemporaryDirectory() as scratch:
            calls = {}
            for variant, (m, _) in models.items():
                (folder := Path(scratch) / variant.replace(" ", "_")).mkdir()
                calls[variant] = prepared(m, x, args.runtimes, batches, args.threads, folder)
            for threads in args.threads:
                best = timed_in_turns(calls, threads, args.rounds, args.min_run_time)
                for variant, (_, cut) in models.items():
                    for batch in batches:
                        cells = []
                        for runtime in args.runtimes:
                            ms, iqr = best[(variant, runtime, batch)]
                            ref = best[("unpruned", "onnxruntime" if runtime == "int8" else runtime, batch)]
                            reference = variant == "unpruned" and runtime != "int8"
                            said = "reference" if reference else speed_change(ref[0], ms, ref[1], iqr)
                            cells.append(f"{ms:.2f} ({said}{f', {ref[0] / ms / cut:.2f} of the cut' if cut > 1 else ''})")
                        rows.append(f"| {name} | {variant} ({cut:.2f}x) | {batch} | {threads} | " + " | ".join(cells) + " |")
                        print(rows[-1], flush=True)
        print(f"({name}: {what}, {size}x{size}; {time.perf_counter() - start:.0f} s so far)", flush=True)
    print()
    print("| network | variant (MACs cut) | batch | threads | " + " | ".join(f"{r} ms (vs unpruned)" for r in args.runtimes) + " |")
    print("|---|---|---|---|" + "---|" * len(args.runtimes))
    print("\n".join(rows))
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
