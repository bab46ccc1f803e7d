import json
import os

import pytest

from filterprune.report import headline_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def record(batch, ms, iqr=None, runtime="eager"):
    """A latency record as measure.Profile.records writes it (no iqr_ms: a published figure)."""
    return {"runtime": runtime, "version": "1.0", "batch": batch, "ms": ms, **({"iqr_ms": iqr} if iqr is not None else {}),
            "threads": 2, "dtype": "float32", "device": "cpu"}


def set_latency(summary, batch, ms, iqr=None, runtime="eager"):
    """Replace (or add) the record of `runtime` at `batch`, keeping its spread unless `iqr` is given."""
    old = next((r for r in summary["latency"] if (r["runtime"], r["batch"]) == (runtime, batch)), {})
    summary["latency"] = [r for r in summary["latency"] if r is not old] + [record(batch, ms, iqr if iqr is not None else
                                                                                   old.get("iqr_ms", 0.1), runtime)]


def summary(accuracy, size_mb, params, macs, b1, b64, iqr=(0.1, 1.0), **extra):
    return {"accuracy": accuracy, "accuracy_800": accuracy + 0.01, "size_mb": size_mb, "params": params, "macs": macs,
            "latency": [record(1, b1, iqr[0]), record(64, b64, iqr[1])],
            "threads": 2, "device": "cpu", "dtype": "float32", **extra}


def synthetic() -> dict:
    """3 layers, 2 iterations: the pruned network is 3.2x smaller and 2.0x faster at batch 1; at batch 64 50 -> 40 ms
    is a change (10 ms) beyond the spreads (1 + 1 ms). The control's batch 64, 51 ms, is within them of 50 ms."""
    return {
        "config": {"step": 0.12, "iterations": 2},
        "task": {"pair": ["Shirt", "T-shirt/top"], "train_images": 2000, "test_images": 2000, "blog_test_images": 800},
        "baseline": summary(0.9315, 8.0, 2_000_000, 40_000_000, 4.0, 50.0),
        "control": summary(0.9400, 8.0, 2_000_000, 40_000_000, 4.1, 51.0, extra_epochs=9),
        "pruned": summary(0.9255, 2.5, 600_000, 12_000_000, 2.0, 40.0),
        "channels_before": {"features.0": 16, "features.3": 32, "classifier.0": 64},
        "iterations": [
            {"iteration": 1, "removed": 13, "removed_per_group": {"features.0": 7, "classifier.0": 6},
             "channels": {"features.0": 9, "features.3": 32, "classifier.0": 58}, "accuracy": 0.92, "loss": 0.2,
             "macs": 25_000_000, "params": 1_200_000, "size_mb": 5.0, "latency": [record(1, 3.0, 0.1)],
             "wall_s": 10.0, "train_loss": 0.3, "check": "exact"},
            {"iteration": 2, "removed": 13, "removed_per_group": {"features.3": 13},
             "channels": {"features.0": 9, "features.3": 19, "classifier.0": 58}, "accuracy": 0.9175, "loss": 0.25,
             "macs": 12_000_000, "params": 600_000, "size_mb": 2.5, "latency": [record(1, 4.05, 0.1)],
             "wall_s": 20.0, "train_loss": 0.35, "check": "forward-only"},
        ],
        "stopped": "2 iterations done",
        "labels": {"accuracy_800": "accuracy, 800 test images"},
        "reference": {"label": "paper", "note": "one image on an i7 CPU", "before": {"accuracy_800": 0.987, "size_mb": 538.0,
                      "latency": [record(1, 780.0)]}, "after": {"accuracy_800": 0.975, "size_mb": 150.0, "latency": [record(1, 277.0)]}},
        "skipped": ["head.norm: F.layer_norm over a dimension that is not channels"],
        "targets": {"latency_b1": 3.0, "size": 3.0, "max_accuracy_drop_points": 1.0},
        "wall_s": 123.4,
    }


def test_writes_json_markdown_and_png_plots(tmp_path):
    report = synthetic()
    paths = write_report(report, tmp_path / "out")
    assert {"json", "markdown"} < set(paths) and len(paths) == 5
    for name, path in paths.items():
        assert path.parent == tmp_path / "out" and path.exists(), name
        if path.suffix == ".png":
            data = path.read_bytes()
            assert data.startswith(PNG) and 1_000 < len(data) < 300_000, (name, len(data))
    assert json.loads(paths["json"].read_text()) == report
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_markdown_numbers_come_from_the_dict(tmp_path):
    md = write_report(synthetic(), tmp_path)["markdown"].read_text()
    assert "| accuracy, all 2000 test images | 93.15% | 94.00% | 92.55% | -0.60 points |" in md
    assert "| size on disk (MB) | 8.00 | 8.00 | 2.50 | 3.2x smaller | 538 | 150 | 3.6x smaller |" in md
    assert "| MACs per image | 40.00 M | 40.00 M | 12.00 M | 3.3x fewer |" in md
    assert "| latency, batch 64 (ms) | 50.00 | 51.00 | 40.00 | 1.25x faster |" in md
    assert "| latency, batch 1 (ms) | 4.00 | 4.10 | 2.00 | 2.00x faster | 780 | 277 | 2.82x faster (spread not measured) |" in md
    # the reference's accuracy, on the row of the key it names
    assert "| accuracy, 800 test images | 94.15% | 95.00% | 93.55% | -0.60 points | 98.70% | 97.50% | -1.20 points |" in md
    assert "cpu, float32, 2 threads" in md and "headline: batch 1" in md and "paper: one image on an i7 CPU" in md
    assert "| 1 | 13 | 92.00% | 1.60x | 5.00 | 3.00 | 1.33x faster | exact |" in md
    # 4.00 -> 4.05 ms with spreads 0.1 + 0.1: no claim, and a slow-down is never "0.99x faster"
    assert "| 2 | 13 | 91.75% | 3.33x | 2.50 | 4.05 | no measurable change | forward-only |" in md
    assert "## Left out of pruning" in md and "- head.norm: F.layer_norm over a dimension that is not channels" in md
    # filters removed per layer in the first iteration, in network order, and channels before -> after
    assert "features.0: 7, features.3: 0, classifier.0: 6." in md
    assert "| features.3 | 0 | 32 | 19 | 59% |" in md
    assert "2 iterations done" in md and "123 s" in md
    assert "![latency_size](latency_size.png)" in md
    assert "26 of 112 channels (23%) in 2 iterations" in md and "94.00% for the control" in md


def test_rejected_iteration_is_marked_and_its_channels_not_counted(tmp_path):
    report = synthetic()
    report["iterations"][1]["rejected"] = True
    md = write_report(report, tmp_path)["markdown"].read_text()
    assert "| 2 (rejected: lost too much accuracy) | 13 |" in md
    assert "13 of 112 channels (12%) in 1 iterations (1 more rejected)" in md
    assert "| features.3 | 0 | 32 | 32 | 100% |" in md


def test_targets_met_and_missed_from_the_numbers(tmp_path):
    md = write_report(synthetic(), tmp_path)["markdown"].read_text()
    assert "- 3.0x faster at batch 1: reached 2.00x faster — **MISSED**" in md
    assert "- 3.0x smaller on disk: reached 3.20x — **MET**" in md
    # Judged against the control (94.00%), not the weaker baseline (93.15%).
    assert "- lose at most 1.0 accuracy points against the control: lost 1.45 points — **MISSED**" in md
    report = synthetic()
    del report["control"]
    assert "against the baseline: lost 0.60 points — **MET**" in write_report(report, tmp_path)["markdown"].read_text()
    report["targets"] = {"max_accuracy_drop_points": 0.5}
    assert "lost 0.60 points — **MISSED**" in write_report(report, tmp_path)["markdown"].read_text()
    report["pruned"]["accuracy"] = report["baseline"]["accuracy"] + 0.009
    assert "against the baseline: gained 0.90 points — **MET**" in write_report(report, tmp_path)["markdown"].read_text()


def test_a_drop_of_exactly_the_goal_is_met(tmp_path):
    # 87.45% -> 86.45% on 2000 images: 0.0100000001 in floats, printed and judged as 1.00 points.
    report = synthetic()
    report["control"]["accuracy"], report["pruned"]["accuracy"] = 0.8745, 0.8645
    assert 100 * (0.8745 - 0.8645) > 1.0
    md = write_report(report, tmp_path)["markdown"].read_text()
    assert "- lose at most 1.0 accuracy points against the control: lost 1.00 points — **MET**" in md


def test_without_control_blog_targets_and_optional_numbers(tmp_path):
    report = synthetic()
    for key in ("control", "reference", "targets", "task", "config", "skipped", "labels"):
        del report[key]
    for name in ("baseline", "pruned"):
        del report[name]["accuracy_800"]
        report[name]["latency"] = [r for r in report[name]["latency"] if r["batch"] != 64]
    for it in report["iterations"]:
        del it["check"]
    paths = write_report(report, tmp_path)
    md = paths["markdown"].read_text()
    assert "control" not in md and "paper" not in md and "## Targets" not in md and "batch 64" not in md
    assert "Left out" not in md and "verified by" not in md
    assert "| accuracy, test images | 93.15% | 92.55% | -0.60 points |" in md
    assert headline_table(report) in md
    assert json.loads(paths["json"].read_text()) == report
    assert paths["latency_size"].read_bytes().startswith(PNG)


def test_slowdowns_and_noise_in_every_claim(tmp_path):
    report = synthetic()
    set_latency(report["pruned"], 1, 5.0)  # 4 -> 5 ms: slower
    set_latency(report["pruned"], 64, 49.5)  # 50 -> 49.5: inside 1 + 1 ms
    md = write_report(report, tmp_path)["markdown"].read_text()
    assert "| latency, batch 1 (ms) | 4.00 | 4.10 | 5.00 | 1.25x slower |" in md
    assert "| latency, batch 64 (ms) | 50.00 | 51.00 | 49.50 | no measurable change |" in md
    assert "latency: 1.25x slower at batch 1 on cpu" in md
    assert "- 3.0x faster at batch 1: reached 1.25x slower — **MISSED**" in md
    assert "0.80x" not in md and "1.0x faster" not in md
    report["targets"] = {"latency_b64": 1.0}  # 50 -> 49.5 ms is 1.01x, but inside the noise: not met
    md = write_report(report, tmp_path)["markdown"].read_text()
    assert "- 1.0x faster at batch 64: reached no measurable change — **MISSED**" in md


def test_speed_ups_timed_in_turns_are_the_median_of_each_rounds_ratio(tmp_path):
    """Where the pruned network was timed in turns with the baseline ("speedup", measure.in_turns), its
    speed-up is the median of the rounds' ratios (3.10x), not its lowest time against the baseline's
    (4 -> 2 ms: 2.00x), in the table, the summary and the targets; rounds that disagree on the
    direction are no measurable change."""
    report = synthetic()
    report["pruned"]["speedup"] = [{"runtime": "eager", "batch": 1, "x": 3.1, "ratios": [2.9, 3.1, 3.3]},
                                   {"runtime": "eager", "batch": 64, "x": 1.05, "ratios": [0.97, 1.05, 1.2]}]
    md = write_report(report, tmp_path)["markdown"].read_text()
    assert "| latency, batch 1 (ms) | 4.00 | 4.10 | 2.00 | 3.10x faster |" in md
    assert "| latency, batch 64 (ms) | 50.00 | 51.00 | 40.00 | no measurable change |" in md
    assert "latency: 3.10x faster at batch 1 on cpu" in md
    assert "- 3.0x faster at batch 1: reached 3.10x faster — **MET**" in md
    assert "speed-ups: the median of each round's ratio to the baseline" in md
    report["pruned"]["speedup"][0].update(x=2.95, ratios=[2.9, 2.95, 3.3])
    assert "reached 2.95x faster — **MISSED**" in write_report(report, tmp_path)["markdown"].read_text()


def test_on_a_gpu_the_headline_is_batch_64_and_batch_1_is_marked_launch_bound(tmp_path):
    report = synthetic()
    for name in ("baseline", "control", "pruned"):
        report[name]["device"] = "cuda:0"
    set_latency(report["pruned"], 1, 4.2, 0.3)  # 4.0 -> 4.2 ms at batch 1: launch noise
    md = write_report(report, tmp_path)["markdown"].read_text()
    assert "latency: 1.25x faster at batch 64 on cuda:0" in md and "headline: batch 64" in md
    assert "batch 1: on a GPU, batch-1 time is dominated by kernel launch overhead" in md
    assert "| latency, batch 1 (ms) | 4.00 | 4.10 | 4.20 | no measurable change |" in md


def test_full_disk_names_the_file_and_keeps_the_old_report(tmp_path, monkeypatch):
    paths = write_report(synthetic(), tmp_path)
    old = {name: path.read_bytes() for name, path in paths.items()}
    changed = synthetic()
    changed["stopped"] = "something else"

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError, match="No space left on device") as info:
        write_report(changed, tmp_path)
    assert info.value.errno == 28 and str(tmp_path / "accuracy_vs_macs.png") in str(info.value)
    assert "free some disk space" in str(info.value)
    assert {name: path.read_bytes() for name, path in paths.items()} == old  # the previous report, untouched
    assert sorted(tmp_path.iterdir()) == sorted(paths.values())  # and no temp files left behind


def test_iterations_table_uses_the_loops_own_evaluation_data(tmp_path):
    """The loop evaluated on validation images: its table must not mix in the headline's test accuracy."""
    report = synthetic()
    report["loop"] = {"baseline": {**report["baseline"], "accuracy": 0.8123},
                      "final": {**report["pruned"], "accuracy": 0.7987}, "evaluated_on": "1000 validation images"}
    md = write_report(report, tmp_path)["markdown"].read_text()
    table = md[md.index("## Iterations"):]
    assert "accuracy (1000 validation images)" in table
    assert "| 0 (baseline) |  | 81.23% |" in table and "79.87%" in table


def test_a_chosen_runtime_is_the_headline_with_eager_beside_it(tmp_path):
    """Measured in onnxruntime beside eager: both rows, onnxruntime first and in the summary and targets."""
    report = synthetic()
    del report["control"], report["reference"]
    for name, (b1, iqr) in {"baseline": (1.2, 0.01), "pruned": (0.3, 0.01)}.items():
        set_latency(report[name], 1, b1, iqr, runtime="onnxruntime")
    for it in report["iterations"]:
        set_latency(it, 1, 0.9, 0.01, runtime="onnxruntime")
    md = write_report(report, tmp_path)["markdown"].read_text()
    head = md[md.index("## Headline"):md.index("## Targets")]
    assert "| latency, batch 1 in onnxruntime (ms) | 1.20 | 0.30 | 4.00x faster |" in head
    assert "| latency, batch 1 in eager (ms) | 4.00 | 2.00 | 2.00x faster |" in head
    assert head.index("in onnxruntime (ms)") < head.index("in eager (ms)")
    assert "headline: batch 1 in onnxruntime" in head and "runtimes: eager 1.0, onnxruntime 1.0" in head
    assert "4.00x faster at batch 1 on cpu in onnxruntime (eager PyTorch: 2.00x faster)" in md
    assert "- 3.0x faster at batch 1 in onnxruntime: reached 4.00x faster — **MET**" in md
    table = md[md.index("## Iterations"):]
    assert "latency b1 in onnxruntime (ms) | speed vs baseline (onnxruntime) | latency b1 in eager (ms)" in table
