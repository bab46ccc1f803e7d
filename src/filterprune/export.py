"""Export a (pruned) model to the format of the runtime it ships on, and check that it agrees.

Formats: onnx (ONNX Runtime), openvino (OpenVINO IR, .xml + .bin), executorch (.pte lowered to
XNNPACK: phones), pt2 (a saved torch.export program). All have a dynamic batch dimension
(ExecuTorch's bounded by max_batch, as its memory is planned ahead). `check_agreement` runs the
exported file in its runtime on the example input and compares with the PyTorch model, within
the dtype's tolerance. `quantize_int8` is post-training static quantisation of an ONNX file with
ONNX Runtime's quantiser, calibrated on training images; `onnx_accuracy` measures the result.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .utils import atomic_path, atomic_write, evaluating

MAX_BATCH = 64  # ExecuTorch's largest batch: its memory plan is sized for it
# (absolute, relative to the largest output) error allowed between a float export and PyTorch.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}


class ExportError(RuntimeError):
    """An exported model does not agree with the PyTorch one (or could not be exported)."""


def _as_tuple(inputs) -> tuple[torch.Tensor, ...]:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _traced(inputs: tuple) -> tuple:
    """Batches of two where a batch is one: torch.export specialises a dimension of size 1."""
    return tuple(x[:1].repeat(2, *[1] * (x.dim() - 1)) if x.shape[0] == 1 else x for x in inputs)


def _program(model: nn.Module, inputs: tuple, max_batch: int | None = None) -> torch.export.ExportedProgram:
    """torch.export of `model` in eval mode, with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", max=max_batch) if max_batch else torch.export.Dim("batch")
    with evaluating(model):
        return torch.export.export(model, _traced(inputs), dynamic_shapes=tuple({0: batch} for _ in inputs))


def export_onnx(model: nn.Module, example_inputs, path: str | Path, opset: int | None = None) -> Path:
    """Export `model` in eval mode to ONNX with a dynamic batch dimension, and check the result."""
    import onnx

    inputs = _traced(_as_tuple(example_inputs))
    names = [f"input{i}" for i in range(len(inputs))]
    path = Path(path)
    with evaluating(model), atomic_path(path) as tmp:
        # One file: the temporary name would end up inside an external-data reference.
        common = dict(input_names=names, opset_version=opset, external_data=False)
        try:
            batch = torch.export.Dim("batch")
            torch.onnx.export(model, inputs, tmp, dynamo=True, verbose=False,
                              dynamic_shapes=tuple({0: batch} for _ in inputs), **common)
        except Exception as e:  # the dynamo exporter does not handle every model yet
            warnings.warn(f"dynamo ONNX export failed ({e!r}); retrying with the TorchScript exporter")
            torch.onnx.export(model, inputs, tmp, dynamo=False,
                              dynamic_axes={n: {0: "batch"} for n in names}, **common)
        onnx.checker.check_model(str(tmp))
    return path


def export_openvino(model: nn.Module, example_inputs, path: str | Path) -> Path:
    """OpenVINO IR (`path` .xml and its .bin) converted from torch.export, weights kept at full precision."""
    import openvino

    path = Path(path).with_suffix(".xml")
    network = openvino.convert_model(_program(model, _as_tuple(example_inputs)))
    # save_model compresses weights to fp16 by default: that would not be the model we checked.
    with atomic_path(path) as tmp:
        openvino.save_model(network, str(tmp), compress_to_fp16=False)
        tmp.with_suffix(".bin").replace(path.with_suffix(".bin"))
    return path


def export_executorch(model: nn.Module, example_inputs, path: str | Path, max_batch: int = MAX_BATCH) -> Path:
    """An ExecuTorch program (.pte) lowered to the XNNPACK delegate, batch 1 to max_batch."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    inputs = _as_tuple(example_inputs)
    largest = max(max_batch, inputs[0].shape[0], 2)
    # Traced at the largest batch: XNNPACK's buffers are planned for the traced example's sizes, and
    # a larger batch at run time fails ("Attempted to resize a bounded tensor").
    inputs = tuple(x[:1].expand(largest, *x.shape[1:]).contiguous() for x in inputs)
    program = _program(model, inputs, largest)
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    return atomic_write(path, lowered.buffer)


def export_pt2(model: nn.Module, example_inputs, path: str | Path) -> Path:
    """A saved torch.export program (torch.export.load(path).module() runs it)."""
    path = Path(path)
    program = _program(model, _as_tuple(example_inputs))
    with atomic_path(path) as tmp:
        torch.export.save(program, str(tmp))
    return path


def _run_pt2(path: Path, threads: int) -> Callable[[tuple], list[np.ndarray]]:
    module = torch.export.load(str(path)).module()

    def run(inputs: tuple) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in _as_tuple(module(*inputs))]
    return run


@dataclass(frozen=True)
class Format:
    """An export format: its writer, file suffix and the runtime that runs it."""

    write: Callable[..., Path]
    suffix: str
    runtime: str


FORMATS = {"onnx": Format(export_onnx, ".onnx", "onnxruntime"), "openvino": Format(export_openvino, ".xml", "openvino"),
           "executorch": Format(export_executorch, ".pte", "executorch"), "pt2": Format(export_pt2, ".pt2", "eager")}


def export_model(model: nn.Module, example_inputs, path: str | Path, fmt: str = "onnx") -> tuple[Path, float]:
    """Write `model` to `path` in format `fmt` and check it: returns (path, largest absolute
    difference from PyTorch on the example input). ExportError if beyond the dtype's tolerance."""
    from .runtimes import get

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    inputs = _as_tuple(example_inputs)
    if FORMATS[fmt].runtime != "eager":
        get(FORMATS[fmt].runtime).check(torch.device("cpu"))
    path = FORMATS[fmt].write(model, inputs, path)
    return path, check_agreement(model, inputs, path, fmt)


def check_agreement(model: nn.Module, example_inputs, path: Path, fmt: str, threads: int = 1) -> float:
    """Largest absolute difference between the file `path` (format `fmt`) run in its runtime and
    `model` on the example input; ExportError if it exceeds TOLERANCE for the model's dtype."""
    from .runtimes import get

    inputs = _as_tuple(example_inputs)
    with evaluating(model), torch.no_grad():
        expected = [t.detach().float().numpy() for t in _as_tuple(model(*inputs))]
    run = _run_pt2(path, threads) if fmt == "pt2" else get(FORMATS[fmt].runtime).open(path, threads)
    got = run(inputs)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    absolute, relative = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    error = max(float(np.abs(g.astype(np.float32) - e).max()) for g, e in zip(got, expected))
    allowed = absolute + relative * max(float(np.abs(e).max()) for e in expected)
    if len(got) != len(expected) or error > allowed:
        raise ExportError(f"the {fmt} export of {path} differs from the PyTorch model by {error:.3g} on the example "
                          f"input (allowed for {str(dtype).removeprefix('torch.')}: {allowed:.3g}): do not ship it")
    return error


def quantize_int8(onnx_path: str | Path, out: str | Path, calibration: Iterable[torch.Tensor]) -> Path:
    """Post-training static int8 quantisation of an ONNX model (ONNX Runtime's quantiser: QDQ,
    per-channel int8 weights, uint8 activations, min-max ranges) calibrated on `calibration`
    batches of images, as the model sees them (normalised, no augmentation)."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {name: batch.detach().cpu().float().numpy()}

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="filterprune-") as folder, atomic_path(out) as tmp:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared))  # shape inference and folding, as the quantiser asks
        quantize_static(str(prepared), str(tmp), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def onnx_accuracy(path: str | Path, loader: Iterable, threads: int | None = None) -> float:
    """Top-1 accuracy of an ONNX classifier run in ONNX Runtime over (images, labels) batches."""
    from .runtimes import OnnxRuntime

    run = OnnxRuntime().open(Path(path), threads or torch.get_num_threads())
    right = seen = 0
    for images, labels in loader:
        right += int((run((images,))[0].argmax(1) == labels.numpy()).sum())
        seen += len(labels)
    return right / max(seen, 1)
