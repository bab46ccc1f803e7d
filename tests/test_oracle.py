"""The oracle of 1611.06440 and the criteria study, against independent hand computations.

The naive oracles here never use filterprune's ablation code: they zero a unit's consumer weights
by hand, or physically remove the unit with surgery, and recompute the loss one unit at a time.
"""

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import spearmanr
from torch import nn

import filterprune as fp
from filterprune import cli
from filterprune.criteria import CRITERIA, weight_scores
from filterprune.graph import Group
from filterprune.oracle import oracle
from filterprune.study import lowest_share, run_study, spearman_scopes, study_result, write_study
from filterprune.surgery import remove_units


def batches(n=10, size=8, classes=3, seed=0, split=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[:split], y[:split]), (x[split:], y[split:])]  # two batches of unequal size


def mean_loss(model, data):
    with torch.no_grad():
        return sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in data) / sum(len(y) for _, y in data)


class Chain(nn.Module):
    """conv (3) -> BN -> ReLU -> conv (4) -> ReLU -> pool 2x2 -> flatten -> Linear (5) -> ReLU -> Linear (3)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)
        self.pool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(2), nn.Linear(16, 5), nn.Linear(5, 3)
        with torch.no_grad():  # a BN that is not the identity, so it matters and bn-scale ranks something
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.pool(F.relu(self.conv2(F.relu(self.bn(self.conv1(x))))))
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


class Residual(nn.Module):
    """A residual pair sharing one group, a concat, and a side branch whose output is never used."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 3, 1)
        self.side = nn.Conv2d(2, 5, 1)
        self.fc = nn.Linear(7, 3)

    def forward(self, x):
        self.side(x)  # computed and thrown away: removing its channels changes nothing
        s = F.relu(self.stem(x))
        r = s + F.relu(self.a(s))
        y = torch.cat([r, F.relu(self.b(r))], 1).mean((2, 3))
        return self.fc(y)


def test_batched_oracle_equals_zeroing_consumer_weights_by_hand():
    torch.manual_seed(0)
    model, data = Chain().double().eval(), batches()
    graph = fp.ChannelGraph(model, data[0][0][:1])
    assert [g.size for g in graph.groups] == [3, 4, 5]
    # A tiny budget: one ablation per pass for the conv groups, several for the Linear one.
    got = oracle(model, graph, data, budget=200, progress=False)
    base = mean_loss(model, data)
    assert float(got["base"]) == pytest.approx(base, rel=1e-12)
    expected = []
    for layer, columns in [("conv2", lambda j: [j]), ("fc1", lambda j: range(4 * j, 4 * j + 4)), ("fc2", lambda j: [j])]:
        for j in range(model.get_submodule({"conv2": "conv1", "fc1": "conv2", "fc2": "fc1"}[layer]).weight.shape[0]):
            ablated = copy.deepcopy(model)
            with torch.no_grad():
                ablated.get_submodule(layer).weight[:, list(columns(j))] = 0
            expected.append(mean_loss(ablated, data) - base)
    torch.testing.assert_close(got["loss"], torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got["abs"], got["loss"].abs())


def test_batched_oracle_equals_physical_removal_with_residuals_and_concat():
    torch.manual_seed(1)
    model, data = Residual().double().eval(), batches()
    graph = fp.ChannelGraph(model, data[0][0][:1])
    got = oracle(model, graph, data, budget=500, progress=False)
    base = mean_loss(model, data)
    for unit in range(graph.num_units):
        pruned = copy.deepcopy(model)
        remove = torch.zeros(graph.num_units, dtype=torch.bool)
        remove[unit] = True
        remove_units(pruned, fp.ChannelGraph(pruned, data[0][0][:1]), remove)
        assert got["loss"][unit].item() == pytest.approx(mean_loss(pruned, data) - base, rel=1e-9, abs=1e-12)


def test_units_nobody_consumes_score_exactly_zero():
    torch.manual_seed(2)
    model, data = Residual().double().eval(), batches()
    with torch.no_grad():
        model.fc.weight[:, 5] = 0  # b's second map reaches the loss with weight 0
    graph = fp.ChannelGraph(model, data[0][0][:1])
    side = next(g for g in graph.groups if g.name == "side")
    b = next(g for g in graph.groups if g.name == "b")
    got = oracle(model, graph, data, progress=False)["abs"]
    assert got[side.offset:side.offset + side.size].eq(0).all()
    assert got[b.offset + 1].item() == pytest.approx(0, abs=1e-12)
    assert (got > 1e-6).sum() >= 3  # while the units that matter do not


def test_oracle_leaves_the_model_as_it_was():
    model, data = Chain().double().train(), batches()
    before = copy.deepcopy(model.state_dict())
    oracle(model, fp.ChannelGraph(model, data[0][0][:1]), data, progress=False)
    assert model.training and model.conv1.weight.is_contiguous()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---- Spearman scopes on hand-made numbers -------------------------------------------------------

TWO_LAYERS = SimpleNamespace(groups=[Group("a", [], 4, 0), Group("b", [], 4, 4)])
ORACLE = torch.tensor([1.0, 2, 3, 4, 10, 20, 30, 40], dtype=torch.float64)


def test_scores_proportional_to_the_oracle_correlate_perfectly():
    got = spearman_scopes(3 * ORACLE, ORACLE, TWO_LAYERS)
    assert got["per_layer"] == pytest.approx(1.0) and got["global"] == pytest.approx(1.0)
    assert got["global_l2"] < 1  # normalising undoes the layers' different scales, which the oracle has
    same_norms = torch.tensor([1.0, 2, 3, 4, 2, 1, 4, 3], dtype=torch.float64)
    got = spearman_scopes(3 * same_norms, same_norms, TWO_LAYERS)
    assert got == {"per_layer": pytest.approx(1.0), "global": pytest.approx(1.0), "global_l2": pytest.approx(1.0)}


def test_per_layer_and_global_differ_when_layers_have_different_scales():
    # Right order inside each layer, but layer a's scores are 100x layer b's though its units matter less.
    scores = torch.tensor([100.0, 200, 300, 400, 1, 2, 3, 4], dtype=torch.float64)
    got = spearman_scopes(scores, ORACLE, TWO_LAYERS)
    normalised = np.array([1, 2, 3, 4, 1, 2, 3, 4]) / np.sqrt(30)  # each layer divided by its L2 norm
    assert got["per_layer"] == pytest.approx(1.0)
    assert got["global"] == pytest.approx(spearmanr(scores, ORACLE).statistic) and got["global"] < 0
    assert got["global_l2"] == pytest.approx(spearmanr(normalised, ORACLE).statistic)
    assert got["global"] < got["global_l2"] < got["per_layer"]


def test_units_a_criterion_cannot_score_are_left_out():
    scores = torch.tensor([4.0, 3, 2, 1] + [float("nan")] * 4, dtype=torch.float64)
    got = spearman_scopes(scores, ORACLE, TWO_LAYERS)
    assert got == {"per_layer": pytest.approx(-1.0), "global": pytest.approx(-1.0), "global_l2": pytest.approx(-1.0)}
    assert spearman_scopes(torch.full((8,), float("nan"), dtype=torch.float64), ORACLE, TWO_LAYERS) == \
        {"per_layer": None, "global": None, "global_l2": None}


def test_lowest_share():
    assert lowest_share(ORACLE, ORACLE, share=0.25) == 1.0  # k = 2
    assert lowest_share(-ORACLE, ORACLE, share=0.25) == 0.0
    assert lowest_share(torch.tensor([1.0, 9, 9, 9, 2, 9, 9, 9], dtype=torch.float64), ORACLE, share=0.25) == 0.5
    ties = torch.tensor([0.0, 0, 0, 0, 1, 2, 3, 4], dtype=torch.float64)  # four units that change nothing
    assert lowest_share(torch.tensor([9.0, 9, 1, 2, 9, 9, 9, 9], dtype=torch.float64), ties, share=0.25) == 1.0
    assert lowest_share(torch.tensor([9.0, 9, 9, 9, 1, 2, 9, 9], dtype=torch.float64), ties, share=0.25) == 0.0
    assert lowest_share(ORACLE, ORACLE, share=0.25, units=torch.arange(4, 8)) == 1.0


# ---- the study, its files and the command ---------------------------------------------------------


def float_batches(n=12, classes=3):
    return [(x.float(), y) for x, y in batches(n=n, classes=classes, split=n // 2)]


def test_study_result_holds_the_correlations_computed_on_a_constructed_case(tmp_path):
    # Scores equal to the oracle, reversed, and a hand-computed case: within layer a, [1, 2, 3, 4]
    # against the oracle's order [1, 3, 2, 4]: d = [0, 1, 1, 0], rho = 1 - 6 * 2 / (4 * 15) = 0.8.
    oracle_abs = torch.tensor([1.0, 3, 2, 4, 10, 20, 30, 40], dtype=torch.float64)
    truth = {"loss": -oracle_abs, "abs": oracle_abs, "base": torch.tensor(0.5, dtype=torch.float64)}
    graph = SimpleNamespace(groups=TWO_LAYERS.groups, num_units=8)
    scores = {"same": oracle_abs.clone(), "reversed": -oracle_abs,
              "hand": torch.tensor([1.0, 2, 3, 4, 10, 20, 30, 40], dtype=torch.float64)}
    result = study_result(truth, scores, graph, conv=[graph.groups[0]], share=0.25)
    assert result["spearman"]["same"] == {"per_layer": pytest.approx(1.0), "global": pytest.approx(1.0),
                                          "global_l2": pytest.approx(spearmanr(
                                              np.r_[[1, 3, 2, 4] / np.sqrt(30), [1, 2, 3, 4] / np.sqrt(30)],
                                              oracle_abs).statistic)}
    assert result["spearman"]["reversed"]["per_layer"] == pytest.approx(-1.0)
    assert result["spearman"]["reversed"]["global"] == pytest.approx(-1.0)
    assert result["spearman"]["hand"]["per_layer"] == pytest.approx((0.8 + 1.0) / 2)
    assert result["spearman_conv"]["hand"]["per_layer"] == pytest.approx(0.8)  # layer a only
    rho = 1 - 6 * 2 / (8 * 63)  # all 8 units: units 1 and 2 swapped
    assert result["spearman"]["hand"]["global"] == pytest.approx(rho)
    assert result["oracle_lowest_share"]["same"]["global"] == 1.0 and result["oracle_lowest_share"]["reversed"]["global"] == 0.0
    assert result["oracle_negative_units"] == 8 and result["oracle_zero_units"] == 0 and result["conv_units"] == 4
    result.update(images=12, oracle_s=1.0, criteria_s=1.0, wall_s=2.0)
    paths = write_study(result, tmp_path)
    assert json.loads(paths["json"].read_text())["spearman"]["hand"]["per_layer"] == pytest.approx(0.9)
    text = paths["markdown"].read_text()
    assert "| per layer | 1.00 | -1.00 | 0.90 |" in text and "| per layer | 1.00 | -1.00 | 0.80 |" in text
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".*"))


def test_study_compares_each_criterion_with_the_oracle_it_computed(tmp_path):
    torch.manual_seed(3)
    model, data = Chain().eval(), float_batches()
    result = run_study(model, data, progress=False)
    graph = fp.ChannelGraph(model, data[0][0][:1])
    truth = oracle(model, graph, data, progress=False)
    assert set(result["spearman"]) == set(CRITERIA) and result["units"] == 12 and result["images"] == 12
    # what run_study reports for l1 is the correlation of the l1 scores with this oracle
    l1 = weight_scores("l1", model, graph)
    assert result["spearman"]["l1"] == pytest.approx(spearman_scopes(l1, truth["abs"], graph))
    assert result["spearman"]["l1"]["global"] == pytest.approx(spearmanr(l1, truth["abs"]).statistic)
    assert result["spearman"]["bn-scale"]["global"] is not None  # conv1's 3 units have a BN scale
    assert result["base_loss"] == pytest.approx(float(truth["base"]))


def image_folder(root, n=6, size=32):
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (root / "train" / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8) + 100 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / "train" / name / f"{i}.jpg", "JPEG")


def test_criteria_command_on_a_saved_model_and_an_image_folder(tmp_path, capsys):
    torch.manual_seed(4)
    model = fp.vgg16_layout(num_classes=2, width=0.03)
    fp.save(model, tmp_path / "model.safetensors", metadata={"classes": ["cat", "dog"], "image_size": 32})
    image_folder(tmp_path / "images")
    code = cli.main(["criteria", "--model", str(tmp_path / "model.safetensors"), "--data", str(tmp_path / "images"),
                     "--test-fraction", "0.5", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    saved = json.loads((tmp_path / "out" / "criteria.json").read_text())
    assert saved["images"] == 6 and set(saved["spearman"]) == set(CRITERIA)
    assert "| all layers, L2 norm |" in capsys.readouterr().out


def test_criteria_command_says_what_to_do_without_a_model_or_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FILTERPRUNE_CACHE", str(tmp_path / "empty"))
    assert cli.main(["criteria", "--quiet"]) == 2
    assert "run `filterprune demo` first, or pass --model" in capsys.readouterr().err
    fp.save(fp.vgg16_layout(num_classes=2, width=0.03), tmp_path / "mine.safetensors", metadata={"classes": ["a", "b"]})
    assert cli.main(["criteria", "--model", str(tmp_path / "mine.safetensors"), "--quiet"]) == 2
    assert "pass --data DIR" in capsys.readouterr().err


class _Functional(nn.Module):
    """conv1's channels are consumed by a functional call with conv2's own weight (as timm's std-convs)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        x = F.conv2d(F.relu(self.conv1(x)), self.conv2.weight, self.conv2.bias)
        return self.fc(F.relu(x).mean((2, 3)))


def test_oracle_masks_a_functional_consumer():
    torch.manual_seed(0)
    model = _Functional().double().eval()
    data = batches()
    graph = fp.ChannelGraph(model, data[0][0][:1])
    group = next(g for g in graph.groups if g.name == "conv1")
    truth = oracle(model, graph, data, progress=False)["loss"][group.offset:group.offset + group.size]
    base = mean_loss(model, data)
    for unit in range(group.size):  # by hand: zero conv2's input columns of this channel
        masked = copy.deepcopy(model)
        with torch.no_grad():
            masked.conv2.weight[:, unit] = 0
        assert truth[unit].item() == pytest.approx(mean_loss(masked, data) - base, abs=1e-9)
    assert truth.abs().min() > 0  # before, functional consumers were never masked and scored 0
