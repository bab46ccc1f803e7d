"""The pruning policy: which units go, under which limits, and what happens when removal goes wrong."""

import copy

import pytest
import torch
from torch import nn

import filterprune as fp
import filterprune.surgery as surgery_module
from filterprune.surgery import remove_units as real_remove_units


class Chain(nn.Module):
    """a -> ReLU -> b -> BN -> ReLU -> c -> global average -> fc; groups a, b, c of the given widths."""

    def __init__(self, widths=(8, 16, 32)):
        super().__init__()
        wa, wb, wc = widths
        self.a, self.b, self.c = nn.Conv2d(3, wa, 3, padding=1), nn.Conv2d(wa, wb, 3, padding=1), nn.Conv2d(wb, wc, 1)
        self.bn = nn.BatchNorm2d(wb)
        self.fc = nn.Linear(wc, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.b(torch.relu(self.a(x)))))
        return self.fc(self.c(x).mean((2, 3)))


def set_l1(conv: nn.Conv2d, values) -> None:
    """Give filter k an L1 norm of values[k] (all its weights equal), so l1 ranks are known."""
    with torch.no_grad():
        per_weight = torch.tensor(values, dtype=torch.float32) / conv.weight[0].numel()
        conv.weight.copy_(per_weight.view(-1, 1, 1, 1).expand_as(conv.weight))


def spread(n, seed):
    """n distinct l1 values in a shuffled order, so that removed indices are not just a prefix."""
    return (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) + 1.0).tolist()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def make(widths=(8, 16, 32), **kwargs):
    torch.manual_seed(0)
    model = Chain(widths).eval()
    for i, conv in enumerate((model.a, model.b, model.c)):
        set_l1(conv, spread(conv.out_channels, seed=i))
    return model, fp.Pruner(model, X[:1], criterion="l1", **kwargs)


def sizes(pruner):
    return {g.name: g.size for g in pruner.groups}


# ---- original indices -------------------------------------------------------------------------------


def test_removed_indices_refer_to_the_unpruned_layer_across_prunes():
    model = Chain((8, 4, 4))
    set_l1(model.a, [5.0, 1.0, 7.0, 3.0, 8.0, 2.0, 6.0, 4.0])
    original = model.a.weight.detach().clone()
    pruner = fp.Pruner(model, X[:1], criterion="l1", ignore=[model.b, model.c])
    assert sizes(pruner) == {"a": 8}
    first, second = pruner.prune(2), pruner.prune(2)
    assert first.removed == {"a": [1, 5]}
    # After the first prune, filters 3 and 7 sit at positions 2 and 5; the result must say 3 and 7.
    assert second.removed == {"a": [3, 7]}
    kept = [i for i in range(8) if i not in (1, 5, 3, 7)]
    assert torch.equal(model.a.weight, original[kept])


# ---- limits --------------------------------------------------------------------------------------------


def test_min_channels_int():
    model, pruner = make(min_channels=3)
    result = pruner.prune(10_000)
    assert sizes(pruner) == {"a": 3, "b": 3, "c": 3}
    assert result.count == (8 - 3) + (16 - 3) + (32 - 3)
    assert model(X).shape == (2, 5)


def test_min_channels_by_group_name():
    model, pruner = make(min_channels={"b": 10, "c": 20})
    pruner.prune(10_000)
    assert sizes(pruner) == {"a": 1, "b": 10, "c": 20}
    assert (model.b.out_channels, model.bn.num_features, model.c.in_channels) == (10, 10, 10)


def test_never_the_last_channel():
    model, pruner = make(min_channels=0)
    pruner.prune(10_000)
    assert sizes(pruner) == {"a": 1, "b": 1, "c": 1}
    assert pruner.prunable() == 0 and pruner.prune(5).count == 0
    assert model(X).shape == (2, 5)


@pytest.mark.parametrize("n", [1, 5, 13, 30, 60])
def test_round_to_keeps_multiples_of_8_or_leaves_the_group_alone(n):
    before = {"a": 8, "b": 20, "c": 36}
    model, pruner = make(widths=tuple(before.values()), round_to=8)
    norms = {name: getattr(model, name).weight.detach().abs().sum((1, 2, 3)) for name in before}
    result = pruner.prune(n)
    # At least n (rounding allows removing 40 at most here), and no more than the next boundary:
    # a group's count moves in steps of 8, its first step 4 (20 -> 16, 36 -> 32).
    assert min(n, 40) <= result.count < n + 8
    for name, size in sizes(pruner).items():
        assert size % 8 == 0 or size == before[name], (name, size)
        # Rounding gives some units back: they must be the best of those selected, not the worst.
        gone = torch.zeros(before[name], dtype=torch.bool)
        gone[result.removed.get(name, [])] = True
        if gone.any():
            assert norms[name][gone].max() < norms[name][~gone].min(), name
    assert model(X).shape == (2, 5)


def test_scope_layer_removes_the_same_share_of_every_group():
    model, pruner = make(scope="layer")
    # Make c's filters the most important by far, so that global ranking would spare c.
    set_l1(model.c, [100.0 + v for v in spread(32, seed=9)])
    result = pruner.prune(28)  # half of the 56 channels
    assert result.removed_per_group == {"a": 4, "b": 8, "c": 16}
    assert sizes(pruner) == {"a": 4, "b": 8, "c": 16}


def test_global_ranking_takes_the_lowest_normalised_scores_across_groups():
    # a's raw norms are the smallest, but after per-group L2 normalisation b's first ones are lower.
    def model_and_pruner(normalize):
        model = Chain((4, 4, 4)).eval()
        set_l1(model.a, [1.0, 2.0, 3.0, 4.0])
        set_l1(model.b, [10.0, 20.0, 30.0, 1000.0])
        set_l1(model.c, [500.0, 500.0, 500.0, 500.0])  # normalised 0.5 each
        return fp.Pruner(model, X[:1], criterion="l1", normalize=normalize)

    assert model_and_pruner(True).prune(2).removed == {"b": [0, 1], "bn": [0, 1]}
    assert model_and_pruner(False).prune(2).removed == {"a": [0, 1]}
    # Normalised: a = [.18 .37 .55 .73], b = [.01 .02 .03 1.0], c = [.5 .5 .5 .5]: the lowest six
    # are b's three, a's two and one of c (.5 < .55).
    assert model_and_pruner(True).prune(6).removed_per_group == {"a": 2, "b": 3, "c": 1}


def test_ignored_module_keeps_its_outputs():
    model = Chain()
    pruner = fp.Pruner(model, X[:1], criterion="l1", ignore=[model.b])
    assert "b" not in sizes(pruner)
    pruner.prune(10_000)
    assert (model.b.out_channels, model.bn.num_features, model.c.in_channels) == (16, 16, 16)
    assert model.a.out_channels == 1 and model.b.in_channels == 1, "its inputs may still be pruned"


# ---- verification -----------------------------------------------------------------------------------------


def corrupt_after_cut(model, graph, remove):
    """A surgery bug that keeps shapes consistent: the right cut, then a wrong weight."""
    kept = real_remove_units(model, graph, remove)
    model.c.weight = nn.Parameter(model.c.weight.detach() * 1.5)  # swapped, as surgery does
    return kept


def cut_consumer_wrongly(model, graph, remove):
    """A surgery bug that breaks shapes: the consumer loses one input column too many."""
    kept = real_remove_units(model, graph, remove)
    model.c.weight = nn.Parameter(model.c.weight.detach()[:, 1:])
    return kept


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bad_surgery, message", [(corrupt_after_cut, "differs"), (cut_consumer_wrongly, "no longer runs")])
def test_verification_undoes_a_wrong_removal(monkeypatch, bad_surgery, message):
    model, pruner = make()
    before, output = snapshot(model), model(X).detach()
    attrs = {n: (m.in_channels, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    groups = sizes(pruner)
    monkeypatch.setattr(surgery_module, "remove_units", bad_surgery)
    with pytest.raises(fp.GraphError, match=message):
        pruner.prune(10)
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {n: (m.in_channels, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)} == attrs
    assert model.bn.num_features == 16 and sizes(pruner) == groups
    assert torch.equal(model(X), output)
    # With the real surgery back, the same pruner goes on as if nothing had happened.
    monkeypatch.setattr(surgery_module, "remove_units", real_remove_units)
    assert pruner.prune(10).count == 10


def test_without_verification_the_wrong_removal_goes_through(monkeypatch):
    # The check above is what catches the bug: without it, the corrupted model is kept.
    model, pruner = make(verify=False)
    right, right_pruner = make(verify=False)
    monkeypatch.setattr(surgery_module, "remove_units", corrupt_after_cut)
    assert pruner.prune(10).count == 10
    monkeypatch.setattr(surgery_module, "remove_units", real_remove_units)
    right_pruner.prune(10)  # the same removal, cut correctly
    assert model.c.weight.shape == right.c.weight.shape
    assert torch.allclose(model.c.weight, 1.5 * right.c.weight)  # the corruption survived
    assert not torch.allclose(model(X), right(X))


# ---- the pruned model is an ordinary model -------------------------------------------------------------


def attribute_sizes(model, member):
    name, role = member.rsplit(":", 1)
    module = model.get_submodule(name)
    return {"out": getattr(module, "out_channels", getattr(module, "out_features", None)),
            "in": getattr(module, "in_channels", getattr(module, "in_features", None)),
            "channel": getattr(module, "num_features", None)}[role]


def test_pruned_model_trains_and_groups_match_modules():
    model, pruner = make()
    pruner.prune(20)
    pruner.prune(7)
    for group in pruner.groups:
        for member in group.members:
            assert attribute_sizes(model, member) == group.size, member
    for conv in (model.a, model.b, model.c):
        assert conv.weight.shape[:2] == (conv.out_channels, conv.in_channels)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    loss = nn.functional.cross_entropy(model(X), torch.tensor([0, 3]))
    loss.backward()
    optimizer.step()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    assert not torch.equal(model.a.weight, before["a.weight"])


def test_data_criterion_must_be_ranked_again_after_a_prune():
    model, _ = make()
    pruner = fp.Pruner(model, X[:1], criterion="taylor")
    loader = [(X, torch.tensor([1, 2]))]
    pruner.rank(loader, nn.CrossEntropyLoss(), progress=False)
    pruner.prune(3)
    with pytest.raises(RuntimeError, match="again after every prune"):
        pruner.prune(3)
    pruner.rank(loader, nn.CrossEntropyLoss(), progress=False)
    assert pruner.prune(3).count == 3


def test_select_names_what_prune_removes_without_removing():
    torch.manual_seed(0)
    model = fp.vgg16_layout(num_classes=2, width=0.125)
    pruner = fp.Pruner(model, torch.randn(1, 3, 32, 32), criterion="l1")
    before = sum(p.numel() for p in model.parameters())
    mask = pruner.select(12)
    assert int(mask.sum()) == 12 and sum(p.numel() for p in model.parameters()) == before
    expected = {g.name: int(mask[g.offset:g.offset + g.size].sum()) for g in pruner.groups}
    assert pruner.prune(12).removed_per_group == {k: v for k, v in expected.items() if v}


# ---- targets ---------------------------------------------------------------------------------------------


def test_exactly_one_target():
    _, pruner = make()
    for kwargs in ({}, {"n": 1, "ratio": 0.1}, {"ratio": 0.1, "macs": 2.0}):
        with pytest.raises(ValueError, match="exactly one"):
            pruner.prune(**kwargs)


def test_ratio_removes_that_share_of_the_units_there_are_now():
    _, pruner = make()  # 8 + 16 + 32 = 56 units
    assert pruner.prune(ratio=0.25).count == 14
    assert pruner.prune(ratio=0.5).count == 21  # half of the 42 left


def independent_macs(model):
    return fp.profile(model, X[:1], latency=False).macs


def small_vgg():
    torch.manual_seed(0)
    return fp.vgg16_layout(num_classes=2, width=0.125).eval()


@pytest.mark.parametrize("round_to", [1, 8])
def test_macs_target_is_met_in_rank_order_overshooting_by_at_most_one_unit(round_to):
    model = small_vgg()
    x = torch.randn(1, 3, 32, 32)
    start = fp.profile(model, x, latency=False).macs
    pruner = fp.Pruner(model, x, criterion="l1", round_to=round_to, ignore=[model.classifier[0], model.classifier[3]])
    assert pruner.macs_at_start == start
    fewer = copy.deepcopy(model)
    result = pruner.prune(macs=2.0)
    after = fp.profile(model, x, latency=False).macs
    assert (result.macs_before, result.macs_after) == (start, after)
    assert after <= start / 2.0 and result.check == "exact"
    if round_to == 1:  # one unit fewer, in the same rank order, would miss the target
        again = fp.Pruner(fewer, x, criterion="l1", round_to=1, ignore=[fewer.classifier[0], fewer.classifier[3]])
        again.prune(result.count - 1)
        assert fp.profile(fewer, x, latency=False).macs > start / 2.0
    else:
        assert all(size % 8 == 0 or size == before for size, before in zip(
            pruner_sizes(pruner), pruner_sizes(fp.Pruner(small_vgg(), x, criterion="l1"))))


def pruner_sizes(pruner):
    return [g.size for g in pruner.groups]


def test_macs_target_counts_from_when_the_pruner_was_made():
    model = small_vgg()
    x = torch.randn(1, 3, 32, 32)
    pruner = fp.Pruner(model, x, criterion="l1", ignore=[model.classifier[0], model.classifier[3]])
    first = pruner.prune(macs=1.5)
    second = pruner.prune(macs=3.0)
    assert second.macs_before == first.macs_after and second.macs_after <= pruner.macs_at_start / 3.0
    assert pruner.prune(macs=3.0).count == 0  # already there


def test_unreachable_macs_target_is_a_clear_error():
    model, pruner = make(min_channels={"a": 8, "b": 16, "c": 30})
    with pytest.raises(ValueError, match="out of reach.*min_channels"):
        pruner.prune(macs=2.0)
    assert sizes(pruner) == {"a": 8, "b": 16, "c": 32}, "nothing may be removed"


# ---- the self-check's numerics and shapes ----------------------------------------------------------------------


class TwoHeads(Chain):
    """Returns (logits, c's pooled features), or only the logits once fc has lost an output."""

    def forward(self, x):
        x = torch.relu(self.bn(self.b(torch.relu(self.a(x)))))
        features = self.c(x).mean((2, 3))
        logits = self.fc(features)
        return (logits, features) if self.fc.out_features == 5 else (logits,)


def cut_an_output_row(model, graph, remove):
    kept = real_remove_units(model, graph, remove)
    model.fc.weight = nn.Parameter(model.fc.weight.detach()[:4])
    model.fc.bias = nn.Parameter(model.fc.bias.detach()[:4])
    model.fc.out_features = 4
    return kept


def test_a_different_number_or_shape_of_outputs_is_refused(monkeypatch):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    pruner = fp.Pruner(model, X[:1], criterion="l1")
    monkeypatch.setattr(surgery_module, "remove_units", cut_an_output_row)
    # zip() would compare only the logits, (1, 5) against (1, 4): refused for shapes, not by luck.
    with pytest.raises(fp.GraphError, match=r"outputs have shapes \[\(1, 4\)\].*\[\(1, 5\), \(1, 32\)\]"):
        pruner.prune(10)
    assert model.fc.out_features == 5 and len(model(X)) == 2


def test_bf16_model_passes_when_correct_and_is_refused_when_corrupted(monkeypatch):
    model, pruner = make()
    model.to(torch.bfloat16)
    pruner = fp.Pruner(model, X[:1].bfloat16(), criterion="l1")
    assert pruner.prune(10).check == "exact"
    assert pruner.prune(10).count == 10
    monkeypatch.setattr(surgery_module, "remove_units", corrupt_after_cut)
    with pytest.raises(fp.GraphError, match="differs"):
        pruner.prune(5)


def test_check_runs_without_tf32_and_gives_the_settings_back(monkeypatch):
    model, pruner = make()
    seen = []
    model.c.register_forward_hook(lambda *_: seen.append((torch.get_float32_matmul_precision(),
                                                          torch.backends.cudnn.allow_tf32)))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    torch.set_float32_matmul_precision("high")
    try:
        pruner.prune(10)
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("high", True)
    finally:
        torch.set_float32_matmul_precision("highest")
    assert ("highest", False) in seen, "the reference and the check must run in full float32"


def test_inexact_slots_are_checked_for_running_and_shapes_only(monkeypatch):
    model, pruner = make()
    for slot in pruner.graph.slots:  # as the graph marks a GroupNorm across channels
        slot.exact = slot.module != "bn"
    monkeypatch.setattr(surgery_module, "remove_units", corrupt_after_cut)
    result = pruner.prune(40)
    assert result.check == "forward-only" and result.removed_per_group.get("b")
    monkeypatch.undo()  # the new Pruner's probe must see the real cut, or it leaves every group out
    model, pruner = make()
    monkeypatch.setattr(surgery_module, "remove_units", corrupt_after_cut)
    with pytest.raises(fp.GraphError, match="differs"):
        pruner.prune(40)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_round_to_auto_is_8_on_cuda():
    model = Chain().cuda()
    assert fp.Pruner(model, X[:1].cuda(), criterion="l1").round_to == 8


def test_round_to_auto_is_1_on_the_cpu():
    assert make()[1].round_to == 1


# ---- the user's model is left alone --------------------------------------------------------------------------


def state_and_modes(model):
    return ({k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            {name: m.training for name, m in model.named_modules()})


def torchvision_model(name):
    import torchvision
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, num_classes=4)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("mode", ["train", "eval", "one-bn-frozen"])
@pytest.mark.parametrize("criterion", ["taylor", "l1"])
def test_pruner_rank_and_select_leave_the_model_alone(name, mode, criterion):
    model = torchvision_model(name).train(mode != "eval")
    if mode == "one-bn-frozen":
        next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    state, modes = state_and_modes(model)
    pruner = fp.Pruner(model, x[:1], criterion=criterion, ignore=[m for m in model.modules() if isinstance(m, nn.Linear)][-1:])
    pruner.rank([(x, torch.tensor([0, 1, 2, 3]))], nn.CrossEntropyLoss(), progress=False)
    pruner.select(ratio_units(pruner, 0.3))
    pruner.macs()
    after, modes_after = state_and_modes(model)
    assert modes_after == modes
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state), [k for k in state if not torch.equal(after[k], state[k])]
    assert all(p.grad is None for p in model.parameters())


def ratio_units(pruner, share):
    return int(share * sum(g.size for g in pruner.groups))


# ---- the default policy on the torchvision zoo ------------------------------------------------------------------

ZOO = ["vgg16_bn", "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "densenet121",
       "efficientnet_b0", "googlenet", "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_x_400mf"]


@pytest.mark.parametrize("name", ZOO)
def test_default_policy_halves_macs_exactly(name):
    import torchvision
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs).eval()
    x = torch.randn(1, 3, 32, 32)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)]
    result = fp.Pruner(model, x, criterion="l1", ignore=classifier).prune(macs=2.0)
    assert result.check == "exact"  # the self-check compared it with the zeroed unpruned model
    assert result.macs_before / result.macs_after >= 1.9
    assert result.macs_after == fp.profile(model, x, latency=False).macs


def test_a_trial_removal_is_undone_when_its_block_raises_even_after_keep():
    model, pruner = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    remove = torch.zeros(pruner.graph.num_units, dtype=torch.bool)
    remove[0] = True
    with pytest.raises(RuntimeError, match="after keep"):
        with surgery_module.removed(model, pruner.graph, remove) as trial:
            trial.keep()
            raise RuntimeError("after keep")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
