import ast
import urllib.error
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn
from torchvision.models._api import WeightsEnum

import filterprune
from filterprune.models import ModelError, build, three_linear_head
from filterprune.recipes.vgg import vgg16_layout


def count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def test_vgg16_layout_structure_and_output():
    model = vgg16_layout(num_classes=7, width=0.125, hidden=32)
    assert count(model, nn.Conv2d) == 13
    assert count(model, nn.MaxPool2d) == 5
    assert count(model, nn.BatchNorm2d) == 13
    assert count(model, nn.Linear) == 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_vgg16_layout_width_scaling():
    model = vgg16_layout(width=0.25, batch_norm=False)
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]
    assert count(model, nn.BatchNorm2d) == 0
    assert model.classifier[0].in_features == 128 * 49
    assert model.classifier[0].out_features == 1024  # int(4096 * width)
    tiny = vgg16_layout(width=0.01, hidden=16)
    assert {m.out_channels for m in tiny.modules() if isinstance(m, nn.Conv2d)} == {8}


def test_three_linear_head():
    head = three_linear_head(100, 5, hidden=20, dropout=0.2)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(100, 20), (20, 20), (20, 5)]
    assert head[2].p == 0.2


def test_build_resnet18_replaces_fc():
    model = build("resnet18", num_classes=3)
    assert model.fc.out_features == 3 and count(model, nn.Linear) == 1
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    assert model.filterprune_arch == {
        "builder": "filterprune.models:build",
        "kwargs": {"arch": "resnet18", "num_classes": 3, "head": "auto", "hidden": None},
    }


def test_build_squeezenet_replaces_final_conv():
    model = build("squeezenet1_1", num_classes=3)
    assert isinstance(model.classifier[1], nn.Conv2d) and model.classifier[1].out_channels == 3
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_build_vgg_gets_three_linear_head():
    model = build("vgg11", num_classes=4, hidden=64)
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512 * 49, 64), (64, 64), (64, 4)]
    replaced = build("vgg11", num_classes=4, head="replace")
    assert replaced.classifier[0].out_features == 4096 and replaced.classifier[6].out_features == 4
    assert count(build("resnet18", num_classes=4, head="auto"), nn.Linear) == 1


def test_build_vgg16_layout_and_unknown_arch():
    model = build("vgg16_layout", num_classes=5, width=0.125, hidden=16)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert model.filterprune_arch["kwargs"]["width"] == 0.125
    with pytest.raises(ModelError, match="list_models"):
        build("resnet19")


def test_pretrained_without_network_says_use_weights(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(ModelError, match="--weights FILE") as info:
        build("resnet18", num_classes=3, pretrained=True)
    assert isinstance(info.value, RuntimeError)


def test_weights_file_round_trip(tmp_path):
    trained = build("resnet18", num_classes=3).eval()
    file = tmp_path / "r18.safetensors"
    safetensors.torch.save_file(trained.state_dict(), file)
    loaded = build("resnet18", num_classes=3, weights=file).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(trained(x), loaded(x))
    assert "weights" not in loaded.filterprune_arch["kwargs"]


def test_weights_file_with_default_head_then_new_head(tmp_path):
    imagenet = build("resnet18")  # stands in for downloaded ImageNet weights
    file = tmp_path / "r18.pth"
    torch.save(imagenet.state_dict(), file)
    model = build("resnet18", num_classes=3, weights=file)
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert model.fc.out_features == 3


def test_weights_file_mismatch_names_keys(tmp_path):
    file = tmp_path / "small.safetensors"
    safetensors.torch.save_file(vgg16_layout(width=0.25, hidden=16).state_dict(), file)
    with pytest.raises(ModelError, match=r"features\.0\.weight: file \[16, 3, 3, 3\] vs model \[8, 3, 3, 3\]"):
        build("vgg16_layout", width=0.125, hidden=16, weights=file)


def test_the_core_imports_nothing_from_the_recipes():
    """The library stands without its demo: only the front ends (the package's public names, the
    command line) reach into recipes/."""
    package = Path(filterprune.__file__).parent
    core = [p for p in package.glob("*.py") if not p.name.startswith(("__", "cli"))]
    assert {p.stem for p in core} >= {"graph", "surgery", "criteria", "pruner", "schedule", "measure", "io", "data", "models"}
    for path in core:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("recipes" in n or n == "demo" for n in names), f"{path.name} imports {names}"


def test_registered_architectures_build_by_name():
    assert build("vgg16_layout", num_classes=3, width=0.03).classifier[-1].out_features == 3
    with pytest.raises(ModelError, match="no pretrained weights"):
        build("vgg16_layout", pretrained=True)


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"])
def test_pruning_a_detectors_backbone(name, tmp_path):
    """torch.fx cannot trace a detector whole; its backbone can be pruned on its own (fp.Pruner(model.backbone, x))."""
    import torchvision

    import filterprune as fp

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3).eval()
    for m in model.modules():  # non-trivial statistics, so the exactness check has something to check
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 160, 160)
    before = fp.profile(model.backbone, x, latency=False).macs
    pruner = fp.Pruner(model.backbone, x, criterion="l1", verify=True)  # verify: equal to the unpruned with removed channels zeroed
    result = pruner.prune(pruner.prunable() // 3)
    assert result.count > 0
    after = fp.profile(model.backbone, x, latency=False).macs
    assert after < 0.9 * before
    images = [torch.rand(3, 100, 120), torch.rand(3, 90, 110)]
    with torch.no_grad():
        detections = model(images)  # the whole detector still runs on a list of images
    assert len(detections) == 2 and all({"boxes", "labels", "scores"} <= d.keys() for d in detections)
    # and it saves and loads by name (torchvision's builder, found from the structure)
    loaded = fp.load(fp.save(model, tmp_path / "detector.safetensors"))
    with torch.no_grad():
        again = loaded(images)
    for a, b in zip(detections, again):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
