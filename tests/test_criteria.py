"""Criteria against hand computations on tiny networks.

Every expected value here is computed independently with plain autograd and tensor arithmetic on
the same weights; filterprune is only asked for its scores, through the public Pruner API.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import filterprune as fp

CE = nn.CrossEntropyLoss()  # mean-reduced, as rank() expects


# ---- tiny networks with hand-set weights ---------------------------------------------------------


class Tiny(nn.Module):
    """conv1 (3 maps) -> ReLU -> conv2 (2 maps) -> global average -> flatten -> fc (2 classes)."""

    def __init__(self, inplace: bool = True, norm: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3) if norm else nn.Identity()
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(3, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            sobel = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]]) * 0.5
            box = torch.full((3, 3), 0.2)
            laplace = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]) * 0.3
            self.conv1.weight.copy_(torch.stack([sobel, box, laplace])[:, None])
            self.conv1.bias.copy_(torch.tensor([0.05, -0.3, 0.1]))
            self.conv2.weight.copy_(torch.tensor([[1.0, -0.5, 0.8], [-0.7, 1.2, 0.4]])[:, :, None, None])
            self.conv2.bias.copy_(torch.tensor([0.1, -0.2]))
            self.fc.weight.copy_(torch.tensor([[1.5, -1.0], [-0.5, 2.0]]))
            self.fc.bias.copy_(torch.tensor([0.1, -0.1]))

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.conv2(self.relu(self.bn(self.conv1(x)))))))

    def consumed(self, x):
        """What conv2 and fc consume (computed functionally, without the in-place module) and the logits."""
        z1 = F.relu(self.bn(self.conv1(x)))
        z2 = self.conv2(z1).mean((2, 3))
        return z1, z2, self.fc(z2)


class FlatNet(nn.Module):
    """conv (3 maps of 3x3) -> ReLU -> flatten -> Linear(27, 2): each map owns 9 input features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(27, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(-1, 1, 27).view(3, 1, 3, 3))
            self.conv.bias.copy_(torch.tensor([0.1, -0.1, 0.2]))
            self.fc.weight.copy_(torch.sin(torch.arange(54.0)).view(2, 27))

    def forward(self, x):
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


class Residual(nn.Module):
    """Two convs whose outputs are added: channel k of a and channel k of b are one unit."""

    def __init__(self, l1_a, l1_b):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 3), nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            for conv, l1 in ((self.a, l1_a), (self.b, l1_b)):
                # Alternating signs, so that a criterion summing signed weights would be wrong.
                signs = torch.tensor([1.0, -1] * 5)[:9].view(1, 1, 3, 3)
                conv.weight.copy_(torch.tensor(l1).view(4, 1, 1, 1) / 9 * signs)

    def forward(self, x):
        return self.c(torch.relu(self.a(x) + self.b(x)))


def data(n=7, size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g), torch.randint(0, 2, (n,), generator=g)


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def per_group(pruner, scores):
    """Split a flat score vector into {group name: scores}, using the groups' public offsets."""
    return {g.name: scores[g.offset:g.offset + g.size] for g in pruner.groups}


def close(actual, expected, rtol=1e-5, atol=1e-7):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# ---- hand computations -----------------------------------------------------------------------------


def taylor_terms(model: Tiny, x, y):
    """Per example n and map k: (1/M) sum over positions of z * dL_n/dz, for what conv2 and fc consume.

    With a sum-reduced loss, d(sum_n L_n)/dz_n = dL_n/dz_n, since example n's activations only
    affect its own loss (eval mode, no batch statistics).
    """
    z1, z2, logits = model.consumed(x)
    g1, g2 = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), [z1, z2])
    return (z1 * g1).mean((2, 3)).detach(), (z2 * g2).detach()


def paper_taylor(model, x, y):
    t1, t2 = taylor_terms(model, x, y)
    return {"conv1": t1.abs().mean(0), "conv2": t2.abs().mean(0)}


def activation_stats(model: Tiny, x):
    """Mean, population std and 1 - share of zeros of each consumed map, over examples and positions."""
    with torch.no_grad():
        z1, z2, _ = model.consumed(x)
    per_map = {"conv1": z1.transpose(0, 1).reshape(3, -1), "conv2": z2.t()}
    return {
        "activation-mean": {k: v.mean(1) for k, v in per_map.items()},
        "activation-std": {k: v.std(1, unbiased=False) for k, v in per_map.items()},
        "apoz": {k: 1 - (v == 0).double().mean(1) for k, v in per_map.items()},
    }


def ranked(model, criterion, loader, **kwargs):
    pruner = fp.Pruner(model, loader[0][0][:1], criterion=criterion, **kwargs)
    pruner.rank(loader, CE, progress=False)
    return per_group(pruner, pruner.raw_scores())


# ---- taylor ----------------------------------------------------------------------------------------


def test_taylor_matches_per_example_definition():
    x, y = data()
    model = Tiny().eval()
    scores = ranked(model, "taylor", [(x, y)])
    expected = paper_taylor(Tiny(), x, y)
    close(scores["conv1"], expected["conv1"])
    close(scores["conv2"], expected["conv2"])


def test_taylor_takes_abs_per_example_not_after_batch_average():
    # Two copies of one image with opposite labels, and fc's bias shifted so that both classes are
    # equally likely: the two examples' products are then exactly opposite, so the blog's signed
    # batch average cancels while the per-example definition does not.
    x, _ = data(n=1)
    x, y = x.repeat(2, 1, 1, 1), torch.tensor([0, 1])
    model = Tiny()
    with torch.no_grad():
        logits = model(x[:1])[0]
        model.fc.bias[1] += logits[0] - logits[1]
    t1, t2 = taylor_terms(model, x, y)
    assert (t1[0] * t1[1] < 0).all(), "the construction must give opposite-sign products"
    paper, blog = t1.abs().mean(0), t1.mean(0).abs()  # blog: signed average first, abs at the end
    assert (blog < 0.01 * paper).all(), "the two definitions must differ on this case"
    scores = ranked(model.eval(), "taylor", [(x, y)])
    close(scores["conv1"], paper)
    close(scores["conv2"], t2.abs().mean(0))
    assert (scores["conv1"] > 10 * blog).all()


@pytest.mark.parametrize("criterion", ["taylor", "activation-mean", "activation-std", "apoz"])
def test_scores_do_not_depend_on_batch_size(criterion):
    x, y = data(n=7)
    # Batches of 1; of 3, 3 and a smaller last one of 1; and all 7 at once.
    results = [ranked(Tiny().eval(), criterion, batches(x, y, size)) for size in (1, 3, 7)]
    hand = paper_taylor(Tiny(), x, y) if criterion == "taylor" else activation_stats(Tiny(), x)[criterion]
    for result in results:
        for name in ("conv1", "conv2"):
            close(result[name], hand[name], rtol=1e-5, atol=1e-6)


def test_inplace_relu_does_not_corrupt_stored_activations():
    x, y = data(n=6)
    hand = {"taylor": paper_taylor(Tiny(), x, y), **activation_stats(Tiny(), x)}
    assert (hand["apoz"]["conv1"] < 1).all(), "the ReLU must zero something, or apoz tests nothing"
    for criterion, expected in hand.items():
        with_inplace = ranked(Tiny(inplace=True).eval(), criterion, [(x, y)])
        without = ranked(Tiny(inplace=False).eval(), criterion, [(x, y)])
        for name in ("conv1", "conv2"):
            close(with_inplace[name], expected[name], atol=1e-6)
            close(without[name], with_inplace[name], rtol=0, atol=0)


def test_taylor_after_flatten_averages_each_maps_block_of_features():
    x, y = data(n=5)
    model = FlatNet().eval()
    z = torch.relu(model.conv(x)).flatten(1)  # [n, 27]: map k owns features 9k .. 9k + 8
    (g,) = torch.autograd.grad(F.cross_entropy(model.fc(z), y, reduction="sum"), [z])
    block_means = (z * g).detach().view(5, 3, 9).mean(2)
    scores = ranked(model, "taylor", [(x, y)])
    close(scores["conv"], block_means.abs().mean(0))
    # Summing instead of averaging over the block would be 9x larger; mixing blocks would reorder.
    mean = ranked(FlatNet().eval(), "activation-mean", [(x, y)])
    close(mean["conv"], z.detach().view(5, 3, 9).mean((0, 2)))


# ---- weight criteria ---------------------------------------------------------------------------------


def weight_scores(model, criterion, **kwargs):
    pruner = fp.Pruner(model, torch.randn(1, 1, 5, 5), criterion=criterion, **kwargs)
    return per_group(pruner, pruner.raw_scores())


def test_l1_and_l2_are_filter_norms_of_the_producer():
    model = Tiny()
    l1, l2 = weight_scores(model, "l1"), weight_scores(model, "l2")
    for name, conv in (("conv1", model.conv1), ("conv2", model.conv2)):
        w = conv.weight.detach()
        close(l1[name], w.abs().sum((1, 2, 3)))
        close(l2[name], w.pow(2).sum((1, 2, 3)).sqrt())


def test_bn_scale_is_abs_gamma():
    model = Tiny(norm=True)
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([-0.5, 2.0, 0.1]))
    scores = weight_scores(model, "bn-scale")
    close(scores["conv1"], torch.tensor([0.5, 2.0, 0.1]))
    assert scores["conv2"].isnan().all(), "a group without a norm cannot be scored by bn-scale"


def hand_taylor_weight(model, x, y):
    """|sum over a filter's weight and bias of w * dL/dw|, L the batch-mean loss."""
    model = copy.deepcopy(model)
    CE(model(x), y).backward()
    out = {}
    for name in ("conv1", "conv2"):
        conv = getattr(model, name)
        product = (conv.weight * conv.weight.grad).sum((1, 2, 3)) + conv.bias * conv.bias.grad
        out[name] = product.abs().detach()
    return out


def test_taylor_weight_from_rank_and_from_plain_backward():
    x, y = data(n=4)
    expected = hand_taylor_weight(Tiny(), x, y)
    from_rank = ranked(Tiny().eval(), "taylor-weight", [(x, y)])
    model = Tiny()
    CE(model(x), y).backward()  # the user's own backward; no rank()
    from_grads = weight_scores(model, "taylor-weight")
    for name in ("conv1", "conv2"):
        close(from_rank[name], expected[name])
        close(from_grads[name], expected[name])


def test_taylor_weight_of_a_transposed_conv_sums_over_its_input_axis():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 5, 2, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2)).eval()
    x, y = data(n=4)
    up = copy.deepcopy(model)
    CE(up(x), y).backward()
    t = up[2]  # weight (in, out, kh, kw): a unit is an output channel, axis 1
    expected = ((t.weight * t.weight.grad).sum((0, 2, 3)) + t.bias * t.bias.grad).abs().detach()
    pruner = fp.Pruner(model, x[:1], criterion="taylor-weight", ignore=[model[6]])
    pruner.rank([(x, y)], CE, progress=False)
    close(per_group(pruner, pruner.raw_scores())["2"], expected)


# ---- normalisation and FLOPs regularisation ------------------------------------------------------------


def test_per_group_l2_normalisation():
    model = Tiny()
    pruner = fp.Pruner(model, torch.randn(1, 1, 5, 5), criterion="l1", normalize=True)
    raw, normed = per_group(pruner, pruner.raw_scores()), per_group(pruner, pruner.scores())
    for name in ("conv1", "conv2"):
        close(normed[name], raw[name] / raw[name].pow(2).sum().sqrt())
        close(normed[name].norm(), torch.tensor(1.0))
    plain = fp.Pruner(model, torch.randn(1, 1, 5, 5), criterion="l1", normalize=False)
    close(plain.scores(), plain.raw_scores(), rtol=0, atol=0)


def test_flops_regularisation_subtracts_lambda_times_mmacs():
    model = Tiny()
    lam = 1e3  # large, so that the tiny costs of this net move the scores visibly
    pruner = fp.Pruner(model, torch.randn(1, 1, 6, 6), criterion="l1", flops_lambda=lam, normalize="l2")
    # 6x6 input -> 4x4 maps. A conv1 map costs its own row (Cin*k*k*Hout*Wout = 1*3*3*16) plus
    # conv2's input column (Cout*1*1*16 = 2*16); a conv2 map its row (3*1*1*16) plus fc's column (2).
    macs = {"conv1": 1 * 3 * 3 * 16 + 2 * 1 * 1 * 16, "conv2": 3 * 1 * 1 * 16 + 2}
    raw, scores = per_group(pruner, pruner.raw_scores()), per_group(pruner, pruner.scores())
    for name in ("conv1", "conv2"):
        normalised = raw[name] / raw[name].norm()
        close(scores[name], normalised - lam * macs[name] / 1e6)


# ---- coupled channels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("combine, expected", [
    ("sum", [5.0, 3.0, 8.0, 4.5]),
    ("mean", [2.5, 1.5, 4.0, 2.25]),
    ("max", [4.0, 2.0, 5.0, 4.0]),
])
def test_residual_pair_is_one_unit_and_combines_l1(combine, expected):
    model = Residual(l1_a=[1.0, 2.0, 3.0, 4.0], l1_b=[4.0, 1.0, 5.0, 0.5])
    pruner = fp.Pruner(model, torch.randn(1, 1, 6, 6), criterion="l1", combine=combine)
    (group,) = pruner.groups
    assert group.size == 4 and {"a:out", "b:out", "c:in"} <= set(group.members)
    close(pruner.raw_scores(), torch.tensor(expected))


# ---- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["taylor", "activation-mean", "activation-std", "apoz"])
def test_data_criteria_need_rank(criterion):
    pruner = fp.Pruner(Tiny(), torch.randn(1, 1, 5, 5), criterion=criterion)
    with pytest.raises(RuntimeError, match=r"call pruner\.rank"):
        pruner.scores()
    with pytest.raises(RuntimeError, match=r"call pruner\.rank"):
        pruner.prune(1)


def test_taylor_weight_without_gradients_is_a_clear_error():
    pruner = fp.Pruner(Tiny(), torch.randn(1, 1, 5, 5), criterion="taylor-weight")
    with pytest.raises(RuntimeError, match="needs gradients"):
        pruner.scores()


def test_unknown_criterion_lists_the_names():
    with pytest.raises(ValueError) as err:
        fp.Pruner(Tiny(), torch.randn(1, 1, 5, 5), criterion="taylr")
    for name in ("taylor", "taylor-weight", "l1", "l2", "activation-mean", "activation-std", "apoz", "bn-scale", "random"):
        assert name in str(err.value)


# ---- a model on a GPU ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("criterion", ["taylor", "activation-std", "apoz", "taylor-weight", "l1"])
def test_gpu_model_scores_like_the_cpu(criterion, monkeypatch):
    # Batches follow the model to its device when rank() is given none; scores must not depend on it.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 alone would differ by ~1e-3
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    x, y = data(n=6)
    scores = {}
    for device in ("cpu", "cuda"):
        model = Tiny().to(device).eval()
        pruner = fp.Pruner(model, x[:1].to(device), criterion=criterion)
        if criterion != "l1":
            pruner.rank(batches(x, y, 4), CE, progress=False)
        scores[device] = pruner.raw_scores()
        pruner.prune(2)
    close(scores["cuda"], scores["cpu"], rtol=1e-4, atol=1e-6)


# ---- one channel, several consumers ------------------------------------------------------------------


class Fork(nn.Module):
    """a (3 maps) -> ReLU, consumed by two convs b and c whose outputs are added: a's maps have two consumers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.c = nn.Conv2d(1, 3, 3), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        z = torch.relu(self.a(x))
        return self.fc((self.b(z) + self.c(z)).mean((2, 3)))


def test_taylor_sums_a_channels_consumers_per_example_before_abs():
    x, y = data(n=6)
    model = Fork().eval()
    # By hand: removing map k of a zeroes it at *both* consumers; its first-order change of example
    # n's loss is the sum of the two consumers' terms, and |.| is taken per example after that sum.
    z = torch.relu(model.a(x))
    zb, zc = z.clone(), z.clone()
    logits = model.fc((model.b(zb) + model.c(zc)).mean((2, 3)))
    gb, gc = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), [zb, zc])
    per_example = (zb * gb).mean((2, 3)) + (zc * gc).mean((2, 3))
    expected = per_example.detach().abs().mean(0)
    separate = (zb * gb).mean((2, 3)).abs().mean(0) + (zc * gc).mean((2, 3)).abs().mean(0)
    assert not torch.allclose(expected, separate, rtol=1e-3), "the construction must tell the two apart"
    scores = ranked(Fork().eval(), "taylor", [(x, y)])
    close(scores["a"], expected)


# ---- combine, and criteria of your own ------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["taylor", "activation-mean", "activation-std", "apoz"])
def test_combine_is_refused_where_it_does_not_apply(criterion):
    with pytest.raises(ValueError, match="does not apply"):
        fp.Pruner(Tiny(), torch.randn(1, 1, 5, 5), criterion=criterion, combine="max")


@pytest.mark.parametrize("combine", ["sum", "max"])
def test_combine_merges_taylor_weight_of_coupled_layers(combine):
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 1, 0])
    model = Residual(l1_a=[1.0, 2.0, 3.0, 4.0], l1_b=[4.0, 1.0, 5.0, 0.5])
    loss = lambda out, target: CE(out.mean((2, 3)), target)  # noqa: E731  (Residual returns maps)
    hand = copy.deepcopy(model)
    loss(hand(x), y).backward()
    terms = [(conv.weight * conv.weight.grad).sum((1, 2, 3)) + conv.bias * conv.bias.grad for conv in (hand.a, hand.b)]
    a, b = (t.detach().abs() for t in terms)
    expected = a + b if combine == "sum" else torch.maximum(a, b)
    pruner = fp.Pruner(model.eval(), x[:1], criterion="taylor-weight", combine=combine)
    pruner.rank([(x, y)], loss, progress=False)
    close(pruner.raw_scores(), expected)


class NegativeL1(fp.Criterion):
    """A user's own criterion: the larger a filter's L1 norm, the sooner it goes."""

    name = "negative-l1"

    def scores(self, model, graph, sums, combine="mean", seed=0):
        return -fp.criteria.get("l1").scores(model, graph, None, combine)


def test_a_criterion_of_your_own():
    model = Tiny()
    pruner = fp.Pruner(model, torch.randn(1, 1, 5, 5), criterion=NegativeL1(), normalize="none")
    l1 = model.conv1.weight.detach().abs().sum((1, 2, 3))
    close(per_group(pruner, pruner.raw_scores())["conv1"], -l1)
    result = pruner.prune(1)
    assert result.removed == {"conv1": [int(l1.argmax())]}


def test_mean_and_cost_aware_normalisation():
    model, x = Tiny(), torch.randn(1, 1, 6, 6)
    mean = fp.Pruner(model, x, criterion="l1", normalize="mean")
    raw, scores = per_group(mean, mean.raw_scores()), per_group(mean, mean.scores())
    # 6x6 -> 4x4 maps; MACs a unit costs, as in the FLOPs regularisation test below.
    macs = {"conv1": 1 * 3 * 3 * 16 + 2 * 1 * 1 * 16, "conv2": 3 * 1 * 1 * 16 + 2}
    average = (3 * macs["conv1"] + 2 * macs["conv2"]) / 5
    per_mac = per_group(mean, fp.Pruner(model, x, criterion="l1", normalize="macs").scores())
    for name in ("conv1", "conv2"):
        close(scores[name], raw[name] / raw[name].mean())
        close(per_mac[name], raw[name] / raw[name].mean() / (macs[name] / average))
    with pytest.raises(ValueError, match="normalize must be one of"):
        fp.Pruner(model, x, criterion="l1", normalize="L2")
