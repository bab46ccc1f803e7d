"""What a model costs: parameters, bytes on disk, multiply-accumulates and measured latency.

Latency is a median with its spread (the interquartile range of block timings), so that a
comparison can tell a change from noise: see `speed_change`. It is measured in a runtime
(runtimes.py: eager PyTorch, torch.compile, CUDA graphs, ONNX Runtime, OpenVINO, ExecuTorch), and
kept as records that name it: {"runtime", "version", "batch", "ms", "iqr_ms", "threads", "dtype",
"device"} in a summary's "latency" list, read back with `latency`. torch.utils.benchmark's Timer reads
its clock through torch.accelerator.synchronize() when an accelerator is present, so CUDA timings
cover the kernels' execution, not only their launch.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import safetensors.torch
import torch
from torch import nn

# torch.utils.benchmark imports cpp_extension, which warns on every import of a CUDA build of
# torch on a machine without CUDA; that says nothing about our measurements.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils.benchmark import Timer  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from filterprune import runtimes  # noqa: E402
from filterprune.utils import evaluating, state_tensors  # noqa: E402

GPU_BATCH = 64  # the batch a GPU is deployed at: the headline there; batch 1 only measures launch overhead
MIN_SAMPLES = 5  # block timings per median: fewer make the spread meaningless
WARMUP = 3  # untimed runs first: cuDNN's algorithm search, the allocator, lazy initialisation
LAUNCH_BOUND = ("on a GPU, batch-1 time is dominated by kernel launch overhead and barely follows MACs: "
                f"judge speed at batch {GPU_BATCH}")


@dataclass
class Profile:
    """What a model costs: parameters, size on disk, MACs and measured latency (with the conditions it was measured under)."""

    params: int
    size_mb: float  # bytes of the state dict saved as safetensors / 1e6
    macs: int  # multiply-accumulates for one example
    latency_ms: dict[int, float]  # batch size -> median milliseconds per batch
    device: str
    dtype: str
    threads: int
    latency_iqr_ms: dict[int, float] = field(default_factory=dict)  # batch size -> interquartile range (ms)
    runtime: str = "eager"  # what ran the forward while timed: a name of runtimes.RUNTIMES
    runtime_version: str = ""

    @property
    def headline_batch(self) -> int | None:
        """The batch to judge speed by: GPU_BATCH on a GPU when measured, else the smallest measured."""
        if not self.latency_ms:
            return None
        return GPU_BATCH if self.device.startswith("cuda") and GPU_BATCH in self.latency_ms else min(self.latency_ms)

    def records(self) -> list[dict]:
        """One latency record per measured batch size, naming the runtime and conditions."""
        return [{"runtime": self.runtime, "version": self.runtime_version, "batch": b, "ms": ms,
                 "iqr_ms": self.latency_iqr_ms.get(b, 0.0), "threads": self.threads, "dtype": self.dtype,
                 "device": self.device} for b, ms in sorted(self.latency_ms.items())]

    def as_dict(self) -> dict:
        """JSON-ready: the counts, a "latency" list of records (see `latency`), and the conditions."""
        return {"params": self.params, "size_mb": self.size_mb, "macs": self.macs, "latency": self.records(),
                "device": self.device, "dtype": self.dtype, "threads": self.threads}

    def __str__(self) -> str:
        rows = [
            ("parameters", f"{self.params / 1e6:.3f} M"),
            ("size on disk", f"{self.size_mb:.2f} MB"),
            ("compute", f"{self.macs / 1e6:.1f} MMACs per example"),
        ]
        for b, ms in sorted(self.latency_ms.items()):
            iqr = self.latency_iqr_ms.get(b)
            spread = f", IQR {iqr:.2f}" if iqr is not None else ""
            rows.append((f"latency, batch {b}", f"{ms:.2f} ms (median{spread})" + (" *" if b == self.headline_batch else "")))
        rows.append(("measured on", f"{self.device}, {self.dtype}, {self.threads} threads, "
                                    f"{self.runtime} {self.runtime_version}".rstrip()))
        notes = [f"* headline batch ({'the deployment batch on a GPU' if self.device.startswith('cuda') else 'smallest measured'})"]
        if self.device.startswith("cuda") and 1 in self.latency_ms:
            notes.append(f"batch 1: {LAUNCH_BOUND}")
        return "\n".join([*(f"{k:<18} {v}" for k, v in rows), *notes])


def default_batch_sizes(device: str | torch.device) -> tuple[int, ...]:
    """(1, GPU_BATCH) on a GPU, where batch 1 is launch-bound; (1,) elsewhere."""
    return (1, GPU_BATCH) if str(device).startswith("cuda") else (1,)


def deployment_batch(device: str | torch.device) -> int:
    """The batch latency is judged at by default: GPU_BATCH on a GPU, 1 elsewhere."""
    return GPU_BATCH if str(device).startswith("cuda") else 1


def launch_note(device: str | torch.device, batch: int) -> str | None:
    """The caveat to print beside a batch-`batch` latency on `device`, or None."""
    return LAUNCH_BOUND if str(device).startswith("cuda") and batch == 1 else None


def latency(summary: dict, batch: int, runtime: str = "eager") -> dict | None:
    """The latency record of `runtime` at `batch` in a summary (Profile.as_dict, or a report's
    baseline/pruned), or None where it was not measured."""
    return next((r for r in summary.get("latency", []) if r["runtime"] == runtime and r["batch"] == batch), None)


def latency_batches(summary: dict, runtime: str = "eager") -> list[int]:
    """The batch sizes measured in `runtime`, smallest first."""
    return sorted(r["batch"] for r in summary.get("latency", []) if r["runtime"] == runtime)


def measured_runtimes(summary: dict) -> list[str]:
    """The runtimes a summary has latency for, in the order first measured."""
    return list(dict.fromkeys(r["runtime"] for r in summary.get("latency", [])))


def keep_lowest(records: list[dict], new: list[dict]) -> list[dict]:
    """`records` with each of `new` in place of the one of its runtime and batch where `new`'s median is
    lower (or where there was none): the lowest of several medians, timed in turns, is the least
    disturbed by other load on the machine, which slows a timing and never speeds one up."""
    kept = {(r["runtime"], r["batch"]): r for r in records}
    for r in new:
        old = kept.get((r["runtime"], r["batch"]))
        if old is None or r["ms"] < old["ms"]:
            kept[(r["runtime"], r["batch"])] = r
    return list(kept.values())


def in_turns(models: dict[str, nn.Module], time_one: Callable[[nn.Module], list[dict]],
             rounds: int = 3) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Time every model with time_one(model) -> latency records, one after another, `rounds` times.

    Returns each model's lowest median per runtime and batch (keep_lowest: side by side, all of them
    see the same load, and the least disturbed timing of each is kept), and each model's speed-up
    over the first, per runtime and batch: {"runtime", "batch", "x", "ratios"}, the median over
    rounds of the first's ms / its ms within a round. Load on the machine slows the timings of a
    round alike and cancels from their ratio; two lowest times, which can come from different
    rounds, do not cancel it."""
    kept: dict[str, list[dict]] = {name: [] for name in models}
    ratios: dict[str, dict[tuple[str, int], list[float]]] = {name: {} for name in list(models)[1:]}
    first = next(iter(models))
    for _ in range(rounds):
        timed = {name: time_one(model) for name, model in models.items()}
        for name, records in timed.items():
            kept[name] = keep_lowest(kept[name], records)
        reference = {(r["runtime"], r["batch"]): r["ms"] for r in timed[first]}
        for name in ratios:
            for r in timed[name]:
                key = (r["runtime"], r["batch"])
                if key in reference and r["ms"] > 0:
                    ratios[name].setdefault(key, []).append(reference[key] / r["ms"])
    speedups = {name: [{"runtime": runtime, "batch": batch, "x": statistics.median(values), "ratios": [round(v, 4) for v in values]}
                       for (runtime, batch), values in by_key.items()] for name, by_key in ratios.items()}
    return kept, speedups


def paired_speedup(summary: dict, batch: int, runtime: str) -> dict | None:
    """`summary`'s speed-up record over the first model it was timed in turns with (in_turns), at
    `batch` in `runtime`, if it has one."""
    return next((r for r in summary.get("speedup", []) if (r["runtime"], r["batch"]) == (runtime, batch)), None)


def paired_change(record: dict) -> str:
    """A paired_speedup record in words, as speed_change words two timings: '3.10x faster', '1.25x
    slower', or 'no measurable change' when the rounds disagree on the direction."""
    x, ratios = record["x"], record["ratios"]
    if min(ratios) <= 1 <= max(ratios) or round(x, 2) == 1.0 or round(1 / x, 2) == 1.0:
        return "no measurable change"
    return f"{x:.2f}x faster" if x > 1 else f"{1 / x:.2f}x slower"


def speed_change(before_ms: float, after_ms: float, before_spread: float, after_spread: float) -> str:
    """'2.10x faster', '1.25x slower', or 'no measurable change'.

    The rule: a change counts only when |after - before| exceeds before_spread + after_spread
    (two timings' spreads, e.g. their IQRs, added: each median can sit anywhere in its own
    spread), and when the ratio does not round to 1.00x. A slow-down is written as the factor
    it is slower by, never as a "faster" factor below 1.
    """
    if before_ms <= 0 or after_ms <= 0:
        raise ValueError(f"timings must be positive milliseconds, got {before_ms} and {after_ms}")
    if abs(after_ms - before_ms) <= abs(before_spread) + abs(after_spread):
        return "no measurable change"
    ratio = before_ms / after_ms
    if round(ratio, 2) == 1.0 or round(1 / ratio, 2) == 1.0:
        return "no measurable change"
    return f"{ratio:.2f}x faster" if ratio > 1 else f"{1 / ratio:.2f}x slower"


def profile(
    model: nn.Module,
    example_inputs,
    batch_sizes: tuple[int, ...] | None = None,
    device: str | None = None,
    threads: int | None = None,
    min_run_time: float = 0.5,
    latency: bool = True,
    runtime: str = "eager",
) -> Profile:
    """Count parameters, size and MACs of `model` and time it at each batch size
    (default: `default_batch_sizes(device)`, so batch 64 on a GPU) in `runtime` (runtimes.RUNTIMES:
    "eager", "compile", "cuda-graph", "onnxruntime", "openvino", "executorch"), prepared once per
    batch size. A runtime not installed: RuntimeUnavailable, naming the extra to install."""
    inputs = _as_tuple(example_inputs)
    run = runtimes.get(runtime)
    threads = threads or torch.get_num_threads()
    tensors, _ = state_tensors(model)
    times: dict[int, tuple[float, float]] = {}
    layout, dtype = _layout(model), _float_dtype(model)
    with _measuring(model, device) as dev:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(*_batch(inputs, 1, dev, layout, dtype))
        if latency:
            run.check(dev)
            for b in batch_sizes or default_batch_sizes(dev):
                times[b] = _timed_ms(run, model, _batch(inputs, b, dev, layout, dtype), threads, min_run_time)
    return Profile(
        params=sum(p.numel() for p in model.parameters()),
        size_mb=len(safetensors.torch.save(tensors)) / 1e6,
        macs=counter.get_total_flops() // 2,  # FlopCounterMode counts a multiply-add as 2 FLOPs
        latency_ms={b: median for b, (median, _) in times.items()},
        latency_iqr_ms={b: iqr for b, (_, iqr) in times.items()},
        device=str(dev),
        dtype=str(dtype or inputs[0].dtype).removeprefix("torch."),
        threads=threads,
        runtime=runtime,
        runtime_version=run.version(),
    )


def latency_ms(
    model: nn.Module, inputs, device: str | None = None, threads: int | None = None, min_run_time: float = 0.5,
    runtime: str = "eager",
) -> float:
    """Median milliseconds of one forward pass of `model` on `inputs` (eval mode) in `runtime`."""
    return latency_spread_ms(model, inputs, device, threads, min_run_time, runtime)[0]


def latency_spread_ms(
    model: nn.Module, inputs, device: str | None = None, threads: int | None = None, min_run_time: float = 0.5,
    runtime: str = "eager",
) -> tuple[float, float]:
    """(median, interquartile range) in milliseconds of one forward pass of `model` on `inputs` in
    `runtime` (runtimes.RUNTIMES), prepared once (compiled, exported or captured) before timing."""
    layout, dtype, run = _layout(model), _float_dtype(model), runtimes.get(runtime)
    with _measuring(model, device) as dev:
        run.check(dev)
        batch = tuple(_placed(x, dev, layout, dtype) for x in _as_tuple(inputs))
        return _timed_ms(run, model, batch, threads or torch.get_num_threads(), min_run_time)


def time_ms(fn: Callable[[], object], threads: int | None = None, min_run_time: float = 0.5) -> tuple[float, float]:
    """(median, interquartile range) in milliseconds of fn(), over at least MIN_SAMPLES block timings
    of torch.utils.benchmark's blocked_autorange, after WARMUP untimed calls; synchronised on CUDA."""
    timer = Timer("fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads())
    for _ in range(WARMUP):
        fn()
    times: list[float] = []
    # A call slower than min_run_time gives one block per blocked_autorange: call it again until
    # the spread rests on enough samples.
    while len(times) < MIN_SAMPLES:
        times += timer.blocked_autorange(min_run_time=min_run_time).times
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return median * 1e3, (q3 - q1) * 1e3


def _timed_ms(run: runtimes.Runtime, model: nn.Module, inputs: tuple, threads: int, min_run_time: float) -> tuple[float, float]:
    """Prepare `model` on `inputs` in `run` with `threads` threads, then time the prepared call."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the torch runtimes' threads while they compile and capture, too
    try:
        return time_ms(run.prepare(model, inputs, threads), threads, min_run_time)
    finally:
        torch.set_num_threads(before)


@contextmanager
def _measuring(model: nn.Module, device: str | None) -> Iterator[torch.device]:
    """Every module in eval mode, the model on `device`; afterwards each module's mode and the device back."""
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    dev = torch.device(device) if device is not None else home
    with evaluating(model):
        model.to(dev)
        try:
            yield dev
        finally:
            model.to(home)


def _as_tuple(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _batch(inputs: tuple, size: int, device: torch.device, layout: torch.memory_format = torch.contiguous_format,
           dtype: torch.dtype | None = None) -> tuple:
    """A batch of `size` copies of the first example of each input, placed as `_placed` does."""
    return tuple(_placed(x[:1].repeat(size, *[1] * (x.dim() - 1)), device, layout, dtype) for x in inputs)


def _placed(x: torch.Tensor, device: torch.device, layout: torch.memory_format, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`x` on `device`, in `layout` if it is 4-D (an image batch), and in `dtype` if it is floating
    (a model cast to bfloat16 is timed on bfloat16 inputs, as it would be deployed)."""
    dtype = dtype if dtype is not None and x.is_floating_point() else x.dtype
    return x.to(device, dtype=dtype, memory_format=layout) if x.dim() == 4 else x.to(device, dtype=dtype)


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating parameters (None if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _layout(model: nn.Module) -> torch.memory_format:
    """channels_last if the model's 4-D weights are stored so (as fine_tune(channels_last=True) leaves
    them): a model is timed on inputs in its own layout, since mixing the two adds conversions."""
    last = any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters())
    return torch.channels_last if last else torch.contiguous_format
