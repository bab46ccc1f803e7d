import json
import pathlib

import pytest
import safetensors.torch
import torch
from torch import nn

import filterprune as fp
from filterprune import io, models
from filterprune.cli import main
from filterprune.models import build
from filterprune.recipes.vgg import vgg16_layout


def shrink_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d, nxt: nn.Module, keep: int) -> None:
    """Remove all but the first `keep` filters of `conv`, like a pruning step would."""
    conv.weight = nn.Parameter(conv.weight.detach()[:keep].clone())
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.detach()[:keep].clone())
    conv.out_channels = keep
    for name in ("weight", "bias"):
        setattr(bn, name, nn.Parameter(getattr(bn, name).detach()[:keep].clone()))
    bn.running_mean, bn.running_var = bn.running_mean[:keep].clone(), bn.running_var[:keep].clone()
    bn.num_features = keep
    if isinstance(nxt, nn.Conv2d):
        nxt.weight = nn.Parameter(nxt.weight.detach()[:, :keep].clone())
        nxt.in_channels = keep
    else:  # the Linear after VGG's 7x7 average pool sees 49 inputs per channel
        w = nxt.weight.detach().reshape(nxt.out_features, -1, 49)[:, :keep]
        nxt.weight = nn.Parameter(w.reshape(nxt.out_features, keep * 49).clone())
        nxt.in_features = keep * 49


def randomise_bn(model: nn.Module) -> None:
    """Non-trivial running statistics, so a lost buffer changes the outputs."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)


def assert_round_trip(model: nn.Module, path: pathlib.Path, x: torch.Tensor) -> nn.Module:
    model.eval()
    io.save(model, path, metadata={"note": "pruned"})
    loaded = io.load(path)
    assert not loaded.training
    assert loaded.filterprune_metadata == {"note": "pruned"}
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    return loaded


def test_round_trip_hand_pruned_resnet18(tmp_path):
    model = build("resnet18", num_classes=10)
    randomise_bn(model)
    block = model.layer1[0]
    shrink_conv(block.conv1, block.bn1, block.conv2, keep=40)
    model.fc = nn.Linear(512, 5)
    loaded = assert_round_trip(model, tmp_path / "r18.safetensors", torch.randn(2, 3, 64, 64))
    assert loaded.layer1[0].conv1.out_channels == 40 and loaded.layer1[0].conv2.in_channels == 40
    assert loaded.layer1[0].bn1.num_features == 40 and loaded.fc.out_features == 5
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in loaded.parameters())
    # A loaded model keeps its recipe, so it can be pruned further and saved again.
    io.save(loaded, tmp_path / "again.safetensors")
    assert io.load(tmp_path / "again.safetensors").layer1[0].conv1.out_channels == 40


def test_round_trip_hand_pruned_vgg16_layout(tmp_path):
    model = vgg16_layout(num_classes=4, width=0.125, hidden=32)
    randomise_bn(model)
    f = model.features  # conv, bn, relu triples and pools
    shrink_conv(f[0], f[1], f[3], keep=5)
    shrink_conv(f[40], f[41], model.classifier[0], keep=50)  # the last conv feeds the classifier
    loaded = assert_round_trip(model, tmp_path / "vgg.safetensors", torch.randn(2, 3, 32, 32))
    assert loaded.features[0].out_channels == 5 and loaded.classifier[0].in_features == 50 * 49


def test_untrusted_builder_is_refused(tmp_path):
    path = tmp_path / "evil.safetensors"
    marker = tmp_path / "marker"
    io.save(nn.Linear(2, 2), path, arch={"builder": "os:system", "kwargs": {"command": f"touch {marker}"}})
    with pytest.raises(ValueError, match="trusted_builders"):
        io.load(path)
    assert not marker.exists()


def test_extra_trusted_builder(tmp_path):
    path = tmp_path / "linear.safetensors"
    layer = nn.Linear(4, 3)
    io.save(layer, path, arch={"builder": "torch.nn:Linear", "kwargs": {"in_features": 4, "out_features": 6}})
    with pytest.raises(ValueError, match="torch.nn"):
        io.load(path)
    loaded = io.load(path, trusted_builders=("torch.nn",))
    assert loaded.out_features == 3 and torch.equal(loaded.weight, layer.weight)


class UserNet(nn.Module):
    """A user's own class: no builder filterprune could know of."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=width)  # depthwise: groups shrink too
        self.norm = nn.GroupNorm(width, width)
        self.act = nn.PReLU(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.ln = nn.LayerNorm([2 * width, 8, 8])
        self.fc = nn.Linear(2 * width, 5)

    def forward(self, x):
        x = self.act(self.norm(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        x = self.ln(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def pruned(model: nn.Module, x: torch.Tensor, n: int) -> nn.Module:
    """`model` with `n` channels removed by the library (l1: no data needed), in eval mode."""
    randomise_bn(model)
    before = sum(p.numel() for p in model.parameters())
    fp.Pruner(model.eval(), x, criterion="l1", ignore=[model.fc] if hasattr(model, "fc") else []).prune(n)
    assert sum(p.numel() for p in model.parameters()) < before
    return model


def assert_same_outputs(model: nn.Module, loaded: nn.Module, x: torch.Tensor) -> None:
    assert not loaded.training
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_round_trip_user_class_needs_a_fresh_model(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    model = pruned(UserNet(), x, 12)
    path = io.save(model, tmp_path / "mine.safetensors", metadata={"note": "pruned"})
    with pytest.raises(io.ModelError, match=r"pass model=YourNet\(\) to load"):
        io.load(path)
    loaded = io.load(path, model=UserNet())
    assert_same_outputs(model, loaded, x)
    assert loaded.filterprune_metadata == {"note": "pruned"}
    for a, b in zip(model.modules(), loaded.modules()):  # the size attributes describe the new shapes
        for attr in io.SHAPE_ATTRIBUTES:
            assert getattr(a, attr, None) == getattr(b, attr, None), (a, attr)
    with pytest.raises(io.ModelError, match="pass the model the file was saved from"):
        io.load(path, model=nn.Sequential(nn.Linear(2, 2)))


def test_round_trip_pruned_torchvision_resnet18_by_name(tmp_path):
    import torchvision

    x = torch.randn(2, 3, 32, 32)
    model = pruned(torchvision.models.resnet18(num_classes=7), x, 200)
    path = io.save(model, tmp_path / "r18.safetensors")
    loaded = io.load(path)  # rebuilt by torchvision.models.resnet18, found from the structure
    assert loaded.filterprune_arch["builder"] == "torchvision.models.resnet:resnet18"
    assert_same_outputs(model, loaded, x)


def test_round_trip_pruned_timm_model_by_name(tmp_path):
    timm = pytest.importorskip("timm")
    x = torch.randn(2, 3, 32, 32)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    model = pruned(model, x, 100)
    loaded = io.load(io.save(model, tmp_path / "timm.safetensors"))
    assert loaded.filterprune_arch == {"builder": "timm:create_model",
                                       "kwargs": {"model_name": "resnet18", "pretrained": False, "num_classes": 3}}
    assert_same_outputs(model, loaded, x)


def test_given_builder_is_recorded(tmp_path):
    model = vgg16_layout(num_classes=2, width=0.03)
    del model.filterprune_arch
    path = io.save(model, tmp_path / "v.safetensors", builder="filterprune.recipes.vgg:vgg16_layout", num_classes=2,
                   width=0.03)
    assert_same_outputs(model, io.load(path), torch.randn(1, 3, 32, 32))


def test_files_of_the_old_vgg16_layout_builder_still_load(tmp_path):
    model = vgg16_layout(num_classes=2, width=0.03)
    path = io.save(model, tmp_path / "old.safetensors",
                   arch={"builder": "filterprune.models:vgg16_layout", "kwargs": {"num_classes": 2, "width": 0.03}})
    assert_same_outputs(model, io.load(path), torch.randn(1, 3, 32, 32))


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    io.save(vgg16_layout(width=0.125, hidden=8), path)
    before = path.read_bytes()

    def crash(self, data):
        open(self, "wb").write(data[:100])
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_bytes", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save(vgg16_layout(width=0.25, hidden=8), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


class Marker:
    """Unpickling this creates a file: the stand-in for malicious code in a .pth file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": Marker(marker)}, path)
    with pytest.raises(ValueError, match="could run code"):
        io.load_state_dict_file(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # our own file: shows the marker does fire when unpickled
    assert marker.exists()


def test_whole_module_pickle_is_refused(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match=r"state_dict\(\)"):
        io.load_state_dict_file(path)


def test_state_dict_file_formats(tmp_path):
    state = nn.Linear(3, 2).state_dict()
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "ckpt.pth")
    safetensors.torch.save_file(state, tmp_path / "w.safetensors")
    for name in ("ckpt.pth", "w.safetensors"):
        loaded = io.load_state_dict_file(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    io.save(vgg16_layout(width=0.125, hidden=8), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        io.load(path)
    with pytest.raises(ValueError, match="model.safetensors"):
        io.load_state_dict_file(path)


# ---------------------------------------------------------------- models from the ecosystem's libraries

def _prune_ecosystem_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    from test_ecosystem import build, head  # noqa: PLC0415  (sets ultralytics' offline settings first)

    model, x = build(name)
    fp.Pruner(model, x, criterion="l1", scope="layer", ignore=head(model)).prune(ratio=0.3)
    return model, x


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t for t in torch.utils._pytree.tree_leaves(model(x)) if isinstance(t, torch.Tensor)]


def test_round_trip_pruned_transformers_model_rebuilt_from_its_config(tmp_path):
    pytest.importorskip("transformers")
    model, x = _prune_ecosystem_model("hf-resnet")
    io.save(model, tmp_path / "m.safetensors")
    with safetensors.safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        spec = json.loads(f.metadata()["filterprune"])
    assert spec["builder"] == "filterprune.models:transformers_model"
    assert spec["kwargs"]["class_name"] == "ResNetForImageClassification"
    assert spec["kwargs"]["config"]["hidden_sizes"] == [16, 32, 64, 64]  # the unpruned model's config
    loaded = io.load(tmp_path / "m.safetensors")  # no model=: built from the config in the file
    assert type(loaded) is type(model)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model, x), _outputs(loaded, x), strict=True))


def test_transformers_builder_only_builds_transformers_model_classes():
    pytest.importorskip("transformers")
    with pytest.raises(models.ModelError, match="not a model class"):
        models.transformers_model("AutoTokenizer", {"model_type": "resnet"})
    with pytest.raises(models.ModelError, match="model type"):
        models.transformers_model("ResNetModel", {"model_type": "no-such-type"})


def test_round_trip_pruned_yolo_model_with_model_given(tmp_path):
    ultralytics = pytest.importorskip("ultralytics")
    model, x = _prune_ecosystem_model("yolov8n")
    io.save(model, tmp_path / "yolo.safetensors")
    with pytest.raises(io.ModelError, match="model=YourNet"):
        io.load(tmp_path / "yolo.safetensors")
    loaded = io.load(tmp_path / "yolo.safetensors", model=ultralytics.YOLO("yolov8n.yaml").model)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model, x), _outputs(loaded, x), strict=True))
    assert torch.equal(loaded.stride, model.stride) and torch.equal(loaded.model[-1].stride, model.model[-1].stride)


def test_cli_profiles_a_saved_transformers_model(tmp_path, capsys):
    pytest.importorskip("transformers")
    model, _ = _prune_ecosystem_model("hf-resnet")
    io.save(model, tmp_path / "m.safetensors")
    assert main(["profile", "--model", str(tmp_path / "m.safetensors"), "--size", "32", "--batch-sizes", "1"]) == 0
    assert "MACs" in capsys.readouterr().out
