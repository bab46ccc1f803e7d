"""Models users bring from the ecosystem's libraries prune, with the pruner's check, from their own code.

Two models of each library, small and with random weights; nothing is downloaded (transformers
models from their configs, ultralytics from its .yaml). Each is pruned at 30% of every layer
with the head ignored, and the pruner's self-check compares it with the unpruned model whose
removed channels are zeroed ("exact"; "forward-only" where a norm across channels makes
exactness undefined). benchmarks/bench_zoo.py runs the whole zoo.
"""

import os
import tempfile

# ultralytics writes its settings file at import: keep it out of $HOME, and never online.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="filterprune-yolo-"))

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import filterprune as fp  # noqa: E402

LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def smp_unet():
    smp = pytest.importorskip("segmentation_models_pytorch")
    return smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8), classes=2)


def smp_linknet():
    smp = pytest.importorskip("segmentation_models_pytorch")
    return smp.Linknet("resnet18", encoder_weights=None, encoder_depth=3, classes=2)


def hf_resnet():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1],
                                       layer_type="basic", num_labels=10)
    return transformers.ResNetForImageClassification(config)


def hf_convnext():
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextConfig(hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1], num_labels=10)
    return transformers.AutoModelForImageClassification.from_config(config)


def yolov8n():
    ultralytics = pytest.importorskip("ultralytics")
    return ultralytics.YOLO("yolov8n.yaml").model


def yolo11n_cls():
    ultralytics = pytest.importorskip("ultralytics")
    return ultralytics.YOLO("yolo11n-cls.yaml").model


def monai_basic_unet():
    nets = pytest.importorskip("monai.networks.nets")
    return nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(8, 8, 16, 16, 32, 8))


def monai_unet():
    nets = pytest.importorskip("monai.networks.nets")
    return nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
                     num_res_units=1)


IMAGE, VOLUME = (3, 32, 32), (1, 16, 16, 16)
# name: (builder, one example's shape, the check the pruner reports)
MODELS = {
    "smp-unet": (smp_unet, IMAGE, "exact"),
    "smp-linknet": (smp_linknet, IMAGE, "exact"),
    "hf-resnet": (hf_resnet, IMAGE, "exact"),
    "hf-convnext": (hf_convnext, IMAGE, "forward-only"),  # LayerNorm over channels
    "yolov8n": (yolov8n, (3, 64, 64), "exact"),
    "yolo11n-cls": (yolo11n_cls, IMAGE, "exact"),
    "monai-basicunet": (monai_basic_unet, (1, 32, 32, 32), "exact"),  # 4 halvings, instance norms need > 1 voxel
    "monai-unet": (monai_unet, VOLUME, "exact"),
}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The unpruned model (random weights, eval mode) and an example input of batch 1."""
    builder, shape, _ = MODELS[name]
    torch.manual_seed(0)
    return builder().eval(), torch.randn(1, *shape)


def head(model: nn.Module) -> list[nn.Module]:
    """YOLO's whole Detect/Classify module, else the classifier or the segmentation head."""
    if type(model).__module__.startswith("ultralytics."):
        return [m for m in model.model[-1].modules() if isinstance(m, LAYERS)]
    for name in ("classifier", "segmentation_head", "final_conv"):
        if hasattr(model, name):
            return [m for m in getattr(model, name).modules() if isinstance(m, LAYERS)][-1:]
    return [m for m in model.modules() if isinstance(m, LAYERS)][-1:]  # MONAI's UNet: its last conv


def macs(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name", MODELS)
def test_ecosystem_models_prune_with_a_check(name):
    model, x = build(name)
    before = macs(model, x)
    with torch.no_grad():
        shapes = [t.shape for t in torch.utils._pytree.tree_leaves(model(x)) if isinstance(t, torch.Tensor)]
    pruner = fp.Pruner(model, x, criterion="l1", scope="layer", ignore=head(model))
    result = pruner.prune(ratio=0.3)  # the self-check raises if the model is not what it says
    assert result.check == MODELS[name][2]
    assert before / macs(model, x) > 1.3
    with torch.no_grad():  # another batch size still runs, with the same output shapes
        out = model(torch.randn(3, *x.shape[1:]))
    assert [t.shape[1:] for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)] == \
           [s[1:] for s in shapes]


def test_transformers_models_take_pixel_values_by_keyword():
    model, x = build("hf-resnet")
    pruner = fp.Pruner(model, (), example_kwargs={"pixel_values": x}, criterion="l1", scope="layer",
                       ignore=head(model))
    assert pruner.prune(ratio=0.3).check == "exact"
    assert model(pixel_values=x).logits.shape == (1, 10)
