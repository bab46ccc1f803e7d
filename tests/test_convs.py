"""Conv1d/3d, transposed convs and their norms; norms across channels; channel shuffle.

Exactness is the Pruner's own self-check (verify=True): after the removal the pruned model is
compared with the unpruned one whose removed channels are zeroed, and a difference raises.
"""

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import filterprune as fp


def macs(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def randomize_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)


def prune_share(model: nn.Module, x: torch.Tensor, share: float = 0.3, criterion: str = "l1", **kwargs) -> fp.Pruner:
    pruner = fp.Pruner(model, x, criterion=criterion, scope="layer", **kwargs)
    total = sum(g.size for g in pruner.groups)
    assert total > 0, "nothing to prune"
    result = pruner.prune(int(share * total))
    assert result.count >= 0.2 * total
    return pruner


class Audio(nn.Module):
    """A small 1-D CNN over a waveform: conv/BN/ReLU stem, a residual block, pooling, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, 16, 9, stride=4), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2))
        self.block = nn.Sequential(nn.Conv1d(16, 24, 3, padding=1), nn.BatchNorm1d(24), nn.ReLU(),
                                   nn.Conv1d(24, 16, 3, padding=1), nn.BatchNorm1d(16))
        self.head = nn.Sequential(nn.Conv1d(16, 32, 3, groups=1), nn.InstanceNorm1d(32, affine=True), nn.ReLU(),
                                  nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 5))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(x + self.block(x)))


class EncoderDecoder(nn.Module):
    """Convs down, transposed convs up (weight axes [in, out/groups, k]), a skip connection."""

    def __init__(self, dims: int = 2):
        super().__init__()
        conv, up = [(nn.Conv1d, nn.ConvTranspose1d), (nn.Conv2d, nn.ConvTranspose2d), (nn.Conv3d, nn.ConvTranspose3d)][dims - 1]
        bn = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][dims - 1]
        self.enc1 = nn.Sequential(conv(3, 12, 3, padding=1), bn(12), nn.ReLU())
        self.enc2 = nn.Sequential(conv(12, 20, 3, stride=2, padding=1), bn(20), nn.ReLU())
        self.dw_up = up(20, 20, 2, stride=2, groups=20)  # depthwise transposed conv
        self.up = nn.Sequential(up(20, 12, 3, padding=1), bn(12), nn.ReLU())
        self.out = up(12, 2, 1)

    def forward(self, x):
        skip = self.enc1(x)
        return self.out(self.up(self.dw_up(self.enc2(skip))) + skip)


def test_audio_cnn_is_exact():
    torch.manual_seed(0)
    model = Audio().eval()
    randomize_norms(model)
    x = torch.randn(1, 1, 800)
    before = macs(model, x)
    prune_share(model, x, ignore=[model.head[-1]])
    assert model.stem[0].out_channels < 16 and model.block[0].out_channels < 24
    assert macs(model, x) < 0.8 * before


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_transposed_conv_encoder_decoder_is_exact(dims):
    torch.manual_seed(0)
    model = EncoderDecoder(dims).eval()
    randomize_norms(model)
    x = torch.randn(1, 3, *[8] * dims)
    # l1 reads a transposed conv's output rows from the wrong weight axis in criteria.py: random
    # ranks without reading weights and still exercises every slot.
    pruner = prune_share(model, x, criterion="random", seed=2)
    assert model.up[0].out_channels < 12 and model.dw_up.groups == model.dw_up.out_channels < 20
    assert model.out.in_channels == model.up[0].out_channels
    pruner.model(x)


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_video_resnets_are_exact(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=4).eval()
    randomize_norms(model)
    x = torch.randn(1, 3, 4, 32, 32)
    before = macs(model, x)
    prune_share(model, x, ignore=[model.fc])
    assert macs(model, x) < 0.6 * before, "30% per layer removes about half the MACs"


def test_s3d_features_are_exact():
    # S3D's head pools a fixed 2x7x7 window (224-pixel clips); its feature extractor takes small clips.
    torch.manual_seed(0)
    model = torchvision.models.video.s3d(weights=None, num_classes=4).features.eval()
    randomize_norms(model)
    x = torch.randn(1, 3, 16, 32, 32)
    before = macs(model, x)
    prune_share(model, x)
    assert macs(model, x) < 0.8 * before


def test_convnext_layer_norm_channels_are_pruned():
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    before = macs(model, x)
    pruner = fp.Pruner(model, x, criterion="l1", scope="layer", ignore=[model.classifier[-1]], verify=False)
    norms = [s for s in pruner.graph.slots if s.role == "channel" and isinstance(model.get_submodule(s.module), nn.LayerNorm)]
    assert norms and not any(s.exact for s in norms), "LayerNorm channels are pruned, marked inexact"
    # verify=False: removing a channel changes a LayerNorm's statistics, so the zeroed model is
    # no reference; the model must still run and give the same output shape.
    pruner.prune(int(0.3 * sum(g.size for g in pruner.groups)))
    assert model(x).shape == (1, 10)
    assert before / macs(model, x) >= 1.9


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 12, 3), nn.GroupNorm(4, 12), nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.b(torch.relu(self.norm(self.a(x))))


def test_group_norm_loses_whole_groups_exactly():
    torch.manual_seed(0)
    model = GroupNormNet().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    pruner = fp.Pruner(model, torch.randn(1, 3, 8, 8), criterion="l1")
    (group,) = pruner.groups
    assert group.size == 4, "12 channels in 4 groups: a unit is a whole group"
    pruner.prune(1)  # exact: the groups that stay keep their own statistics
    assert model.norm.num_groups == 3 and model.norm.num_channels == 9 and model.a.out_channels == 9


def test_shufflenet_stage_channels_are_pruned_exactly():
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10).eval()
    randomize_norms(model)
    x = torch.randn(1, 3, 64, 64)
    before = macs(model, x)
    pruner = prune_share(model, x, ignore=[model.fc])
    assert not any("split" in s or "literal" in s for s in pruner.skipped), pruner.skipped[:2]
    # Stage-level channels go too. The shuffles couple them into few, large units (stage 2: 3
    # units of 16 channels, stage 3: 1, stage 4: 12); at 30% per group stage 4 loses 3 of 12.
    assert model.stage4[1].branch2[5].out_channels < 96
    assert before / macs(model, x) > 1.5, "1.42x when the stage-level channels were left out"
