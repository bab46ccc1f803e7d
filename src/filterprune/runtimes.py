"""Where a model runs when it ships: eager PyTorch, torch.compile, CUDA graphs, ONNX Runtime,
OpenVINO and ExecuTorch (XNNPACK), behind one seam.

A Runtime's `prepare(model, inputs, threads)` does the slow work once (compiling, exporting,
capturing) and returns a call that runs the model on those inputs, which measure.py times. The
file-based runtimes prepare through the same writers as `filterprune export` (export.py), so what
is timed is what is shipped, dynamic batch included; their `open(path, threads)` loads such a file
and returns a call on given inputs (export.py checks an exported file's agreement with it).

Every runtime states its threads: ONNX Runtime's intra_op_num_threads, OpenVINO's
INFERENCE_NUM_THREADS, ExecuTorch's thread pool, torch.set_num_threads for the torch ones.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

Call = Callable[[], object]


class RuntimeUnavailable(RuntimeError):
    """A runtime is not installed or cannot run here; the message says what to install or change."""


class Runtime:
    """How to run a model in one deployment runtime (subclasses fill in prepare, and open for file formats)."""

    name: str
    module: str  # imported to check that the runtime is installed
    package: str  # the distribution whose version a measurement states
    extra: str  # filterprune's extra that installs it
    cpu_only: bool = True

    def version(self) -> str:
        return importlib.metadata.version(self.package)

    def check(self, device: torch.device) -> None:
        """RuntimeUnavailable (one line, what to do) unless this runtime can run on `device` here."""
        try:
            importlib.import_module(self.module)
        except ImportError as err:
            raise RuntimeUnavailable(f"runtime {self.name!r} needs {self.package}, which is not installed: "
                                     f"pip install 'filterprune[{self.extra}]'") from err
        if self.cpu_only and device.type != "cpu":
            raise RuntimeUnavailable(f"runtime {self.name!r} runs on the CPU here: give device='cpu' (not {device})")

    def prepare(self, model: nn.Module, inputs: tuple[torch.Tensor, ...], threads: int) -> Call:
        """Compile/export `model` (in eval mode) for `inputs`, once; return a call that runs it on them."""
        raise NotImplementedError

    def open(self, path: Path, threads: int) -> Callable[[tuple[torch.Tensor, ...]], list[np.ndarray]]:
        """Load a file written by export.py for this runtime; returns inputs -> outputs as numpy arrays."""
        raise NotImplementedError(f"runtime {self.name!r} does not load files")

    def _from_file(self, fmt: str, model: nn.Module, inputs: tuple, threads: int) -> Call:
        """Export to `fmt` (export.FORMATS) in a scratch folder, open the file and bind `inputs`."""
        from .export import FORMATS

        with tempfile.TemporaryDirectory(prefix="filterprune-") as folder:
            run = self.open(FORMATS[fmt].write(model, inputs, Path(folder) / f"model{FORMATS[fmt].suffix}"), threads)
        return lambda: run(inputs)


class Eager(Runtime):
    name, module, package, extra, cpu_only = "eager", "torch", "torch", "", False

    def prepare(self, model, inputs, threads):
        # Timer calls this in the timing thread, so the inference mode must be set inside the call.
        def call():
            with torch.inference_mode():
                return model(*inputs)
        return call


class Compiled(Runtime):
    """torch.compile's default (Inductor) backend."""

    name, module, package, extra, cpu_only = "compile", "torch", "torch", "", False

    def prepare(self, model, inputs, threads):
        # Dynamo caches compiled code per forward function, guarded on the module: many models of one
        # class (the loop's iterations) would reach its recompile limit and silently run eager.
        torch._dynamo.reset()
        compiled = torch.compile(model)
        call = Eager().prepare(compiled, inputs, threads)
        call()  # compiles now, not inside the timing
        return call


class CudaGraph(Runtime):
    """The forward captured once and replayed as a CUDA graph: no launch overhead."""

    name, module, package, extra, cpu_only = "cuda-graph", "torch", "torch", "", False

    def check(self, device):
        if device.type != "cuda":
            raise RuntimeUnavailable(f"runtime 'cuda-graph' replays a CUDA graph, which needs a GPU: "
                                     f"give device='cuda' (not {device})")

    def prepare(self, model, inputs, threads):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):  # off the capture: cuDNN's choice of kernels, the allocator
                model(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            model(*inputs)
        return graph.replay


class OnnxRuntime(Runtime):
    """ONNX Runtime: its CPU provider, or CUDA where the installed onnxruntime has it (onnxruntime-gpu)."""

    name, module, package, extra, cpu_only = "onnxruntime", "onnxruntime", "onnxruntime", "onnx", False

    def check(self, device):
        super().check(device)
        import onnxruntime

        if device.type == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise RuntimeUnavailable("runtime 'onnxruntime' on CUDA needs onnxruntime-gpu (this onnxruntime has "
                                     f"{onnxruntime.get_available_providers()}): install it, or give device='cpu'")

    def prepare(self, model, inputs, threads):
        from .export import export_onnx

        if inputs[0].is_cuda:
            with tempfile.TemporaryDirectory(prefix="filterprune-") as folder:
                session = self.session(export_onnx(model, inputs, Path(folder) / "model.onnx"), threads, cuda=True)
            return _cuda_binding(session, inputs)
        return self._from_file("onnx", model, inputs, threads)

    def session(self, path: Path, threads: int, cuda: bool = False):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3  # no warnings about nodes placed on the CPU
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        return onnxruntime.InferenceSession(str(path), options, providers=providers)

    def open(self, path, threads):
        session = self.session(path, threads)
        names = [i.name for i in session.get_inputs()]
        return lambda inputs: session.run(None, {n: _numpy(x) for n, x in zip(names, inputs)})


def _cuda_binding(session, inputs: tuple) -> Call:
    """The session run on CUDA tensors in place, outputs left on the GPU: no host copies in the timing."""
    binding = session.io_binding()
    for node, x in zip(session.get_inputs(), inputs):
        x = x.contiguous()
        binding.bind_input(node.name, "cuda", x.device.index or 0, _numpy(x[:0]).dtype, tuple(x.shape), x.data_ptr())
    for node in session.get_outputs():
        binding.bind_output(node.name, "cuda")

    def call():
        session.run_with_iobinding(binding)
        torch.cuda.synchronize()
    return call


class OpenVino(Runtime):
    """OpenVINO on the CPU, at the model's own precision (its default on a bf16-capable CPU is bf16)."""

    name, module, package, extra = "openvino", "openvino", "openvino", "deploy"

    def prepare(self, model, inputs, threads):
        return self._from_file("openvino", model, inputs, threads)

    def open(self, path, threads):
        import openvino

        core = openvino.Core()
        network = core.read_model(str(path))
        precision = "bf16" if network.inputs[0].get_element_type() == openvino.Type.bf16 else "f32"
        compiled = core.compile_model(network, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                       "INFERENCE_PRECISION_HINT": precision})
        request = compiled.create_infer_request()
        return lambda inputs: list(request.infer([_numpy(x) for x in inputs]).values())


class ExecuTorch(Runtime):
    """ExecuTorch with the XNNPACK delegate: the phone path, run here on the CPU as its proxy."""

    name, module, package, extra = "executorch", "executorch.runtime", "executorch", "deploy"
    pool_threads: int | None = None  # the size ExecuTorch's thread pool was last set to in this process

    def prepare(self, model, inputs, threads):
        return self._from_file("executorch", model, inputs, threads)

    def open(self, path, threads):
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime as Loader

        # One process-wide pool, set before a program is loaded. Resetting it while a program loaded
        # at another size still runs crashed the process (a segfault in libexecutorch_threadpool, seen
        # timing 1 and 2 threads in one process), so reset only when the size changes, and time
        # ExecuTorch at one thread count per process.
        if ExecuTorch.pool_threads != threads:
            _unsafe_reset_threadpool(threads)
            ExecuTorch.pool_threads = threads
        program = Loader.get().load_program(Path(path).read_bytes())
        method = program.load_method("forward")

        def run(inputs: tuple) -> list[np.ndarray]:
            program  # the method runs inside the program's memory: keep it alive as long as this call
            return [t.numpy() for t in method.execute([x.contiguous() for x in inputs])]
        return run


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (Eager(), Compiled(), CudaGraph(), OnnxRuntime(), OpenVino(), ExecuTorch())}


def get(name: str) -> Runtime:
    """The runtime called `name`; ValueError naming the known ones otherwise."""
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}: choose one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().contiguous().numpy()
