"""The demo's network: torchvision's VGG16 with every width scaled, for small images.

Registered as `filterprune.models.build("vgg16_layout", ...)` when this module is imported
(`import filterprune` does it).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import VGG
from torchvision.models.vgg import cfgs, make_layers

from ..models import register, three_linear_head


@register("vgg16_layout")
def vgg16_layout(
    num_classes: int = 10,
    width: float = 0.5,
    batch_norm: bool = True,
    hidden: int | None = None,
    dropout: float = 0.5,
) -> nn.Module:
    """torchvision's VGG16 (config "D") with every layer width multiplied by `width`."""
    cfg = [v if v == "M" else max(8, round(v * width)) for v in cfgs["D"]]
    features = make_layers(cfg, batch_norm=batch_norm)
    hidden = hidden if hidden is not None else int(4096 * width)
    # VGG hard-codes a 512*7*7 -> 4096 classifier that we replace at once; building it on
    # the meta device avoids allocating and initialising ~120M parameters for nothing.
    with torch.device("meta"):
        model = VGG(features, num_classes=num_classes, init_weights=True, dropout=dropout)
    model.classifier = three_linear_head(cfg[-2] * 7 * 7, num_classes, hidden, dropout)
    for m in model.classifier.modules():
        if isinstance(m, nn.Linear):  # same init as VGG(init_weights=True)
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)
    spec = {"num_classes": num_classes, "width": width, "batch_norm": batch_norm, "hidden": hidden, "dropout": dropout}
    model.filterprune_arch = {"builder": "filterprune.recipes.vgg:vgg16_layout", "kwargs": spec}
    return model
