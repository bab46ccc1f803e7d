"""What a model costs: parameters, bytes on disk, multiply-accumulates and measured latency."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import logging

import safetensors.torch
import torch
from torch import nn

# torch.utils.benchmark imports cpp_extension, which warns on every import of a CUDA build of
# torch on a machine without CUDA; that says nothing about our measurements.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils.benchmark import Timer  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode

from filterprune.io import state_tensors


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

    def as_dict(self) -> dict:
        """Flat and JSON-ready, one latency_ms_b<N> key per measured batch size."""
        out = {"params": self.params, "size_mb": self.size_mb, "macs": self.macs}
        out.update({f"latency_ms_b{b}": ms for b, ms in sorted(self.latency_ms.items())})
        out.update(device=self.device, dtype=self.dtype, threads=self.threads)
        return out

    def __str__(self) -> str:
        rows = [
            ("parameters", f"{self.params / 1e6:.3f} M"),
            ("size on disk", f"{self.size_mb:.2f} MB"),
            ("compute", f"{self.macs / 1e6:.1f} MMACs per example"),
        ]
        rows += [(f"latency, batch {b}", f"{ms:.2f} ms (median)") for b, ms in sorted(self.latency_ms.items())]
        rows.append(("measured on", f"{self.device}, {self.dtype}, {self.threads} threads"))
        return "\n".join(f"{k:<18} {v}" for k, v in rows)


def profile(
    model: nn.Module,
    example_inputs,
    batch_sizes: tuple[int, ...] = (1,),
    device: str | None = None,
    threads: int | None = None,
    min_run_time: float = 0.5,
    latency: bool = True,
) -> Profile:
    """Count parameters, size and MACs of `model` and time it at each batch size."""
    inputs = _as_tuple(example_inputs)
    threads = threads or torch.get_num_threads()
    tensors, _ = state_tensors(model)
    with _measuring(model, device) as dev:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(*_batch(inputs, 1, dev))
        times = {
            b: _median_ms(model, _batch(inputs, b, dev), threads, min_run_time) for b in batch_sizes if latency
        }
    params = list(model.parameters())
    dtype = params[0].dtype if params else inputs[0].dtype
    return Profile(
        params=sum(p.numel() for p in params),
        size_mb=len(safetensors.torch.save(tensors)) / 1e6,
        macs=counter.get_total_flops() // 2,  # FlopCounterMode counts a multiply-add as 2 FLOPs
        latency_ms=times,
        device=str(dev),
        dtype=str(dtype).removeprefix("torch."),
        threads=threads,
    )


def latency_ms(
    model: nn.Module, inputs, device: str | None = None, threads: int | None = None, min_run_time: float = 0.5
) -> float:
    """Median milliseconds of one forward pass of `model` on `inputs` (eval mode, inference mode)."""
    with _measuring(model, device) as dev:
        batch = tuple(x.to(dev) for x in _as_tuple(inputs))
        return _median_ms(model, batch, threads or torch.get_num_threads(), min_run_time)


def _median_ms(model: nn.Module, inputs: tuple, threads: int, min_run_time: float) -> float:
    timer = Timer("model(*inputs)", globals={"model": model, "inputs": inputs}, num_threads=threads)
    # Timer runs the statement in this thread, so the inference mode set here applies to it;
    # blocked_autorange runs it untimed first to size its blocks, which also warms it up.
    with torch.inference_mode():
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


@contextmanager
def _measuring(model: nn.Module, device: str | None) -> Iterator[torch.device]:
    """Put the model in eval mode on `device`, and give back its mode and device afterwards."""
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    dev = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval().to(dev)
    try:
        yield dev
    finally:
        model.train(was_training).to(home)


def _as_tuple(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _batch(inputs: tuple, size: int, device: torch.device) -> tuple:
    """A batch of `size` copies of the first example of each input."""
    return tuple(x[:1].repeat(size, *[1] * (x.dim() - 1)).to(device) for x in inputs)
