"""Model builders: torchvision classifiers by name, architectures that recipes register, and new heads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from .io import ModelError, load_state_dict_file

# Architectures beside torchvision's, by name: recipes add theirs with `register` (the demo's
# vgg16_layout), so this module needs to know none of them. A builder takes num_classes and
# keyword arguments and returns the unpruned model.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable:
    """Decorator: make `build(name, ...)` call the decorated builder."""
    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES[name] = fn
        return fn
    return add


def three_linear_head(in_features: int, num_classes: int, hidden: int = 4096, dropout: float = 0.5) -> nn.Sequential:
    """The classifier of the pruning blog post: three Linear layers like torchvision's VGG classifier."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(True),
        nn.Dropout(p=dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(True),
        nn.Dropout(p=dropout),
        nn.Linear(hidden, num_classes),
    )


def build(
    arch: str,
    num_classes: int | None = None,
    pretrained: bool = False,
    weights: str | Path | None = None,
    head: str = "auto",
    hidden: int | None = None,
    **kwargs,
) -> nn.Module:
    """Build `arch` (a torchvision classifier or a registered architecture), optionally with weights and a new head."""
    if head not in ("auto", "three-linear", "replace"):
        raise ModelError(f"unknown head {head!r}; use 'auto', 'three-linear' or 'replace'")
    model = _base_model(arch, pretrained, num_classes, hidden, kwargs)
    if weights is not None:
        state = load_state_dict_file(weights)
        # The file may hold the architecture's default head or an already replaced one.
        if _mismatches(model, state):
            _set_head(model, arch, num_classes, head, hidden)
        _load_checked(model, state, weights, arch)
    _set_head(model, arch, num_classes, head, hidden)
    spec = {"arch": arch, "num_classes": num_classes, "head": head, "hidden": hidden, **kwargs}
    model.filterprune_arch = {"builder": "filterprune.models:build", "kwargs": spec}
    return model


def transformers_model(class_name: str, config: dict) -> nn.Module:
    """An unpruned transformers model of class `class_name` built from its config's dict (random
    weights): how `filterprune.load` rebuilds a saved transformers model. Only model classes that
    transformers itself exports are built, and nothing is fetched from the hub."""
    try:
        import transformers
    except ImportError as e:
        raise ModelError(f"this file holds a transformers {class_name}: pip install transformers") from e
    cls = getattr(transformers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelError(f"{class_name!r} is not a model class of transformers {transformers.__version__}")
    try:
        config_class = transformers.CONFIG_MAPPING[config.get("model_type")]
    except KeyError as e:  # (the lazy mapping's .get() finds nothing it has not loaded yet)
        raise ModelError(f"transformers {transformers.__version__} does not know the model type "
                         f"{config.get('model_type')!r}") from e
    return cls(config_class.from_dict(config))


def _base_model(arch: str, pretrained: bool, num_classes: int | None, hidden: int | None, kwargs: dict) -> nn.Module:
    if arch in ARCHITECTURES:
        if pretrained:
            raise ModelError(f"{arch} has no pretrained weights; train it, or pass weights=FILE")
        sizes = {"num_classes": num_classes} if num_classes is not None else {}
        return ARCHITECTURES[arch](**sizes, **({"hidden": hidden} if hidden is not None else {}), **kwargs)
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(
            f"unknown architecture {arch!r}: use one of {sorted(ARCHITECTURES)} or a name from "
            "`python -c 'import torchvision; print(torchvision.models.list_models(module=torchvision.models))'`"
        )
    if not pretrained:
        return torchvision.models.get_model(arch, **kwargs)
    default = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return torchvision.models.get_model(arch, weights=default, **kwargs)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; bad hashes/partial files are RuntimeErrors
        raise ModelError(
            f"could not download the pretrained weights {default} for {arch} ({e}); on a machine without "
            "internet pass --weights FILE (a .safetensors or state-dict .pth of the same architecture)"
        ) from e


def _final_layer(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute name, layer) of the layer that produces the class scores."""
    for path in ("fc", "classifier", "heads.head", "head"):
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = getattr(parent, name, None)
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            return parent, name, layer
        if isinstance(layer, nn.Sequential):
            # Last Linear, or SqueezeNet's 1x1 Conv2d followed by ReLU and pooling.
            for i in reversed(range(len(layer))):
                if isinstance(layer[i], (nn.Linear, nn.Conv2d)):
                    return layer, str(i), layer[i]
    raise ModelError(f"cannot find the classification layer of {type(model).__name__} to replace")


def _num_outputs(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _set_head(model: nn.Module, arch: str, num_classes: int | None, head: str, hidden: int | None) -> None:
    """Give `model` a head with `num_classes` outputs; no-op when it already has that many."""
    parent, name, layer = _final_layer(model)
    if num_classes is None or _num_outputs(layer) == num_classes:
        return
    if head == "auto":
        head = "three-linear" if arch.startswith("vgg") else "replace"
    if head == "three-linear":
        old = getattr(model, "classifier", None)
        linears = [m for m in old.modules() if isinstance(m, nn.Linear)] if isinstance(old, nn.Module) else []
        if not linears:
            raise ModelError(f"head='three-linear' needs a VGG-style `.classifier` with Linear layers; {arch} has none")
        dropout = next((m.p for m in old.modules() if isinstance(m, nn.Dropout)), 0.5)
        width = hidden if hidden is not None else linears[0].out_features
        model.classifier = three_linear_head(linears[0].in_features, num_classes, width, dropout)
    elif isinstance(layer, nn.Linear):
        setattr(parent, name, nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None))
    else:
        new = nn.Conv2d(layer.in_channels, num_classes, layer.kernel_size, layer.stride, layer.padding)
        setattr(parent, name, new)


def _mismatches(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between the model's state dict and `state`."""
    own = model.state_dict()
    problems = [f"{k}: missing from file" for k in own if k not in state]
    problems += [f"{k}: not in model" for k in state if k not in own]
    problems += [
        f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    return problems


def _load_checked(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, arch: str) -> None:
    problems = _mismatches(model, state)
    if problems:
        raise ModelError(
            f"{path} does not fit {arch} ({len(problems)} mismatching keys, e.g. {'; '.join(problems[:4])}). "
            "Pass the architecture the weights were trained with (and its num_classes), or, for a pruned model, "
            "load the file written by filterprune.io.save with filterprune.io.load instead."
        )
    model.load_state_dict(state)
