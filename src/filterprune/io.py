"""Save and load (pruned) models as one .safetensors file without pickle (exports: export.py).

Pruning changes a model's shapes, so a pruned model no longer fits the module tree its builder
makes. `save` stores, with the weights, every module's size attributes (the safetensors header
already holds each tensor's shape); `load` builds (or is given) the unpruned model, shrinks it to
the saved shapes and loads the weights. The builder is recorded where it is known: a
`filterprune_arch` set by `filterprune.models.build`, a timm model's architecture name, a
torchvision model found by its structure, a transformers model's class and config (as JSON:
`filterprune.models.transformers_model` rebuilds it, no code from the file, no hub), or
`builder=` given to `save`. Other models (ultralytics, segmentation_models_pytorch, MONAI, your
own) load with `load(path, model=...)`.
"""

from __future__ import annotations

import errno
import importlib
import json
import pickle
import warnings
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from .surgery import SHAPE_ATTRIBUTES  # saved so the shrunk modules describe their new shapes
from .utils import atomic_write, state_tensors

DEFAULT_TRUSTED = ("filterprune", "torchvision.models", "timm")
FORMAT = 2
# Builders renamed since files were written: old name -> new name.
RENAMED_BUILDERS = {"filterprune.models:vgg16_layout": "filterprune.recipes.vgg:vgg16_layout"}


class ModelError(RuntimeError):
    """A model could not be built, saved or loaded; the message says what to do."""


class ModelFileError(ModelError, ValueError):
    """A model file is unreadable, refused, or does not fit the model."""


def save(model: nn.Module, path: str | Path, arch: dict | None = None, metadata: dict | None = None, *,
         builder: str | None = None, **builder_kwargs) -> Path:
    """Write `model` (pruned or not) to one .safetensors file that `load` can rebuild it from.

    `builder="pkg.module:function"` (called with `builder_kwargs` at load time; it must return
    the unpruned model) or `arch={"builder": ..., "kwargs": {...}}` say how to rebuild the model;
    without them the builder is found where it can be (see the module's docstring). Without
    a builder the file still loads with `load(path, model=YourNet())`.
    """
    if builder is not None:
        arch = {"builder": builder, "kwargs": builder_kwargs}
    arch = arch if arch is not None else getattr(model, "filterprune_arch", None) or _known_builder(model)
    if arch is not None and ":" not in str(arch.get("builder", "")):
        raise ModelError(f'builder must look like "pkg.module:function", not {arch.get("builder")!r}')
    tensors, aliases = state_tensors(model)
    attributes = {}
    for name, module in model.named_modules():
        found = {a: _plain(getattr(module, a)) for a in SHAPE_ATTRIBUTES if _is_size(getattr(module, a, None))}
        if found:
            attributes[name] = found
    spec = {
        "format": FORMAT,
        "builder": arch["builder"] if arch else None,
        "kwargs": arch.get("kwargs", {}) if arch else {},
        "attributes": attributes,
        "aliases": aliases,
        "metadata": metadata or {},
    }
    return atomic_write(path, safetensors.torch.save(tensors, metadata={"filterprune": json.dumps(spec)}))


def load(path: str | Path, model: nn.Module | None = None, trusted_builders: tuple[str, ...] = DEFAULT_TRUSTED) -> nn.Module:
    """Rebuild a model written by `save`, with its saved (pruned) shapes, in eval mode.

    `model`: a freshly built, unpruned instance of the saved model's class (needed where the file
    records no builder); it is shrunk to the saved shapes in place and returned. Otherwise the
    recorded builder is called, only if its module is in `trusted_builders`.
    The `metadata` given to `save` comes back as `model.filterprune_metadata`.
    """
    path = Path(path)
    spec, state = _read(path)
    builder = RENAMED_BUILDERS.get(spec["builder"], spec["builder"])
    source = type(model).__name__ if model is not None else builder
    if model is None:
        if builder is None:
            raise ModelError(f"{path} does not record how to build its model: pass model=YourNet() to load "
                             "(a freshly built, unpruned instance of the saved class)")
        model = _call_builder(builder, spec["kwargs"], trusted_builders)
    modules = dict(model.named_modules())
    for name, attrs in spec["attributes"].items():
        if name not in modules:
            raise ModelFileError(f"{path}: module {name!r} does not exist in {source}: pass the model the file was saved from")
        for attr, value in attrs.items():
            setattr(modules[name], attr, tuple(value) if isinstance(value, list) else value)
    for alias, kept in spec["aliases"].items():
        state[alias] = state[kept]
    expected = model.state_dict().keys()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ModelFileError(f"{path} does not fit {source}: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                             "pass the model the file was saved from")
    _replace_tensors(model, state)
    if spec["builder"] is not None:  # so that a loaded model can be pruned further and saved again
        model.filterprune_arch = {"builder": builder, "kwargs": spec["kwargs"]}
    model.filterprune_metadata = spec["metadata"]
    return model.eval()


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The file's filterprune spec and its tensors; refuses pickles without opening them."""
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such model file: pass a .safetensors file written by filterprune", str(path))
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"PK" or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):  # torch.save's zip, or a pickle
        raise ModelFileError(
            f"refused to load {path}: it is a pickle (torch.save) file, and unpickling can run code. If you trust it, "
            "convert it in a trusted environment: build the model, load_state_dict(torch.load(f, weights_only=False)) "
            "and filterprune.save(model, 'model.safetensors'); a plain state dict can be given as --weights with --arch"
        )
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            spec = json.loads((f.metadata() or {})["filterprune"])
            # A fresh (aligned) copy: kernels may take another path, and round differently, on
            # memory at an odd offset in the file's buffer, and loaded models must compute as saved.
            state = {k: f.get_tensor(k).clone() for k in f.keys()}
        if spec["format"] not in (1, FORMAT):
            raise ValueError(f"unsupported format {spec['format']} (written by a newer filterprune?)")
    except (SafetensorError, KeyError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ModelFileError(
            f"{path} is not a readable filterprune model file (damaged, truncated, or not written by "
            f"filterprune.io.save; for a plain state dict use load_state_dict_file): {e!r}"
        ) from e
    spec.setdefault("aliases", {})
    return spec, state


def _replace_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Swap every parameter and saved buffer for the file's tensor (of the saved, pruned shape)."""
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


def _is_size(value) -> bool:
    return isinstance(value, int) or (isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value))


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _is_trusted(name: str, trusted: tuple[str, ...]) -> bool:
    return any(name == t or name.startswith(t + ".") for t in trusted)


def _call_builder(builder: str, kwargs: dict, trusted: tuple[str, ...]) -> nn.Module:
    module_name, _, fn_name = builder.partition(":")
    if not _is_trusted(module_name, trusted) or not fn_name.isidentifier() or fn_name.startswith("_"):
        raise ModelFileError(
            f"refusing to call builder {builder!r}: it is not in trusted_builders {trusted}. If you trust the "
            f"file, call load(path, trusted_builders=(*filterprune.io.DEFAULT_TRUSTED, {module_name!r}))"
        )
    fn = getattr(importlib.import_module(module_name), fn_name, None)
    # Only functions defined in a trusted module, not names it happens to import.
    if not callable(fn) or not _is_trusted(getattr(fn, "__module__", "") or "", trusted):
        raise ModelFileError(f"refusing builder {builder!r}: not a function defined in a trusted module")
    return fn(**kwargs)


# ---------------------------------------------------------------- finding a model's builder

def _known_builder(model: nn.Module) -> dict | None:
    """{"builder", "kwargs"} of a transformers, timm or torchvision builder that makes `model`'s structure, else None."""
    kind = type(model).__module__
    config = getattr(model, "config", None)
    if kind.startswith("transformers.") and hasattr(config, "to_json_string"):
        # The whole config (use_diff=False): the defaults of a later transformers may differ.
        return {"builder": "filterprune.models:transformers_model",
                "kwargs": {"class_name": type(model).__name__, "config": json.loads(config.to_json_string(use_diff=False))}}
    if kind.startswith("timm."):
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        if cfg.get("architecture"):
            kwargs = {"model_name": cfg["architecture"], "pretrained": False}
            if isinstance(getattr(model, "num_classes", None), int):
                kwargs["num_classes"] = model.num_classes
            return _matching(model, [{"builder": "timm:create_model", "kwargs": kwargs}])
    if kind.startswith("torchvision.models."):
        import inspect

        import torchvision

        # Builders of the class's own module first, then of its sub-package (SSD is defined in
        # detection.ssd, ssdlite320_mobilenet_v3_large in detection.ssdlite).
        package = kind.rpartition(".")[0]
        candidates = []
        for name in torchvision.models.list_models():
            fn = torchvision.models.get_model_builder(name)
            if fn.__module__ == kind or (package != "torchvision.models" and fn.__module__.startswith(package + ".")):
                # never weights that would be downloaded: the saved file holds the weights
                kwargs = {k: None for k in ("weights", "weights_backbone") if k in inspect.signature(fn).parameters}
                candidates.append({"builder": f"{fn.__module__}:{fn.__name__}", "kwargs": kwargs})
        return _matching(model, sorted(candidates, key=lambda arch: not arch["builder"].startswith(kind + ":")))
    return None


def _matching(model: nn.Module, candidates: list[dict]) -> dict | None:
    """The first candidate whose unpruned model has `model`'s modules, settings and tensor names."""
    target = _structure(model)
    for arch in candidates:
        built = _structure_of(arch)
        if built is None:
            continue
        if built == target:
            return arch
        # A class count kept outside the size attributes (SSD's num_columns): build again with it.
        counts = {v for name, settings in target[0].items() if name in built[0]
                  for k, v in settings.items() if isinstance(v, int) and built[0][name].get(k, v) != v}
        if len(counts) == 1 and "num_classes" not in arch["kwargs"]:
            retry = {**arch, "kwargs": {**arch["kwargs"], "num_classes": counts.pop()}}
            if _structure_of(retry) == target:
                return retry
    return None


def _structure_of(arch: dict) -> tuple | None:
    """_structure of the unpruned model `arch` builds, built on the meta device (no memory, no initialisation)."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _structure(_call_builder(arch["builder"], arch["kwargs"], DEFAULT_TRUSTED))
    except Exception:  # a builder that cannot run here (meta device, missing kwargs) is not the one
        return None


def _structure(model: nn.Module) -> tuple[dict, list]:
    """Module types and settings that pruning leaves alone (kernel sizes, strides, eps...), and tensor names."""
    modules = {name: {"type": type(m).__qualname__,
                      **{k: v for k, v in vars(m).items()
                         if not k.startswith("_") and k != "training" and k not in SHAPE_ATTRIBUTES
                         and isinstance(v, (bool, int, float, str, tuple))}}
               for name, m in model.named_modules()}
    return modules, sorted(model.state_dict().keys())


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or from a .pth/.pt file, never running code stored in it."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise ModelFileError(f"{path}: damaged or not a safetensors file: {e}") from e
    try:
        with warnings.catch_warnings():  # noise about old pickle protocols: the file is refused or fine anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFileError(
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
        raise ModelFileError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)
