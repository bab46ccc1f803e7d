"""Save and load (pruned) models as one .safetensors file without pickle, and export to ONNX."""

from __future__ import annotations

import errno
import importlib
import json
import os
import pickle
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

# Integer attributes that pruning changes; saved so the rebuilt modules describe their new shapes.
SHAPE_ATTRIBUTES = (
    "in_channels", "out_channels", "groups", "in_features", "out_features",
    "num_features", "num_channels", "num_groups", "num_parameters",
)
DEFAULT_TRUSTED = ("filterprune.models", "torchvision.models")


def state_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict as safetensors can store it, and {dropped name: kept name} for shared tensors."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in model.state_dict().items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:  # the same tensor under two names (tied weights)
            aliases[name] = seen[key]
            continue
        seen[key] = name
        # safetensors refuses tensors that share memory, e.g. two views of one buffer.
        tensors[name] = t.contiguous() if ptr not in storages else t.clone(memory_format=torch.contiguous_format)
        if t.numel():
            storages.add(ptr)
    return tensors, aliases


def save(model: nn.Module, path: str | Path, arch: dict | None = None, metadata: dict | None = None) -> Path:
    """Write `model` (possibly pruned) to one .safetensors file that `load` can rebuild it from."""
    arch = arch if arch is not None else getattr(model, "filterprune_arch", None)
    if not isinstance(arch, dict) or ":" not in str(arch.get("builder", "")):
        raise ValueError(
            "cannot tell how to rebuild this model: build it with filterprune.models.build, or pass "
            'arch={"builder": "pkg.mod:fn", "kwargs": {...}} (fn(**kwargs) must return the unpruned model)'
        )
    tensors, aliases = state_tensors(model)
    attributes = {}
    for name, module in model.named_modules():
        found = {a: getattr(module, a) for a in SHAPE_ATTRIBUTES if isinstance(getattr(module, a, None), int)}
        if found:
            attributes[name] = found
    spec = {
        "format": 1,
        "builder": arch["builder"],
        "kwargs": arch.get("kwargs", {}),
        "attributes": attributes,
        "aliases": aliases,
        "metadata": metadata or {},
    }
    data = safetensors.torch.save(tensors, metadata={"filterprune": json.dumps(spec)})
    path = Path(path)
    with _atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def load(path: str | Path, trusted_builders: tuple[str, ...] = DEFAULT_TRUSTED) -> nn.Module:
    """Rebuild a model written by `save`, with its saved (pruned) shapes, in eval mode.

    The `metadata` given to `save` comes back as `model.filterprune_metadata`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such model file: pass a .safetensors file written by filterprune", str(path))
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"PK" or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):  # torch.save's zip, or a pickle
        raise ValueError(
            f"refused to load {path}: it is a pickle (torch.save) file, and unpickling can run code. If you trust it, "
            "convert it in a trusted environment: build the model, load_state_dict(torch.load(f, weights_only=False)) "
            "and filterprune.save(model, 'model.safetensors'); a plain state dict can be given as --weights with --arch"
        )
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            spec = json.loads((f.metadata() or {})["filterprune"])
            state = {k: f.get_tensor(k) for k in f.keys()}
        if spec["format"] != 1:
            raise ValueError(f"unsupported format {spec['format']} (written by a newer filterprune?)")
    except (SafetensorError, KeyError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(
            f"{path} is not a readable filterprune model file (damaged, truncated, or not written by "
            f"filterprune.io.save; for a plain state dict use load_state_dict_file): {e!r}"
        ) from e
    for alias, kept in spec.get("aliases", {}).items():
        state[alias] = state[kept]
    model = _call_builder(spec["builder"], spec["kwargs"], trusted_builders)

    modules = dict(model.named_modules())
    for name, attrs in spec["attributes"].items():
        if name not in modules:
            raise ValueError(f"{path}: module {name!r} does not exist in the model built by {spec['builder']}")
        for attr, value in attrs.items():
            setattr(modules[name], attr, value)

    expected = model.state_dict().keys()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path}: does not match {spec['builder']}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    replaced: dict[int, nn.Parameter] = {}  # keeps tied parameters tied
    for prefix, module in model.named_modules():
        dot = prefix + "." if prefix else ""
        for pname, p in list(module.named_parameters(recurse=False)):
            if id(p) not in replaced:
                replaced[id(p)] = nn.Parameter(state[dot + pname], requires_grad=p.requires_grad)
            setattr(module, pname, replaced[id(p)])
        for bname, _ in list(module.named_buffers(recurse=False)):
            if dot + bname in state:  # non-persistent buffers are not saved and keep the builder's value
                setattr(module, bname, state[dot + bname])
    # So that a loaded model can be pruned further and saved again.
    model.filterprune_arch = {"builder": spec["builder"], "kwargs": spec["kwargs"]}
    model.filterprune_metadata = spec["metadata"]
    return model.eval()


def _call_builder(builder: str, kwargs: dict, trusted: tuple[str, ...]) -> nn.Module:
    module_name, _, fn_name = builder.partition(":")

    def is_trusted(name: str) -> bool:
        return any(name == t or name.startswith(t + ".") for t in trusted)

    if not is_trusted(module_name) or not fn_name.isidentifier() or fn_name.startswith("_"):
        raise ValueError(
            f"refusing to call builder {builder!r}: it is not in trusted_builders {trusted}. If you trust the "
            f"file, call load(path, trusted_builders=(*filterprune.io.DEFAULT_TRUSTED, {module_name!r}))"
        )
    fn = getattr(importlib.import_module(module_name), fn_name, None)
    # Only functions defined in a trusted module, not names it happens to import.
    if not callable(fn) or not is_trusted(getattr(fn, "__module__", "") or ""):
        raise ValueError(f"refusing builder {builder!r}: not a function defined in a trusted module")
    return fn(**kwargs)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or from a .pth/.pt file, never running code stored in it."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise ValueError(f"{path}: damaged or not a safetensors file: {e}") from e
    try:
        with warnings.catch_warnings():  # noise about old pickle protocols: the file is refused or fine anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refused to load {path}: it contains pickled objects other than tensors, and loading it could run "
            "code. If you trust it, convert it in a trusted environment: torch.save(torch.load(f, "
            "weights_only=False).state_dict(), 'weights.pth'), or save it as .safetensors."
        ) from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def export_onnx(model: nn.Module, example_inputs, path: str | Path, opset: int | None = None) -> Path:
    """Export `model` in eval mode to ONNX with a dynamic batch dimension, and check the result."""
    import onnx

    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    # torch.export specialises a dimension of size 1, so trace a batch of two to keep it dynamic.
    inputs = tuple(x[:1].repeat(2, *[1] * (x.dim() - 1)) if x.shape[0] == 1 else x for x in inputs)
    names = [f"input{i}" for i in range(len(inputs))]
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        with _atomic_path(path) as tmp:
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
    finally:
        model.train(was_training)
    return path


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` that replaces `path` only if the block succeeds."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a saved model is an ordinary file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
