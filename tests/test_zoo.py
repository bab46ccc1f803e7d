"""timm's zoo, and the rule that tracing never touches the user's model."""

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import filterprune as fp
from filterprune.graph import ChannelGraph
from test_graph import MODELS as TORCHVISION

timm = pytest.importorskip("timm")


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("tv:"):
        return torchvision.models.get_model(name[3:], weights=None, num_classes=10)
    return timm.create_model(name, pretrained=False, num_classes=10)


def macs(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


NEVER_TOUCH = ["tv:resnet18", "tv:mobilenet_v3_small", "tv:shufflenet_v2_x0_5", "efficientnet_b0", "regnety_002",
               "nf_resnet26", "convnext_atto"]
# One model per kind of block: BatchNormAct2d + squeeze-excite, RegNet's grouped convs + SE, DLA's
# aggregation trees, VoVNet's one-shot aggregation, RepVGG's branches, LCNet; with the MACs cut
# each reaches at 30% per layer. skresnet18's selective-kernel blocks prune inside (softmax over
# stacked paths), while their input split, sized by a module attribute, stays whole: a smaller cut.
ZOO = {"efficientnet_b0": 1.5, "tf_efficientnet_b0": 1.5, "regnety_002": 1.5, "dla34": 1.5, "ese_vovnet19b_dw": 1.5,
       "repvgg_a0": 1.5, "lcnet_050": 1.5, "skresnet18": 1.3}
# Every mode for a few models; every other model of the test zoos (torchvision's exactness set,
# timm's above) with frozen parts inside a training model, the case most easily broken.
UNTOUCHED = [(name, mode) for name in NEVER_TOUCH for mode in ("train", "eval", "mixed")] + [
    (name, "mixed") for name in [f"tv:{m}" for m in TORCHVISION] + list(ZOO) if name not in NEVER_TOUCH]


@pytest.mark.parametrize("name, mode", UNTOUCHED)
def test_tracing_and_ranking_leave_the_model_as_it_was(name, mode):
    model = build(name)
    head = model.get_submodule(_head(model))
    batch = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))]
    assert_untouched(model, mode, torch.randn(1, 3, 32, 32), [head], batch, nn.CrossEntropyLoss())


# Models of the other libraries (tests/test_ecosystem.py builds them), in a training model with frozen parts.
ECOSYSTEM = ["smp-unet", "hf-resnet", "yolov8n", "monai-unet"]


@pytest.mark.parametrize("name", ECOSYSTEM)
def test_ecosystem_models_are_left_as_they_were(name):
    import test_ecosystem  # noqa: PLC0415  (skips where the library is missing)

    model, x = test_ecosystem.build(name)
    with torch.no_grad():  # YOLO's Detect caches anchors at its first forward in eval mode: the model's own doing
        model(x)
    batch = [(torch.cat([x, x.flip(0)]), torch.zeros(2))]  # (the loss ignores the targets)
    assert_untouched(model, "mixed", x, test_ecosystem.head(model), batch, _sum_of_squares)


def _sum_of_squares(out, target) -> torch.Tensor:
    """A loss for any output (tensors, tuples, dicts, ModelOutput), so every output gets a gradient."""
    return sum(t.float().square().mean() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def assert_untouched(model: nn.Module, mode: str, x: torch.Tensor, ignore: list, batch: list, loss) -> None:
    """Tracing, ranking and selecting leave parameters, buffers, modes and gradients as they were."""
    model.train(mode != "eval")
    if mode == "mixed":  # a user's frozen norms inside a training model stay frozen
        for m in list(model.modules())[::3]:
            m.eval()
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = {n: sorted(vars(m)) for n, m in model.named_modules()}
    for criterion in ("taylor", "taylor-weight"):  # forward and backward hooks, gradients of the weights
        pruner = fp.Pruner(model, x, criterion=criterion, ignore=ignore)
        pruner.rank(batch, loss, progress=False)
        pruner.select(10)
    ChannelGraph(model, torch.cat([x, x]))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert not changed, f"{len(changed)} tensors changed, e.g. {changed[:3]}"
    assert [m.training for m in model.modules()] == modes
    assert {n: sorted(vars(m)) for n, m in model.named_modules()} == attributes
    assert all(p.grad is None for p in model.parameters()), "ranking must not leave gradients behind"


def _head(model: nn.Module) -> str:
    """The classifier: the last Linear, or the last conv where the classifier is one (SqueezeNet, DLA)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]


@pytest.mark.parametrize("name, factor", ZOO.items())
def test_timm_models_prune_exactly(name, factor):
    model = build(name).eval()
    x = torch.randn(1, 3, 64, 64)
    before = macs(model, x)
    pruner = fp.Pruner(model, x, criterion="l1", scope="layer", ignore=[model.get_classifier()])
    assert all(s.exact for s in pruner.graph.slots)
    pruner.prune(int(0.3 * sum(g.size for g in pruner.groups)))  # the self-check raises if not exact
    assert before / macs(model, x) > factor


def test_weight_standardised_convs_prune_and_say_their_inputs_are_inexact():
    # timm's StdConv2d standardises each output row of its weight: removing an input channel
    # changes the mean and variance of the rows that stay, so its inputs cannot be exact.
    model = nn.Sequential(timm.layers.StdConv2d(3, 8, 3), nn.ReLU(), timm.layers.StdConv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    pruner = fp.Pruner(model, x, criterion="l1", verify=False)
    exact = {(s.module, s.role): s.exact for s in pruner.graph.slots}
    assert exact == {("0", "in"): False, ("0", "out"): True, ("2", "in"): False, ("2", "out"): True}
    pruner.prune(2)
    assert model[0].out_channels == 6 and model[2].in_channels == 6 and model(x).shape == (1, 4, 8, 8)
