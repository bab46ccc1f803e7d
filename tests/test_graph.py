"""Exactness: a pruned model equals the unpruned one with the removed channels zeroed."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import filterprune as fp
from filterprune.graph import ChannelGraph

MODELS = [
    "vgg16_bn", "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "densenet121",
    "efficientnet_b0", "googlenet", "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_x_400mf",
]


def randomize_norms(model: nn.Module) -> None:
    """Non-trivial BN statistics, so that a wrong slice of a norm changes the output."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def zero_removed(model: nn.Module, removed: dict[str, list[int]]) -> None:
    """Zero the removed output channels of every layer named in result.removed (producers,
    norms, depthwise convs): their outputs are then exactly zero wherever they go."""
    with torch.no_grad():
        for name, indices in removed.items():
            index = torch.tensor(indices)
            owner = model.get_submodule(name.rpartition(".")[0]) if not _is_module(model, name) else None
            if owner is not None:  # a bare parameter such as a layer scale
                getattr(owner, name.rpartition(".")[2]).index_fill_(0, index, 0.0)
                continue
            module = model.get_submodule(name)
            module.weight.index_fill_(0, index, 0.0)
            if getattr(module, "bias", None) is not None:
                module.bias.index_fill_(0, index, 0.0)


def _is_module(model, name):
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


@pytest.mark.parametrize("name", MODELS)
def test_pruned_equals_zeroed(name):
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs).eval()
    randomize_norms(model)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    pruner = fp.Pruner(model, x[:1], criterion="random", normalize="none", seed=1)  # random channels, not cost-weighted
    total = sum(g.size for g in pruner.groups)
    result = pruner.prune(int(0.3 * total))
    assert result.count >= 0.25 * total, "about 30% of the prunable channels must go"
    assert all(g.size >= 1 for g in pruner.groups)
    zero_removed(reference, result.removed)
    with torch.no_grad():
        expected, actual = reference(x), pruner.model(x)
    assert actual.shape == expected.shape
    relative = (actual - expected).abs().max() / expected.abs().max()
    assert relative < 1e-4, f"{name}: relative error {relative:.2e}"
    params_after = sum(p.numel() for p in pruner.model.parameters())
    assert params_after < sum(p.numel() for p in reference.parameters())
    pruner.model.train()
    out = pruner.model(x)
    (out.logits if hasattr(out, "logits") else out).sum().backward()


def test_googlenet_aux_heads_are_pruned_too():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, num_classes=5)
    pruner = fp.Pruner(model, torch.randn(1, 3, 64, 64), criterion="l1")
    pruner.prune(int(0.3 * sum(g.size for g in pruner.groups)))
    model.train()
    out = model(torch.randn(2, 3, 64, 64))  # the auxiliary heads only run in training
    assert out.aux_logits1.shape == (2, 5) and out.aux_logits2.shape == (2, 5)


def test_ignored_and_output_layers_keep_their_channels():
    model = torchvision.models.vgg11(weights=None, num_classes=3)
    pruner = fp.Pruner(model, torch.randn(1, 3, 32, 32), criterion="l1", ignore=[model.classifier[3]])
    names = {g.name for g in pruner.groups}
    assert "classifier.3" not in names and "classifier.6" not in names
    assert "classifier.0" in names and "features.0" in names
    pruner.prune(10_000)
    assert model.classifier[3].out_features == 4096 and model.classifier[6].out_features == 3
    assert all(g.size == 1 for g in pruner.groups), "min 1 channel per group"


class Shuffle(nn.Module):
    """Channel shuffle: a split of the channel axis into (groups, channels per group)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.b(x)


class Permute(nn.Module):
    """Reversed channel order: a permutation that stays the same kind of permutation when pruned."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.b(torch.flip(self.a(x), dims=[1]))


class PixelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(nn.functional.pixel_shuffle(self.a(x), 2))


class LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 2, 1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 2.0, 6).view(6, 1, 1))

    def forward(self, x):
        y = self.a(x)
        return self.b(y + self.gamma * torch.relu(y))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 6, 3), nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), torch.relu(self.b(x))], dim=1))


class SelectiveKernel(nn.Module):
    """timm's selective-kernel block in small: two paths stacked on a new axis, a softmax over the
    paths, the paths summed. Channel k of both paths (and of both halves of fc_select) go together."""

    def __init__(self, softmax=lambda x: torch.softmax(x, dim=1)):
        super().__init__()
        self.paths = nn.ModuleList([nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 3, padding=2, dilation=2)])
        self.fc_reduce, self.fc_select = nn.Conv2d(6, 4, 1), nn.Conv2d(4, 12, 1)
        self.softmax, self.out = softmax, nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = torch.stack([path(x) for path in self.paths], dim=1)
        attn = self.fc_select(torch.relu(self.fc_reduce(x.sum(1).mean((2, 3), keepdim=True))))
        b, c, h, w = attn.shape
        attn = self.softmax(attn.view(b, 2, c // 2, h, w))
        return self.out(torch.sum(x * attn, dim=1))


class LiteralShuffle(Shuffle):
    """The same shuffle with the channels per group written as a literal: wrong once pruned."""

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, 4, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.b(x)


def test_channel_shuffle_prunes_channel_k_of_every_group_together():
    pruner = fp.Pruner(Shuffle(), torch.randn(1, 3, 8, 8), criterion="random")
    (group,) = pruner.groups
    assert group.size == 4, "8 channels in 2 groups: each unit is channel k of both groups"
    result = pruner.prune(1)  # the pruner's self-check compares with the zeroed unpruned model
    assert len(result.removed["a"]) == 2 and pruner.model.a.out_channels == 6


def test_literal_channel_count_is_left_out_not_assumed():
    model = LiteralShuffle()
    with pytest.raises(fp.GraphError, match="literal channel count"):
        ChannelGraph(model, torch.randn(1, 3, 8, 8), strict=True)
    pruner = fp.Pruner(model, torch.randn(1, 3, 8, 8), criterion="l1")
    assert pruner.groups == [] and "literal channel count" in pruner.skipped[0]
    assert "x = x.view(n, 2, 4, h, w)" in pruner.skipped[0], "the message points at the user's line"


def test_unknown_op_is_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), dim=1))

    with pytest.raises(fp.GraphError, match="cumsum"):
        ChannelGraph(Odd(), torch.randn(1, 3, 8, 8), strict=True)


@pytest.mark.parametrize("cls", [Shuffle, Permute, PixelShuffle, LayerScale, Concat, SelectiveKernel])
def test_small_patterns_are_exact(cls):
    torch.manual_seed(0)
    model = cls().eval()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    pruner = fp.Pruner(model, x[:1], criterion="random", seed=3)
    assert pruner.groups, "these patterns are prunable"
    result = pruner.prune(max(1, sum(g.size for g in pruner.groups) // 3))
    assert result.count > 0
    zero_removed(reference, result.removed)
    with torch.no_grad():
        assert torch.allclose(pruner.model(x), reference(x), atol=1e-5)


@pytest.mark.parametrize("softmax", [lambda x: torch.softmax(x, dim=1), nn.Softmax(dim=1), lambda x: x.log_softmax(1)])
def test_selective_kernel_paths_lose_the_same_channels(softmax):
    pruner = fp.Pruner(SelectiveKernel(softmax), torch.randn(1, 3, 8, 8), criterion="random")
    sizes = {g.name: g.size for g in pruner.groups}
    assert sizes == {"paths.0": 6, "fc_reduce": 4}, "path k, path k's twin and fc_select's k and 6 + k are one unit"
    result = pruner.prune(2)  # self-checked against the zeroed unpruned model
    model = pruner.model
    assert result.removed["paths.0"] == result.removed["paths.1"] and model.fc_select.out_channels == 2 * model.paths[0].out_channels < 12


@pytest.mark.parametrize("op, reason", [(lambda x: torch.softmax(x, dim=1), "normalises across channels"),
                                        (lambda x: x.sum(1, keepdim=True), "reduces across channels")])
def test_softmax_or_sum_over_the_channel_axis_is_left_out(op, reason):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y * op(y))

    pruner = fp.Pruner(Net(), torch.randn(1, 3, 8, 8), criterion="l1")
    assert pruner.groups == [] and reason in pruner.skipped[0]


def test_pixel_shuffle_removes_whole_blocks():
    pruner = fp.Pruner(PixelShuffle(), torch.randn(1, 3, 8, 8), criterion="random")
    (group,) = pruner.groups
    assert group.size == 4, "16 channels shuffle into 4: each unit is a block of 4"
    result = pruner.prune(1)
    assert len(result.removed["a"]) == 4 and pruner.model.a.out_channels == 12


def test_concat_offsets():
    pruner = fp.Pruner(Concat(), torch.randn(1, 3, 8, 8), criterion="l1")
    sizes = {g.name: g.size for g in pruner.groups}
    assert sizes == {"a": 4, "b": 6}


@pytest.mark.parametrize("shuffle", [nn.ChannelShuffle(2), lambda x: torch.channel_shuffle(x, 2)])
def test_channel_shuffle_module_and_function_are_exact(shuffle):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.shuffle, self.b = nn.Conv2d(3, 8, 3), shuffle, nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(self.shuffle(self.a(x)))

    pruner = fp.Pruner(Net(), torch.randn(1, 3, 8, 8), criterion="random")
    assert [g.size for g in pruner.groups] == [4]
    pruner.prune(2)  # self-checked against the zeroed unpruned model
    assert pruner.model.a.out_channels == 4
