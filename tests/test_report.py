import json
import os

import pytest

from filterprune.report import headline_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def summary(accuracy, size_mb, params, macs, b1, b64, **extra):
    return {"accuracy": accuracy, "accuracy_800": accuracy + 0.01, "size_mb": size_mb, "params": params, "macs": macs,
            "latency_ms_b1": b1, "latency_ms_b64": b64, "threads": 2, "device": "cpu", "dtype": "float32", **extra}


def synthetic() -> dict:
    """3 layers, 2 iterations: the pruned network is 3.2x smaller and 2.0x faster at batch 1, 1.25x at batch 64."""
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
             "macs": 25_000_000, "params": 1_200_000, "size_mb": 5.0, "latency_ms_b1": 3.0, "wall_s": 10.0, "train_loss": 0.3},
            {"iteration": 2, "removed": 13, "removed_per_group": {"features.3": 13},
             "channels": {"features.0": 9, "features.3": 19, "classifier.0": 58}, "accuracy": 0.9175, "loss": 0.25,
             "macs": 12_000_000, "params": 600_000, "size_mb": 2.5, "latency_ms_b1": 2.0, "wall_s": 20.0, "train_loss": 0.35},
        ],
        "stopped": "2 iterations done",
        "blog": {"accuracy": [0.987, 0.975], "size_mb": [538.0, 150.0], "latency_ms_b1": [780.0, 277.0]},
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
    assert "| latency, batch 64 (ms) | 50.00 | 51.00 | 40.00 | 1.2x faster |" in md
    assert "98.70% | 97.50% | -1.20 points |" in md  # the blog's accuracy, on the row of its 800 test images
    assert "cpu, float32, 2 threads" in md
    assert "| 2 | 13 | 91.75% | 3.33x | 2.50 | 2.00 |" in md  # the second iteration
    # blog-style: filters removed per layer in the first iteration, in network order, and channels before -> after
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
    assert "- 3.0x faster at batch 1: reached 2.00x — **MISSED**" in md
    assert "- 3.0x smaller on disk: reached 3.20x — **MET**" in md
    # Judged against the control (94.00%), not the weaker baseline (93.15%).
    assert "- lose at most 1.0 accuracy points against the control: lost 1.45 points — **MISSED**" in md
    report = synthetic()
    del report["control"]
    assert "against the baseline: lost 0.60 points — **MET**" in write_report(report, tmp_path)["markdown"].read_text()
    report["targets"] = {"max_accuracy_drop_points": 0.5}
    assert "lost 0.60 points — **MISSED**" in write_report(report, tmp_path)["markdown"].read_text()


def test_without_control_blog_targets_and_optional_numbers(tmp_path):
    report = synthetic()
    for key in ("control", "blog", "targets", "task", "config"):
        del report[key]
    for name in ("baseline", "pruned"):
        del report[name]["accuracy_800"], report[name]["latency_ms_b64"]
    paths = write_report(report, tmp_path)
    md = paths["markdown"].read_text()
    assert "control" not in md and "blog VGG16" not in md and "## Targets" not in md and "batch 64" not in md
    assert "| accuracy, test images | 93.15% | 92.55% | -0.60 points |" in md
    assert headline_table(report) in md
    assert json.loads(paths["json"].read_text()) == report
    assert paths["latency_size"].read_bytes().startswith(PNG)


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
