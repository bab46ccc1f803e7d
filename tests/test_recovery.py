"""Recovery tools chosen by trials of the first step on validation (recovery.py, auto.prune_auto)."""

import torch
from torch import nn

from filterprune import Schedule
from filterprune.recovery import Setting, Switch, choose, switches
from filterprune.schedule import accuracy_noise
from filterprune.report import _plan


def headed(seed: int = 0) -> nn.Sequential:
    """Two convs, then a head with one hidden Linear layer ("7") before the output ("9")."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))


def test_a_tool_is_used_only_when_it_wins_by_more_than_the_margin_and_each_is_tried_on_the_best_so_far():
    base = Setting(Schedule(), ())
    to = lambda field, value: lambda s: Setting(Schedule(**{**s.schedule.__dict__, field: value}), s.ignore)  # noqa: E731
    scores = {("mean", 0.0): 0.800, ("l2", 0.0): 0.810, ("l2", 0.5): 0.806, ("mean", 0.5): 0.900}
    tried = []

    def trial(s: Setting) -> tuple[float, dict]:
        tried.append((s.schedule.normalize, s.schedule.distill))
        return scores[tried[-1]], {"speed": 2.0}

    chosen, rows, gave_up = choose(base, [Switch("normalize", "l2", to("normalize", "l2")), Switch("distill", "0.5", to("distill", 0.5))],
                                   trial, margin=0.5)
    # l2 gains 1.00 point (> 0.5): used; distillation is then tried on top of l2, where it loses 0.40 points.
    assert tried == [("mean", 0.0), ("l2", 0.0), ("l2", 0.5)] and not gave_up
    assert (chosen.schedule.normalize, chosen.schedule.distill) == ("l2", 0.0)
    assert rows[1]["outcome"].startswith("used: +1.00 points") and rows[2]["outcome"].startswith("not used: -0.40 points")
    assert rows[2]["against"] == 0.810
    small = choose(base, [Switch("normalize", "l2", to("normalize", "l2"))], lambda s: (0.8 + 0.004 * (s.schedule.normalize == "l2"), {}),
                   margin=0.5)[0]
    assert small.schedule.normalize == "mean"  # +0.40 points: within the margin, the default stays
    exact = choose(base, [Switch("normalize", "l2", to("normalize", "l2"))], lambda s: (0.925 + 0.005 * (s.schedule.normalize == "l2"), {}),
                   margin=0.5)[0]
    assert exact.schedule.normalize == "mean"  # 0.93 - 0.925 is 0.5000000000000004 points in floats: still a tie


def test_a_tool_level_on_validation_is_used_when_it_gets_clearly_closer_to_the_targets():
    """The head pruned with the filters: the same MACs, the same accuracy, but much faster at batch 1."""
    switch = Switch("head", "head pruned", lambda s: Setting(s.schedule, ()))
    reach = {("7",): (0.90, {"speed": 1.6, "size": 1.7}), (): (0.90, {"speed": 2.1, "size": 9.0})}
    chosen, rows, _ = choose(Setting(Schedule(), ("7",)), [switch], lambda s: reach[s.ignore], margin=1.5)
    assert chosen.ignore == () and rows[1]["outcome"].startswith("used: +0.00 points") and "speed 2.10x" in rows[1]["outcome"]
    # Within timing noise (15%), or a little worse on validation: not used.
    reach[()] = (0.90, {"speed": 1.8, "size": 1.7})
    assert choose(Setting(Schedule(), ("7",)), [switch], lambda s: reach[s.ignore], margin=1.5)[0].ignore == ("7",)
    reach[()] = (0.899, {"speed": 2.1, "size": 9.0})
    assert choose(Setting(Schedule(), ("7",)), [switch], lambda s: reach[s.ignore], margin=1.5)[0].ignore == ("7",)
    # A tool that leaves the network as it is (distillation) is faster only by noise: not used.
    same = Switch("distill", "distill 0.5", lambda s: Setting(s.schedule, ()), reshapes=False)
    reach[()] = (0.90, {"speed": 2.1, "size": 9.0})
    assert choose(Setting(Schedule(), ("7",)), [same], lambda s: reach[s.ignore], margin=1.5)[0].ignore == ("7",)
    # Further on one target but behind on another: not used.
    reach[()] = (0.90, {"speed": 2.1, "size": 1.4})
    assert choose(Setting(Schedule(), ("7",)), [switch], lambda s: reach[s.ignore], margin=1.5)[0].ignore == ("7",)


def test_the_noise_is_one_standard_error_of_a_difference_of_two_accuracies():
    # By hand: sqrt(2 * 0.9 * 0.1 / 200) = 0.03 -> 3.0 points; 87% on 1000 images -> 1.504 points.
    assert abs(accuracy_noise(0.9, 200) - 3.0) < 1e-9 and abs(accuracy_noise(0.87, 1000) - 1.50399) < 1e-4
    assert accuracy_noise(0.9, None) == 0.0 and accuracy_noise(1.0, 500) == 0.0


def test_choosing_stops_before_a_trial_that_would_pass_its_deadline():
    now = [0.0]

    def trial(s: Setting) -> tuple[float, dict]:
        now[0] += 10.0
        return 0.5, {}
    switch = Switch("normalize", "l2", lambda s: s)
    _, rows, gave_up = choose(Setting(Schedule(), ()), [switch, switch], trial, 0.5, deadline=25.0, clock=lambda: now[0])
    assert len(rows) == 2 and len(gave_up) == 1 and gave_up[0].startswith("choosing normalize")


def test_the_head_is_offered_pruned_or_kept_and_left_out_when_it_cannot_be_a_choice():
    model, example = headed(), torch.zeros(1, 3, 8, 8)
    found, left_out = switches(model, example, Setting(Schedule(), ()))
    assert [s.tool for s in found] == ["normalize", "head", "distill"] and not left_out
    head = found[1]
    assert head.apply(Setting(Schedule(), ())).ignore == ("7",) and head.label.startswith("head kept")
    kept = switches(model, example, Setting(Schedule(), ("7", "9")))[0][1]
    assert kept.apply(Setting(Schedule(), ("7", "9"))).ignore == ("9",) and kept.label.startswith("head pruned")
    # The hidden layer holds most parameters: kept, the model cannot get 4x smaller.
    found, left_out = switches(model, example, Setting(Schedule(target_size=4.0), ()))
    assert "head" not in [s.tool for s in found] and "cannot reach the targets" in left_out[0]["why"]
    # A layer the user asked to keep is never offered for pruning.
    assert "head" in switches(model, example, Setting(Schedule(), ("7",)), fixed=["7"])[1][0]["tool"]
    one_linear = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert "no hidden Linear" in switches(one_linear, example, Setting(Schedule(), ()))[1][0]["why"]


def test_the_planned_run_uses_the_tool_that_wins_on_validation_and_the_report_says_why():
    """A stubbed validation score that falls as the hidden Linear layer loses units: the trial with the
    head kept wins, the run keeps the head whole, and report.md gives the trials."""
    from filterprune.auto import Plan, prune_auto, reported_plan

    model = headed()
    data = torch.utils.data.TensorDataset(torch.randn(24, 3, 8, 8), torch.randint(0, 3, (24,)))
    loader = torch.utils.data.DataLoader(data, batch_size=6)
    accuracy = lambda m: {"accuracy": 0.5 + 0.5 * m[7].out_features / 64}  # noqa: E731
    pruned, log, _ = prune_auto(model, data.tensors[0][:1], loader, loader, Schedule(criterion="l1", target_macs=2.0),
                                Plan(first_step=1.8, max_epochs=1, final_max_epochs=1, control=False), evaluate_fn=accuracy,
                                trainer=lambda m, epochs: lambda epoch: None, progress=False, log_fn=lambda line: None)
    recovery = log["recovery"]
    assert recovery["used"]["head"] == "kept" and pruned[7].out_features == 64
    assert [t["tool"] for t in recovery["trials"]] == ["defaults", "normalize", "head"]
    assert recovery["trials"][2]["outcome"].startswith("used") and recovery["trials"][2]["score"] == 1.0
    assert recovery["trials"][0]["score"] < 1.0  # pruned with the filters, the head did lose units in the trial
    assert recovery["left_out"] == [{"tool": "distill", "why": "a trainer was given: distillation is up to it"}]
    assert log["seconds"]["recovery"] > 0
    report = {"baseline": log["baseline"], "iterations": log["iterations"],
              "plan": reported_plan(log)}
    text = "\n".join(_plan(report))
    assert "Recovery tools used: **normalize" in text and "head kept" in text and "| head | head kept (7)" in text


def test_without_choosing_the_tools_are_used_as_given():
    from filterprune.auto import Plan, prune_auto

    data = torch.utils.data.TensorDataset(torch.randn(12, 3, 8, 8), torch.randint(0, 3, (12,)))
    loader = torch.utils.data.DataLoader(data, batch_size=6)
    _, log, _ = prune_auto(headed(), data.tensors[0][:1], loader, loader, Schedule(criterion="l1", target_macs=1.5),
                           Plan(max_epochs=1, final_max_epochs=1, control=False, choose_recovery=False),
                           evaluate_fn=lambda m: {"accuracy": 1.0}, trainer=lambda m, epochs: lambda epoch: None, progress=False,
                           log_fn=lambda line: None)
    assert "recovery" not in log and log["seconds"]["recovery"] == 0 and log["schedule"]["normalize"] == "mean"
