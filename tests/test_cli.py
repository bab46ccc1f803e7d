"""The command line on users' own image folders (issue 3), and bad input (issue 5).

Tiny generated JPEG folders in every supported layout go through train -> prune -> eval ->
export -> predict with a tiny vgg16_layout (--width 0.03); every kind of bad input gets one clear
line on stderr (exit 2), or a warning for a few bad images, and never overwrites earlier results.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from torch import nn

import filterprune as fp
from filterprune import cli, models
from filterprune.cli import main
from images import COLOURS, one_thread, picture  # noqa: F401  (one_thread: an autouse fixture)

TINY = ["--arch", "vgg16_layout", "--width", "0.03"]
FAST = ["--size", "32", "--workers", "0", "--batch-size", "8", "--lr", "0.01", "--quiet"]
# the blog prunes conv filters only: the hidden Linear layers of the three-linear head keep their units
PRUNE = ["--head-epochs", "1", "--epochs", "1", "--epochs-between", "1", "--iterations", "2", "--step", "0.2",
         "--ignore", "classifier.0", "classifier.3"]
NO_TRAINING = ["--head-epochs", "0", "--epochs", "0"]




# ---------------------------------------------------------------- generated images

def write(path: Path, image, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(path, fmt)
    return path


def image_folders(root: Path, classes=tuple(COLOURS), n_train: int = 6, n_test: int = 2, test: bool = True) -> Path:
    for c in classes:
        for i in range(n_train):
            write(root / "train" / c / f"{c}{i}.jpg", picture(c, i))
        for i in range(n_test if test else 0):
            write(root / "test" / c / f"{c}{i}.jpg", picture(c, 100 + i))
    return root


def kaggle_folder(root: Path, classes=("cat", "dog"), n: int = 6) -> Path:
    for c in classes:
        for i in range(n):
            write(root / "train" / f"{c}.{i}.jpg", picture(c, i))
    return root


def truncated_jpeg(path: Path) -> Path:
    write(path, np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8), "JPEG")
    path.write_bytes(path.read_bytes()[:300])
    return path


# ---------------------------------------------------------------- helpers

def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> str:
    """Exit status 2 and exactly one `filterprune: error:` line (warnings aside) holding every word."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if not line.startswith("filterprune: warning:")]
    assert len(lines) == 1 and lines[0].startswith("filterprune: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """The files directly in `folder`, byte by byte (the results of a run; not its checkpoint)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def calls(monkeypatch, module, name: str) -> list:
    """Record calls of module.name (still calling it)."""
    seen, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


# ---------------------------------------------------------------- shared runs

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"with_test": image_folders(root / "with_test"),
            "no_test": image_folders(root / "no_test", test=False),
            "kaggle": kaggle_folder(root / "kaggle")}


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory):
    """`filterprune train` of a tiny vgg16_layout on 3 classes (train/ and test/ folders)."""
    out = tmp_path_factory.mktemp("trained") / "model.safetensors"
    assert main(["train", "--data", str(folders["with_test"]), *TINY, *FAST, "--head-epochs", "1", "--epochs", "1",
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def pruned(folders, trained, tmp_path_factory):
    """`filterprune prune` of the trained model: 2 iterations of 20% of the channels."""
    out = tmp_path_factory.mktemp("pruned") / "run"
    assert main(["prune", "--data", str(folders["with_test"]), "--model", str(trained), *FAST, *PRUNE, "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------- issue 3: the pipeline

def test_train_prune_eval_export_predict(folders, trained, pruned, tmp_path, capsys):
    model = fp.load(trained)
    assert model.filterprune_metadata["classes"] == ["cat", "dog", "fox"]
    assert model.filterprune_metadata["image_size"] == 32
    assert model.features[0].out_channels == 8  # --width 0.03 reached vgg16_layout

    for name in ("pruned.safetensors", "report.json", "report.md", "checkpoint/state.json"):
        assert (pruned / name).is_file(), name
    report = json.loads((pruned / "report.json").read_text())
    assert len(report["iterations"]) == 2 and report["stopped"] == "2 iterations done"
    small = fp.load(pruned / "pruned.safetensors")
    assert small.filterprune_metadata["classes"] == ["cat", "dog", "fox"]
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(small) < params(model)
    assert (pruned / "pruned.safetensors").stat().st_size < trained.stat().st_size
    assert report["pruned"]["macs"] < report["baseline"]["macs"]
    assert sum(c.out_channels for c in small.modules() if isinstance(c, nn.Conv2d)) < \
        sum(c.out_channels for c in model.modules() if isinstance(c, nn.Conv2d))
    assert (pruned / "report.md").read_text().startswith("# Pruning report")

    code, out, err = run(capsys, "eval", "--data", folders["with_test"], "--model", pruned / "pruned.safetensors",
                         "--workers", "0", "--quiet")
    assert code == 0, err
    assert re.fullmatch(r"accuracy \d+\.\d\d% \(6 images\), loss \d+\.\d+", out.strip()), out

    onnx_file = tmp_path / "pruned.onnx"
    code, out, err = run(capsys, "export", "--model", pruned / "pruned.safetensors", "--out", onnx_file)
    assert code == 0 and onnx_file.is_file(), err
    import onnxruntime
    x = torch.randn(3, 3, 32, 32)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(onnx_out), small(x), atol=1e-4, rtol=1e-4)

    good = sorted((folders["with_test"] / "test").rglob("*.jpg"))[:3]
    corrupt = truncated_jpeg(tmp_path / "broken.jpg")
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not a picture")
    code, out, err = run(capsys, "predict", "--model", pruned / "pruned.safetensors", *good)
    assert code == 0 and not err, err
    code, out, err = run(capsys, "predict", "--model", pruned / "pruned.safetensors", good[0], corrupt, good[1], not_image, good[2])
    assert code == 1, err  # some images could not be read: the exit status says so
    lines = out.strip().splitlines()
    assert len(lines) == 3
    for path, line in zip(good, lines):
        assert re.fullmatch(rf"{re.escape(str(path))}: (cat|dog|fox) \(\d+\.\d%\)", line), line
    problems = err.strip().splitlines()
    assert len(problems) == 3
    assert str(corrupt) in problems[0] and "cannot read" in problems[0]
    assert str(not_image) in problems[1] and "cannot read" in problems[1]
    assert problems[2] == "filterprune: error: 2 of 5 images could not be read"


def test_prune_trains_a_fresh_arch_on_a_kaggle_folder(folders, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "prune", "--data", folders["kaggle"], *TINY, *FAST, *PRUNE, "--out", out)
    assert code == 0, err
    assert "pruned model:" in stdout
    small = fp.load(out / "pruned.safetensors")
    assert small.filterprune_metadata["classes"] == ["cat", "dog"]
    assert small.classifier[-1].out_features == 2
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["width"] == 0.03 and report["baseline"]["params"] < 200_000  # a tiny model, not width 0.5
    assert report["pruned"]["params"] < report["baseline"]["params"]


def test_train_and_eval_on_a_folder_without_test_split(folders, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    code, stdout, err = run(capsys, "train", "--data", folders["no_test"], *TINY, *FAST, "--head-epochs", "0", "--epochs", "1",
                            "--out", out)
    assert code == 0, err
    # 20% of each class's 6 images held out: one per class
    assert re.fullmatch(rf"accuracy \d+\.\d\d% on 3 held-out images; saved {re.escape(str(out))}", stdout.strip()), stdout
    code, stdout, err = run(capsys, "eval", "--data", folders["no_test"], "--model", out, "--workers", "0", "--quiet")
    assert code == 0 and "(3 images)" in stdout, err


def test_python_dash_m_filterprune(folders, trained):
    images = sorted((folders["with_test"] / "test" / "dog").glob("*.jpg"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "filterprune", "predict", "--model", str(trained), *map(str, images)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(images) == 2
    assert all(re.fullmatch(r".*dog\d\.jpg: (cat|dog|fox) \(\d+\.\d%\)", line) for line in lines), lines


@pytest.mark.parametrize("kind", ["json", "toml"])
def test_config_file_values_are_used_and_flags_win(kind, folders, tmp_path, capsys):
    values = {"data": str(folders["no_test"]), "arch": "vgg16_layout", "width": 0.03, "size": 40, "head-epochs": 0, "epochs": 0,
              "workers": 0, "batch-size": 8, "quiet": True, "out": str(tmp_path / "from_config.safetensors")}
    config = tmp_path / f"options.{kind}"
    if kind == "json":
        config.write_text(json.dumps(values))
    else:
        config.write_text("".join(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}\n"
                                  for k, v in values.items()))
    code, _, err = run(capsys, "train", "--config", config)  # --data is required, and comes from the file
    assert code == 0, err
    model = fp.load(tmp_path / "from_config.safetensors")
    assert model.filterprune_metadata["image_size"] == 40 and model.features[0].out_channels == 8

    code, _, err = run(capsys, "train", "--config", config, "--size", "32", "--out", tmp_path / "from_flags.safetensors")
    assert code == 0, err
    assert fp.load(tmp_path / "from_flags.safetensors").filterprune_metadata["image_size"] == 32

    if kind == "json":
        config.write_text(json.dumps({**values, "sizes": 3}))
    else:
        config.write_text(config.read_text() + "sizes = 3\n")
    assert_one_line_error(*run(capsys, "train", "--config", config)[::2], "unknown options", "sizes")
    config.write_text("size = [" if kind == "toml" else "{size: ")
    assert_one_line_error(*run(capsys, "train", "--config", config)[::2], "cannot read config file", str(config))


def test_pretrained_offline_says_to_pass_weights(folders, tmp_path, monkeypatch, capsys):
    import urllib.error

    import torchvision.models._api as api

    tried = []

    def offline(url, *args, **kwargs):
        tried.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    out = tmp_path / "model.safetensors"
    code, _, err = run(capsys, "train", "--data", folders["kaggle"], "--arch", "resnet18", "--pretrained", *FAST, *NO_TRAINING,
                       "--out", out)
    assert_one_line_error(code, err, "--weights FILE", "resnet18")
    assert tried and not out.exists()


# ---------------------------------------------------------------- issue 5: bad input

@pytest.mark.parametrize("case", ["missing", "empty", "only-other-files", "class-without-images", "class-unreadable"])
def test_bad_data_folders_are_one_line_errors(case, tmp_path, capsys):
    data = tmp_path / "data"
    expected = {"missing": "not found", "empty": "is empty", "only-other-files": "no image files",
                "class-without-images": "has no images", "class-unreadable": "no readable images"}[case]
    if case == "empty":
        data.mkdir()
    elif case == "only-other-files":
        (data / "train").mkdir(parents=True)
        (data / "train" / "readme.txt").write_text("hello")
    elif case in ("class-without-images", "class-unreadable"):
        image_folders(data, classes=("cat",), test=False)
        (data / "train" / "dog").mkdir()
        (data / "train" / "dog" / "notes.txt").write_text("no pictures here")
        if case == "class-unreadable":
            truncated_jpeg(data / "train" / "dog" / "dog0.jpg")
            (data / "train" / "dog" / "dog1.jpg").write_bytes(b"")
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"a previous result")
    code, _, err = run(capsys, "train", "--data", data, *TINY, *FAST, *NO_TRAINING, "--out", out)
    line = assert_one_line_error(code, err, expected)
    if case.startswith("class"):
        assert "dog" in line
    assert out.read_bytes() == b"a previous result"


def test_a_few_bad_images_are_skipped_with_a_warning(folders, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(folders["with_test"], data)
    bad = [truncated_jpeg(data / "train" / "cat" / "cut.jpg"), data / "train" / "dog" / "empty.jpg",
           data / "test" / "fox" / "text.png"]
    bad[1].write_bytes(b"")
    bad[2].write_text("not an image")
    for other in (data / "train" / "cat" / "notes.txt", data / "train" / "dog" / ".DS_Store", data / "test" / "fox" / "Thumbs.db"):
        other.write_text("not an image, and not named like one")
    code, stdout, err = run(capsys, "train", "--data", data, *TINY, *FAST, *NO_TRAINING, "--out", tmp_path / "m.safetensors")
    assert code == 0, err
    assert "on 6 held-out images" in stdout  # the test folder's 6 good images
    warnings = [line for line in err.strip().splitlines() if line.startswith("filterprune: warning:")]
    assert len(warnings) == 1 and "skipped 3 unreadable image file(s)" in warnings[0], err
    assert all(str(p) in warnings[0] for p in bad)
    assert "notes.txt" not in err and "DS_Store" not in err


def test_grayscale_rgba_and_16_bit_images_work(tmp_path, capsys):
    data = tmp_path / "data"
    for c in ("cat", "dog"):
        for i in range(3):
            rgb = picture(c, i)
            write(data / "train" / c / f"gray{i}.jpg", Image.fromarray(rgb).convert("L"))
            rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
            rgba[:8, :8, 3] = 0  # a transparent corner
            write(data / "train" / c / f"rgba{i}.png", rgba)
            wide = (np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint16) * 257)
            write(data / "train" / c / f"deep{i}.png", Image.fromarray(wide))
    assert Image.open(data / "train" / "cat" / "deep0.png").mode.startswith("I")
    assert Image.open(data / "train" / "cat" / "rgba0.png").mode == "RGBA"
    out = tmp_path / "m.safetensors"
    code, stdout, err = run(capsys, "train", "--data", data, *TINY, *FAST, "--head-epochs", "0", "--epochs", "1", "--out", out)
    assert code == 0 and "warning" not in err, err
    assert "on 4 held-out images" in stdout  # round(0.2 * 9) = 2 per class, none skipped
    images = [data / "train" / "dog" / name for name in ("gray0.jpg", "rgba0.png", "deep0.png")]
    code, stdout, err = run(capsys, "predict", "--model", out, *images)
    assert code == 0 and not err, err
    assert len(stdout.strip().splitlines()) == 3


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.conv(x).relu()
        if x.mean() > 0:
            x = self.conv2(x)
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_library_raises_graph_error():
    with pytest.raises(fp.GraphError, match="control flow") as caught:
        fp.Pruner(Branchy(), torch.randn(1, 3, 16, 16))
    assert "move it into a submodule" in str(caught.value)


def test_untraceable_model_cli_fails_before_training(folders, tmp_path, monkeypatch, capsys):
    def build(arch, num_classes=None, **kwargs):
        model = Branchy(num_classes)
        model.filterprune_arch = {"builder": "filterprune.models:build", "kwargs": {}}
        return model

    monkeypatch.setattr(models, "build", build)
    trained_calls = calls(monkeypatch, cli, "fine_tune")
    code, _, err = run(capsys, "prune", "--data", folders["kaggle"], "--arch", "vgg16_layout", *FAST, *PRUNE[:-3], "--out", tmp_path / "run")
    assert_one_line_error(code, err, "could not trace Branchy", "control flow")
    assert trained_calls == []
    assert not (tmp_path / "run" / "pruned.safetensors").exists()


@pytest.mark.parametrize("source", ["--model", "--arch"])
def test_unreachable_target_fails_before_any_training(source, folders, trained, pruned, tmp_path, monkeypatch, capsys):
    from filterprune import schedule

    out = tmp_path / "run"
    shutil.copytree(pruned, out)  # a previous run's results, which must survive
    before = snapshot(out), snapshot(out / "checkpoint")
    used = calls(monkeypatch, cli, "fine_tune") + calls(monkeypatch, schedule, "fine_tune")
    used_eval = calls(monkeypatch, schedule, "evaluate")
    if source == "--model":
        argv = ["--data", folders["with_test"], "--model", trained, "--target-macs", "100"]
        want = r"MACs can be reduced at most \d+\.\dx with at least 1 channels per layer; ask for less"
    else:
        argv = ["--data", folders["kaggle"], *TINY, "--target-size", "1000", "--min-channels", "2"]
        want = r"size on disk can be reduced at most \d+\.\dx with at least 2 channels per layer; ask for less"
    code, _, err = run(capsys, "prune", *argv, *FAST, *PRUNE, "--out", out)
    line = assert_one_line_error(code, err)
    assert re.search(want, line), line
    assert used == [] and used_eval == []
    assert (snapshot(out), snapshot(out / "checkpoint")) == before


def test_unknown_ignored_module_is_one_line(folders, trained, tmp_path, capsys):
    code, _, err = run(capsys, "prune", "--data", folders["with_test"], "--model", trained, *FAST, *PRUNE[:-3],
                       "--ignore", "classifier.9", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "no module named 'classifier.9'", "features.0")


def test_check_reachable_allows_what_can_be_reached(trained):
    from filterprune.schedule import Schedule, check_reachable

    model, x = fp.load(trained), torch.randn(1, 3, 32, 32)
    best = check_reachable(model, x, Schedule(target_macs=1.0, target_size=1.0))
    assert best["macs"] > 1.5 and best["size"] > 1.5
    check_reachable(model, x, Schedule(target_macs=0.99 * best["macs"], target_size=0.99 * best["size"]))
    with pytest.raises(ValueError, match="MACs can be reduced at most"):
        check_reachable(model, x, Schedule(target_macs=1.01 * best["macs"]))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in fp.load(trained).parameters())  # untouched


@pytest.mark.parametrize("weights", ["other-width", "missing"])
def test_weights_that_do_not_fit_the_architecture(weights, folders, tmp_path, capsys):
    path = tmp_path / "weights.safetensors"
    if weights == "other-width":
        safetensors.torch.save_file(models.build("vgg16_layout", num_classes=2, width=0.06).state_dict(), str(path))
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"a previous result")
    code, _, err = run(capsys, "train", "--data", folders["kaggle"], *TINY, "--weights", path, *FAST, *NO_TRAINING, "--out", out)
    assert_one_line_error(code, err, *(["does not fit vgg16_layout"] if weights == "other-width" else [str(path)]))
    assert out.read_bytes() == b"a previous result"


def test_full_disk_while_writing_the_report_keeps_the_previous_results(folders, trained, pruned, tmp_path, monkeypatch, capsys):
    from filterprune import report

    out = tmp_path / "run"
    shutil.copytree(pruned, out)
    before = snapshot(out)
    assert {"pruned.safetensors", "report.json", "report.md"} <= before.keys()
    real = report.atomic_path

    @contextlib.contextmanager
    def full(path):  # the disk fills up half-way through the first file of the report
        with real(path) as tmp:
            tmp.write_bytes(b"\x89PNG half a fi")
            raise OSError(errno.ENOSPC, "No space left on device")
            yield tmp

    monkeypatch.setattr(report, "atomic_path", full)
    # another seed and step than the previous run: the new results would differ from the old
    code, _, err = run(capsys, "prune", "--data", folders["with_test"], "--model", trained, *FAST, *PRUNE, "--seed", "1",
                       "--step", "0.3", "--out", out)
    assert_one_line_error(code, err, "No space left on device", "free some disk space")
    assert snapshot(out) == before  # pruned.safetensors, report.json, report.md and the plots as they were
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary files left


def test_output_that_cannot_be_written_is_one_line(folders, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    code, _, err = run(capsys, "train", "--data", folders["kaggle"], *TINY, *FAST, *NO_TRAINING,
                       "--out", blocker / "model.safetensors")
    assert_one_line_error(code, err, str(blocker))


@pytest.mark.parametrize("command", ["eval", "export", "predict"])
def test_missing_or_damaged_model_file(command, folders, trained, tmp_path, capsys):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(trained.read_bytes()[:1000])
    extra = {"eval": ["--data", folders["with_test"], "--workers", "0"], "export": ["--out", tmp_path / "m.onnx"],
             "predict": [sorted((folders["with_test"] / "test").rglob("*.jpg"))[0]]}[command]
    for model, words in ((tmp_path / "nothing.safetensors", ["no such model file", "nothing.safetensors"]),
                         (damaged, ["not a readable filterprune model file", "damaged"])):
        code, _, err = run(capsys, command, "--model", model, *extra)
        assert_one_line_error(code, err, *words)
    assert not (tmp_path / "m.onnx").exists()


def test_eval_on_data_with_other_classes(folders, trained, capsys):
    code, _, err = run(capsys, "eval", "--data", folders["kaggle"], "--model", trained, "--workers", "0", "--quiet")
    assert_one_line_error(code, err, "trained on classes", "cat")


# ---------------------------------------------------------------- issue 11: gaps; issue 9: any model; issue 8: VGG16

def test_size_too_small_for_vgg_is_one_line(folders, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", folders["with_test"], *TINY, *FAST, *NO_TRAINING, "--size", "16",
                       "--out", tmp_path / "m.safetensors")
    assert_one_line_error(code, err, "16x16", "--size", "32")
    assert not (tmp_path / "m.safetensors").exists()


def test_internal_bugs_show_a_traceback(monkeypatch, trained):
    """Only the project's own error types are one-line errors; a bug (here a ValueError) must show itself."""
    def broken(args):
        raise ValueError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "export", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["export", "--model", str(trained), "--out", "x.onnx"])


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """A torchvision resnet18 pruned with the library and saved: no filterprune builder recorded."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=3).eval()
    fp.Pruner(model, torch.randn(1, 3, 32, 32), criterion="l1", ignore=[model.fc]).prune(300)
    path = tmp_path_factory.mktemp("tv") / "r18.safetensors"
    fp.save(model, path, metadata={"classes": ["cat", "dog", "fox"], "image_size": 32})
    return path


def test_saved_torchvision_model_works_in_every_command(folders, torchvision_file, tmp_path, capsys):
    code, out, err = run(capsys, "eval", "--data", folders["with_test"], "--model", torchvision_file, "--workers", "0", "--quiet")
    assert code == 0 and out.startswith("accuracy "), err
    code, out, err = run(capsys, "profile", "--model", torchvision_file, "--batch-sizes", "1")
    assert code == 0 and "MACs" in out, err
    code, out, err = run(capsys, "profile", "--model", torchvision_file, "--runtime", "cuda-graph", "--device", "cpu")
    assert code != 0 and "--device cuda" in err and len(err.strip().splitlines()) == 1, err
    code, out, err = run(capsys, "export", "--model", torchvision_file, "--out", tmp_path / "r18.onnx")
    assert code == 0 and (tmp_path / "r18.onnx").is_file(), err
    image = sorted((folders["with_test"] / "test").rglob("*.jpg"))[0]
    code, out, err = run(capsys, "predict", "--model", torchvision_file, image)
    assert code == 0 and re.fullmatch(rf"{re.escape(str(image))}: (cat|dog|fox) \(\d+\.\d%\)", out.strip()), err


def test_saved_user_class_says_to_load_it_in_python(tmp_path, capsys):
    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).mean((2, 3))

    fp.save(Mine(), tmp_path / "mine.safetensors")
    code, _, err = run(capsys, "profile", "--model", tmp_path / "mine.safetensors")
    assert_one_line_error(code, err, "pass model=YourNet() to load")


def test_module_prunes_only_that_submodule(folders, trained, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, "prune", "--data", folders["with_test"], "--model", trained, *FAST, *NO_TRAINING,
                       "--epochs-between", "0", "--iterations", "1", "--step", "0.3", "--module", "features.0",
                       "--prune-linear", "--out", out)
    assert code == 0, err
    before, after = fp.load(trained), fp.load(out / "pruned.safetensors")
    assert after.features[0].out_channels < before.features[0].out_channels
    convs = lambda m: [c.out_channels for c in m.features if isinstance(c, nn.Conv2d)][1:]  # noqa: E731
    assert convs(after) == convs(before)  # nothing outside features.0 lost a channel
    assert [m.out_features for m in after.classifier if isinstance(m, nn.Linear)] == \
        [m.out_features for m in before.classifier if isinstance(m, nn.Linear)]
    code, stdout, err = run(capsys, "profile", "--model", trained, "--module", "features", "--batch-sizes", "1")
    assert code == 0 and stdout.startswith("module features:"), err
    code, _, err = run(capsys, "profile", "--model", trained, "--module", "backbone")
    assert_one_line_error(code, err, "no submodule 'backbone'")


def test_vgg16_blog_recipe_prunes_conv_filters_only_and_cuts_macs_3x(folders, tmp_path, capsys):
    """The blog's recipe on torchvision's VGG16 at 224: 5 x 512 conv filters, the classifier's hidden units kept."""
    out = tmp_path / "vgg16"
    code, _, err = run(capsys, "prune", "--data", folders["with_test"], "--arch", "vgg16", "--size", "224", "--workers", "0",
                       "--batch-size", "4", "--quiet", *NO_TRAINING, "--epochs-between", "0", "--rank-batches", "1", "--out", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert len(report["iterations"]) == 5
    assert report["baseline"]["macs"] / report["pruned"]["macs"] >= 3
    small = fp.load(out / "pruned.safetensors")
    assert [m.out_features for m in small.classifier if isinstance(m, nn.Linear)] == [4096, 4096, 3]


def test_distillation_and_speed_flags_reach_the_schedule():
    from filterprune.cli_args import parse
    from filterprune.schedule import Schedule

    args = parse(["prune", "--data", "d", "--distill", "0.7", "--temperature", "2", "--amp", "--channels-last"])
    schedule = cli._schedule(args)
    assert (schedule.distill, schedule.temperature, schedule.amp, schedule.channels_last) == (0.7, 2.0, True, True)
    assert cli._schedule(parse(["prune", "--data", "d"])).distill == Schedule().distill  # off unless asked
    schedule = cli._schedule(parse(["prune", "--data", "d", "--round-to", "8", "--normalize", "l2", "--latency-batch", "64",
                                    "--macs-step", "1.5"]))
    assert (schedule.round_to, schedule.normalize, schedule.latency_batch, schedule.macs_step) == (8, "l2", 64, 1.5)
    assert cli._schedule(parse(["prune", "--data", "d"])).round_to == "auto"
    assert cli._schedule(parse(["prune", "--data", "d"])).latency_batch is None  # 64 on a GPU, 1 on the CPU
    train = parse(["train", "--data", "d", "--amp", "--channels-last"])  # training from scratch uses them too
    assert (train.amp, train.channels_last) == (True, True)


def test_vgg_classifier_is_ignored_unless_prune_linear():
    from filterprune.cli_args import parse

    model = fp.vgg16_layout(num_classes=2, width=0.03)
    args = parse(["prune", "--data", "d", "--ignore", "features.0"])
    assert cli._ignored(model, args) == ["classifier.0", "classifier.3", "classifier.6", "features.0"]
    args = parse(["prune", "--data", "d", "--prune-linear"])
    assert cli._ignored(model, args) == []
    assert cli._ignored(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), parse(["prune", "--data", "d"])) == []


# ---------------------------------------------------------------- issue 19: flags from Schedule, planned runs, validation

def test_prune_flags_come_from_the_schedule_fields():
    from dataclasses import fields

    from filterprune.cli_args import parse
    from filterprune.schedule import Schedule

    assert cli._schedule(parse(["prune", "--data", "d"])) == Schedule()  # every default is Schedule's (--step 0.12, --lr 1e-3)
    given = parse(["prune", "--data", "d", "--weight-decay", "5e-4", "--epochs-between", "3", "--iterations", "7", "--max-drop", "0.5",
                   "--min-channels", "4", "--step", "16"])
    schedule = cli._schedule(given)
    assert (schedule.weight_decay, schedule.epochs, schedule.max_iterations, schedule.max_accuracy_drop, schedule.min_channels,
            schedule.step) == (5e-4, 3, 7, 0.5, 4, 16)
    helped = {f.name for f in fields(Schedule) if "help" in f.metadata}
    assert helped == {f.name for f in fields(Schedule)} - {"metric", "seed"}  # those two: library only, and the common --seed


def test_the_parser_imports_no_command_handlers():
    code = "import sys, filterprune.cli_args as a; a.build_parser(); assert 'filterprune.cli' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_target_without_recipe_flags_plans_the_run():
    from filterprune.cli_args import duration, parse

    assert cli._planned(parse(["prune", "--data", "d", "--target-speedup", "3", "--max-drop", "1"]))
    assert not cli._planned(parse(["prune", "--data", "d", "--target-speedup", "3", "--epochs-between", "2"]))  # a fixed recipe
    assert not cli._planned(parse(["prune", "--data", "d"]))
    assert (duration("20m"), duration("1.5h"), duration("90s"), duration("300")) == (1200, 5400, 90, 300)


def test_budget_needs_a_planned_run(folders, capsys):
    code, _, err = run(capsys, "prune", "--data", folders["with_test"], *TINY, "--budget", "5m", "--step", "0.2")
    assert_one_line_error(code, err, "--budget is for a planned run")
    with pytest.raises(SystemExit) as exit:  # argparse's own error
        run(capsys, "prune", "--data", folders["with_test"], *TINY, "--budget", "soon")
    assert exit.value.code == 2 and "must be a duration like 20m" in capsys.readouterr().err


def test_a_planned_run_refuses_resume(folders, tmp_path, capsys):
    code, _, err = run(capsys, "prune", "--data", folders["with_test"], *TINY, "--target-speedup", "2", "--resume",
                       "--out", tmp_path / "run")
    assert_one_line_error(code, err, "drop --resume and torchrun")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_planned_prune_chooses_on_validation_images_only(folders, trained, tmp_path, capsys, monkeypatch):
    """A target and no recipe: the loop plans; every evaluation inside it is on validation images carved
    from the training folder, the test images give only the report's headline, with the control."""
    from filterprune import auto

    seen, real = [], auto.evaluate

    def spy(model, loader, *args, **kwargs):
        seen.extend(str(path) for path, _ in loader.dataset.samples)
        return real(model, loader, *args, **kwargs)

    monkeypatch.setattr(auto, "evaluate", spy)
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "prune", "--data", folders["with_test"], "--model", trained, *FAST, "--target-macs", "1.3",
                            "--max-drop", "100", "--max-epochs", "1", "--final-max-epochs", "1", "--patience", "1",
                            "--trial-epochs", "1", "--val-fraction", "0.2", "--ignore", "classifier.0", "classifier.3", "--out", out)
    assert code == 0, err
    assert seen and all(f"{os.sep}train{os.sep}" in p for p in seen)  # never a test image
    report = json.loads((out / "report.json").read_text())
    assert report["task"]["val_images"] == 3 and report["loop"]["evaluated_on"] == "3 validation images"
    assert report["baseline"]["macs"] / report["pruned"]["macs"] >= 1.3 and "MACs reduction" in report["stopped"]
    assert report["control"]["extra_epochs"] == sum(it["epochs"] for it in report["iterations"] if not it.get("rejected")) + 1
    assert all("curve" in it and "why" in it for it in report["iterations"])
    # The pruned network and the control are timed in turns with the unpruned one, as every step is.
    assert [r["batch"] for r in report["pruned"]["speedup"]] == [r["batch"] for r in report["control"]["speedup"]] == [1]
    md = (out / "report.md").read_text()
    assert "## Plan" in md and (out / "validation_curves.png").is_file()
    assert "speed-ups: the median of each round's ratio to the baseline" in md
    # The recovery tools were chosen by trials of the first step; the head, --ignore'd by the user, is never pruned.
    recovery = report["plan"]["recovery"]
    assert [t["tool"] for t in recovery["trials"]] == ["defaults", "normalize", "distill"]
    assert recovery["left_out"][0]["tool"] == "head" and recovery["used"]["head"] == "kept"
    assert "Recovery tools used: **normalize" in md
