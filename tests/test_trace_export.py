"""The torch.export front end: the same groups as fx where both trace, models fx refuses, the
probe that checks each group on the eager model, keyword inputs and structured outputs."""

import pytest
import torch
import torchvision
from torch import nn

import filterprune as fp
from filterprune.trace_export import ExportTrace
from filterprune.graph import ChannelGraph


def _groups(pruner_or_graph):
    return [(g.name, g.size, tuple(g.members)) for g in pruner_or_graph.groups]


@pytest.mark.parametrize("name", ["resnet18", "shufflenet_v2_x0_5", "mobilenet_v3_small"])
def test_export_finds_the_groups_fx_finds(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    fx_graph = ChannelGraph(model, x, frontend="fx")
    exported = ChannelGraph(model, x, frontend="export")
    assert _groups(exported) == _groups(fx_graph)
    assert [(s.key, s.owner.tolist(), s.macs_per_index) for s in exported.slots] == \
           [(s.key, s.owner.tolist(), s.macs_per_index) for s in fx_graph.slots]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_the_books_after_a_prune_equal_a_fresh_trace(frontend):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    pruner = fp.Pruner(model, x, criterion="l1", frontend=frontend, ignore=[model.fc])
    assert pruner.prune(ratio=0.3).check == "exact"
    fresh = ChannelGraph(model, x, frontend=frontend, ignore=[model.fc])
    assert _groups(pruner) == _groups(fresh)
    for kept, new in zip(pruner.graph.slots, fresh.slots):
        assert kept.key == new.key and torch.equal(kept.owner, new.owner)
        assert kept.macs_per_index == pytest.approx(new.macs_per_index)


class _View(nn.Module):
    """conv -> relu -> conv -> view -> mean -> fc, the view's channel count literal or read from x."""

    def __init__(self, literal: bool) -> None:
        super().__init__()
        self.literal = literal
        self.stem, self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv(self.stem(x).relu())
        x = x.view(x.shape[0], 8 if self.literal else x.size(1), -1)
        return self.fc(x.mean(-1))


def test_the_probe_leaves_out_a_literal_view_and_prunes_a_derived_one():
    x = torch.randn(1, 3, 4, 4)
    literal = fp.Pruner(_View(literal=True).eval(), x, criterion="l1", frontend="export")
    assert [g.name for g in literal.groups] == ["stem"]
    reasons = [s for s in literal.skipped if "group 'conv'" in s]
    assert len(reasons) == 1 and "breaks the model" in reasons[0] and "\n" not in reasons[0]
    derived = fp.Pruner(_View(literal=False).eval(), x, criterion="l1", frontend="export")
    assert [g.name for g in derived.groups] == ["stem", "conv"] and not derived.skipped
    assert derived.prune(4).check == "exact"


class _Block(nn.Module):
    def __init__(self, c: int, literal: bool) -> None:
        super().__init__()
        self.c, self.literal = c, literal
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x).relu()
        b, _, h, w = y.shape
        return y.reshape(b, self.c if self.literal else y.shape[1], h * w).reshape(b, -1, h, w)


def test_a_model_that_breaks_in_one_block_prunes_everywhere_else():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Block(8, False), _Block(8, True), _Block(8, False),
                          nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 6, 6)
    pruner = fp.Pruner(model, x, criterion="l1", scope="layer", frontend="export", ignore=[model[4]])
    assert [g.name for g in pruner.groups] == ["0", "1.conv", "3.conv"]
    assert len(pruner.skipped) == 1 and "group '2.conv'" in pruner.skipped[0]
    result = pruner.prune(ratio=0.25)
    assert result.check == "exact" and set(result.removed_per_group) == {"0", "1.conv", "3.conv"}
    assert model[2].conv.out_channels == 8 and model[1].conv.out_channels < 8


class _NoFx(nn.Module):
    """What fx refuses: a shape check on the input, keyword inputs, and a dict of outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 3)

    def forward(self, pixel_values, *args, **kwargs):
        if pixel_values.shape[-1] % 2:
            raise ValueError("even sizes only")
        features = self.body(pixel_values)
        return {"logits": self.head(features.mean((2, 3))), "features": (features[:, :4], pixel_values)}


def test_keyword_inputs_and_structured_outputs_go_through_export():
    torch.manual_seed(0)
    model = _NoFx().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(fp.GraphError):
        ChannelGraph(model, x, frontend="fx")
    pruner = fp.Pruner(model, (), example_kwargs={"pixel_values": x}, criterion="l1", ignore=[model.head])
    assert pruner.graph.frontend == "export"
    # features[:, :4] pins the last conv's channels (an output, cut at fixed positions): one group is left.
    assert [g.name for g in pruner.groups] == ["body.0"]
    assert pruner.macs() > 0
    assert pruner.prune(3).check == "exact"
    assert model.body[0].out_channels == 5 and model(pixel_values=x)["logits"].shape == (2, 3)


def test_chunks_joined_again_upsampling_padding_and_stacks_prune_exactly():
    class C2f(nn.Module):  # YOLO's block: cv1, two halves, the second through a conv, all concatenated
        def __init__(self):
            super().__init__()
            self.cv1, self.m, self.cv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(12, 6, 1)

        def forward(self, x):
            y = list(self.cv1(x).chunk(2, 1))
            y.append(self.m(y[-1]))
            z = self.cv2(torch.cat(y, 1))
            z = nn.functional.pad(nn.functional.interpolate(z, scale_factor=2.0), (1, 1, 1, 1))
            return torch.stack([z, z * 2], 0).sum(0)

    torch.manual_seed(0)
    model = C2f().eval()
    pruner = fp.Pruner(model, torch.randn(1, 3, 6, 6), criterion="l1", frontend="export")
    assert not pruner.skipped
    assert {g.name: g.size for g in pruner.groups} == {"cv1": 4, "m": 4}  # halves tied: index k of each goes together
    assert pruner.prune(4).check == "exact"
    assert model.cv1.out_channels == 2 * model.m.in_channels < 8  # both halves lost the same channels


def test_3d_convs_and_transposed_convs_with_instance_norm_prune_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.InstanceNorm3d(8, affine=True), nn.PReLU(8),
                          nn.ConvTranspose3d(8, 6, 2, stride=2), nn.InstanceNorm3d(6, affine=True), nn.ReLU(),
                          nn.Conv3d(6, 2, 1)).eval()
    pruner = fp.Pruner(model, torch.randn(1, 1, 4, 4, 4), criterion="l1", frontend="export")
    assert [g.name for g in pruner.groups] == ["0", "3"]
    assert pruner.prune(5).check == "exact"


def test_attention_between_channel_tensors_is_left_out_with_its_reason():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            weights = (self.q(x) @ self.k(x).transpose(1, 2)).softmax(-1)
            return self.out(weights @ self.v(x))

    pruner = fp.Pruner(Attention().eval(), torch.randn(1, 5, 8), criterion="l1", frontend="export")
    assert len(pruner.skipped) == 2
    assert all("'matmul' at the model's top level" in s and "multiplies two channel-carrying tensors (attention)" in s
               for s in pruner.skipped)
    assert pruner.groups == []  # q and k meet in the first product, v in the second, out is the output


def test_export_leaves_the_model_as_it_was():
    class Caching(_NoFx):
        def forward(self, pixel_values, *args, **kwargs):
            self.seen = pixel_values + 0  # set in forward, as detectors cache anchors: export sets a fake tensor
            return super().forward(pixel_values)

    torch.manual_seed(0)
    model = Caching().train()
    model.body[1].eval()  # a frozen norm inside a training model stays frozen
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = [dict(vars(m)) for m in model.modules()]
    x = torch.randn(2, 3, 8, 8)
    ExportTrace(model, (x,))
    assert [dict(vars(m)) for m in model.modules()] == attributes and not hasattr(model, "seen")
    pruner = fp.Pruner(model, x, criterion="taylor", frontend="export", ignore=[model.head])
    pruner.rank([(x, torch.tensor([0, 1]))], lambda out, y: nn.functional.cross_entropy(out["logits"], y), progress=False)
    pruner.select(3)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert not isinstance(model.seen, torch._subclasses.FakeTensor)  # only the eager runs' real values


def test_timm_edgenext_prunes_all_but_the_blocks_that_reshape_with_a_borrowed_size():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("edgenext_xx_small", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    pruner = fp.Pruner(model, x, criterion="l1", scope="layer", frontend="export", ignore=[model.get_classifier()])
    probed = [s for s in pruner.skipped if s.startswith("group ")]
    # The channels that stages 1 and 3 of the attention blocks reshape with a size read from
    # another tensor (`reshape(B, N, C)`); the probe finds them, and only them.
    assert len(probed) == 2 and all("breaks the model" in s for s in probed)
    assert len(pruner.groups) > 10
    result = pruner.prune(ratio=0.3)
    assert result.check in ("exact", "forward-only") and result.macs_before / result.macs_after > 1.3
