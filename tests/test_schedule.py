"""Issue 5: a pruning run is resumable and safe.

A run killed (SIGKILL, in a subprocess) during fine-tuning or in the middle of writing a
checkpoint resumes with --resume from the last finished iteration and ends with exactly the model
of an uninterrupted run; damaged checkpoints are reported, never used; loading never runs code
stored in a file.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from torch import nn

import filterprune as fp
from filterprune.cli import main
from filterprune.checkpoint import CheckpointError
from filterprune.checkpoint import load as load_checkpoint
from filterprune.schedule import Schedule, prune_iteratively
from images import COLOURS, one_thread, picture  # noqa: F401  (one_thread: an autouse fixture)

# 18 training images in batches of 8: three fine-tuning steps per epoch
ARGS = ["--size", "32", "--workers", "0", "--batch-size", "8", "--lr", "0.01", "--quiet", "--epochs-between", "1",
        "--iterations", "3", "--step", "0.1", "--seed", "3", "--ignore", "classifier.0", "classifier.3"]

# Runs the CLI and SIGKILLs itself at a chosen moment: during fine-tuning of iteration N (after one
# step), or half-way through writing iteration N's checkpoint model file or state file.
KILLER = r'''
import json, os, signal, sys
import torch
torch.set_num_threads(1)
import filterprune.train
from filterprune.cli import main

mode, when, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "fine-tune":
    real_epoch = filterprune.train.train_epoch
    def train_epoch(model, loader, *args, desc="", **kwargs):
        if desc.startswith(f"iteration {when} "):
            def batches():
                for i, batch in enumerate(loader):
                    if i == 1:  # one optimizer step of this iteration's fine-tuning done
                        die()
                    yield batch
            return real_epoch(model, batches(), *args, desc=desc, **kwargs)
        return real_epoch(model, loader, *args, desc=desc, **kwargs)
    filterprune.train.train_epoch = train_epoch
else:  # die half-way through the atomic write of iteration N's model file or state file
    from pathlib import Path
    real_replace = os.replace
    target = f"model-{when:03d}.safetensors" if mode == "model-write" else "state.json"
    def replace(src, dst):
        src = Path(src)
        if Path(dst).name == target and (mode == "model-write" or json.loads(src.read_text())["iteration"] == when):
            data = src.read_bytes()
            src.write_bytes(data[: len(data) // 2])
            die()
        return real_replace(src, dst)
    os.replace = replace
sys.exit(main(argv))
'''




@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 3-class image folder, a tiny untrained model file, and an uninterrupted run's output."""
    root = tmp_path_factory.mktemp("resume")
    for c in COLOURS:
        for split, n in (("train", 6), ("test", 2)):
            for i in range(n):
                path = root / "data" / split / c / f"{c}{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(picture(c, i + 100 * (split == "test"))).save(path)
    torch.manual_seed(0)
    fp.save(fp.build("vgg16_layout", num_classes=3, width=0.03), root / "model.safetensors",
            metadata={"classes": list(COLOURS), "image_size": 32})
    argv = ["prune", "--data", str(root / "data"), "--model", str(root / "model.safetensors"), *ARGS]
    assert main([*argv, "--out", str(root / "reference")]) == 0
    return root, argv


def kill_run(argv: list[str], mode: str, when: int, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), mode, str(when), *argv], capture_output=True, text=True,
                          timeout=300, env=env)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def one_line_error(code: int, err: str, *words: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("filterprune: error: "), err
    assert all(w in lines[0] for w in words), (words, lines[0])
    return lines[0]


# ---------------------------------------------------------------- killed and resumed

@pytest.mark.parametrize("mode, when", [("fine-tune", 1), ("model-write", 2), ("state-write", 2)])
def test_killed_run_resumes_to_the_same_model(mode, when, setup, tmp_path, capsys):
    root, argv = setup
    out = tmp_path / "run"
    killed = kill_run([*argv, "--out", str(out)], mode, when, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "pruned.safetensors").exists()

    checkpoint = out / "checkpoint"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["iteration"] == when - 1  # the last finished iteration (0: the unpruned model)
    assert (checkpoint / state["model"]).is_file()
    leftovers = sorted(p.name for p in checkpoint.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")
    if mode == "model-write":  # the half-written model is there, under a temporary name only
        assert len(leftovers) == 1 and leftovers[0].startswith(f".model-{when:03d}.safetensors")
        assert not (checkpoint / f"model-{when:03d}.safetensors").exists()
    elif mode == "state-write":  # the half-written state is there, under a temporary name only
        assert len(leftovers) == 1 and leftovers[0].startswith(".state.json.")
        with pytest.raises(json.JSONDecodeError):
            json.loads((checkpoint / leftovers[0]).read_text())
    else:
        assert leftovers == []

    capsys.readouterr()
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert f"resumed from {checkpoint} after iteration {when - 1}" in capsys.readouterr().out

    reference, resumed = tensors(root / "reference" / "pruned.safetensors"), tensors(out / "pruned.safetensors")
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert reference[name].shape == resumed[name].shape, name
        torch.testing.assert_close(resumed[name], reference[name], atol=1e-6, rtol=0, msg=name)
    ref_log, log = (json.loads((d / "report.json").read_text()) for d in (root / "reference", out))
    assert [it["channels"] for it in log["iterations"]] == [it["channels"] for it in ref_log["iterations"]]
    assert log["pruned"]["accuracy"] == ref_log["pruned"]["accuracy"]
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model-003.safetensors", "state.json"]  # temporaries gone


def test_resume_reports_the_iteration_and_continues_the_log(setup, tmp_path, capsys):
    """Resuming a finished run (the last checkpoint is iteration 3) does no more iterations."""
    root, argv = setup
    out = tmp_path / "run"
    shutil.copytree(root / "reference" / "checkpoint", out / "checkpoint")
    capsys.readouterr()
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    log = json.loads((out / "report.json").read_text())
    assert [it["iteration"] for it in log["iterations"]] == [1, 2, 3]
    assert log["stopped"] == "3 iterations done"


# ---------------------------------------------------------------- damaged checkpoints

def damage(checkpoint: Path, how: str) -> None:
    state_file = checkpoint / "state.json"
    model_file = checkpoint / json.loads(state_file.read_text())["model"]
    data = bytearray(model_file.read_bytes())
    if how == "truncated-model":
        model_file.write_bytes(data[: len(data) // 2])
    elif how == "flipped-byte":
        data[len(data) - 100] ^= 0x01  # in the tensor data: still a well-formed safetensors file
        model_file.write_bytes(bytes(data))
    elif how == "missing-model":
        model_file.unlink()
    elif how == "truncated-state":
        state_file.write_text(state_file.read_text()[:200])
    elif how == "state-not-a-mapping":
        state_file.write_text("[1, 2, 3]")
    elif how == "state-without-model":
        state = json.loads(state_file.read_text())
        del state["model"]
        state_file.write_text(json.dumps(state))
    elif how == "no-checkpoint":
        shutil.rmtree(checkpoint)


DAMAGE = ["truncated-model", "flipped-byte", "missing-model", "truncated-state", "state-not-a-mapping", "state-without-model"]


@pytest.mark.parametrize("how", [*DAMAGE, "no-checkpoint"])
def test_damaged_checkpoint_is_detected(how, setup, tmp_path, monkeypatch):
    root, _ = setup
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(root / "reference" / "checkpoint", checkpoint)
    assert load_checkpoint(checkpoint)[2] == 3  # undamaged, it loads
    damage(checkpoint, how)
    loaded = []
    monkeypatch.setattr(fp.io, "load", lambda *a, **k: loaded.append(a) or pytest.fail("a damaged file was loaded"))
    with pytest.raises(CheckpointError, match="no checkpoint" if how == "no-checkpoint" else "damaged"):
        load_checkpoint(checkpoint)
    assert loaded == []


@pytest.mark.parametrize("how", ["flipped-byte", "truncated-state"])
def test_cli_resume_from_a_damaged_checkpoint_is_one_line(how, setup, tmp_path, capsys):
    root, argv = setup
    out = tmp_path / "run"
    shutil.copytree(root / "reference", out)
    damage(out / "checkpoint", how)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    code = main([*argv, "--out", str(out), "--resume"])
    one_line_error(code, capsys.readouterr().err, "damaged", "delete it to start over")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_resume_with_other_options_is_refused(setup, tmp_path, capsys):
    root, argv = setup
    out = tmp_path / "run"
    shutil.copytree(root / "reference" / "checkpoint", out / "checkpoint")
    capsys.readouterr()
    other = list(argv)
    other[other.index("--seed") + 1] = "4"
    code = main([*other, "--out", str(out), "--resume"])
    one_line_error(code, capsys.readouterr().err, "other options", "seed 3 -> 4")
    code = main([*argv, "--out", str(tmp_path / "elsewhere"), "--resume"])
    one_line_error(code, capsys.readouterr().err, "no checkpoint", "start without --resume")


def test_checkpoints_are_written_atomically(setup, tmp_path, monkeypatch):
    """A failure while writing the checkpoint's model leaves the previous pair (model, state) intact."""
    from filterprune import checkpoint

    root, _ = setup
    model = fp.load(root / "model.safetensors")
    folder = tmp_path / "checkpoint"
    checkpoint.save(folder, model, {"n": 1}, 1)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    real = Path.write_bytes

    def full(self, data):  # the disk fills up part-way through the model file
        real(self, data[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError):
        checkpoint.save(folder, model, {"n": 2}, 2)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    _, log, iteration = load_checkpoint(folder)
    assert (log, iteration) == ({"n": 1}, 1)


# ---------------------------------------------------------------- targets checked up front

class Unusable:
    """A loader that must not be used."""

    def __iter__(self):
        raise AssertionError("the data was used before the target was checked")


def test_unreachable_target_is_refused_before_any_work(setup):
    root, _ = setup
    model = fp.load(root / "model.safetensors")
    with pytest.raises(ValueError, match=r"MACs can be reduced at most \d+\.\dx with at least 4 channels per layer; ask for less"):
        prune_iteratively(model, torch.randn(1, 3, 32, 32), Unusable(), Unusable(), Schedule(target_macs=100, min_channels=4),
                          progress=False)
    with pytest.raises(ValueError, match=r"size on disk can be reduced at most"):
        prune_iteratively(model, torch.randn(1, 3, 32, 32), Unusable(), Unusable(), Schedule(target_size=1000), progress=False)


# ---------------------------------------------------------------- no code runs from a file

class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code from the file ran')",)


def test_pickles_with_code_are_refused_and_never_run(setup, tmp_path, capsys):
    root, _ = setup
    marker = tmp_path / "marker"
    state = fp.build("vgg16_layout", num_classes=3, width=0.03).state_dict()
    zipped = tmp_path / "weights.pth"
    torch.save({**state, "features.0.weight": Payload(marker)}, zipped)
    plain = tmp_path / "model.pkl"
    plain.write_bytes(pickle.dumps({"model": Payload(marker)}))
    disguised = tmp_path / "model.safetensors"
    shutil.copy(zipped, disguised)

    for path in (zipped, plain, disguised):
        with pytest.raises(ValueError, match="convert it in a trusted environment"):
            fp.load(path)
    for path in (zipped, plain):
        with pytest.raises(ValueError, match="convert it in a trusted environment"):
            fp.load_state_dict_file(path)
    data = root / "data"
    for argv in (["train", "--data", data, "--arch", "vgg16_layout", "--width", "0.03", "--weights", zipped],
                 ["train", "--data", data, "--arch", "vgg16_layout", "--width", "0.03", "--weights", plain],
                 ["eval", "--data", data, "--model", zipped], ["predict", "--model", disguised, data / "test/cat/cat0.jpg"],
                 ["prune", "--data", data, "--model", plain]):
        code = main([*map(str, argv), "--workers", "0"] if argv[0] != "predict" else list(map(str, argv)))
        one_line_error(code, capsys.readouterr().err, "convert it")
    assert not marker.exists()

    pickle.loads(plain.read_bytes())  # the payload is live: unpickling it does run the code
    assert marker.read_text() == "code from the file ran"


def test_latency_aware_cost_follows_the_measured_time():
    """A layer made slow (a hook sleeping per channel it outputs) gets the highest cost per unit, though its
    MACs are the lowest; the total stays the MACs total and each group's units share one figure."""
    from filterprune.schedule import measured_unit_cost

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 2)).eval()
    slow = 4  # the ReLU after the 1x1 conv, the cheapest group in MACs
    model[slow].register_forward_hook(lambda m, i, out: time.sleep(2e-3 * out.shape[1]))
    pruner = fp.Pruner(model, torch.randn(1, 3, 8, 8), criterion="l1")
    cost = measured_unit_cost(pruner, batch=2)
    macs = pruner.graph.unit_cost() / 1e6
    assert torch.isclose(cost.sum(), macs.sum())
    per_group = {}
    for group in pruner.groups:  # one measured figure per group, shared by its units
        part = cost[group.offset:group.offset + group.size]
        assert torch.allclose(part, part[0].expand_as(part))
        per_group[group.name] = part[0].item()
    slowed = "4"  # groups are named by their conv
    assert min(macs[g.offset].item() for g in pruner.groups) == macs[pruner.groups[-1].offset].item()
    assert per_group[slowed] > 3 * max(v for k, v in per_group.items() if k != slowed), per_group


def test_flops_regularisation_moves_pruning_to_costly_channels():
    """With lambda large, the MACs cost dominates: the first block's channels (32x32 maps) go first."""
    torch.manual_seed(0)
    model = fp.vgg16_layout(num_classes=2, width=0.125)
    plain = fp.Pruner(model, torch.randn(1, 3, 32, 32), criterion="l1", ignore=[model.classifier[0], model.classifier[3]])
    removed_plain = plain.prune(20).removed_per_group
    model = fp.vgg16_layout(num_classes=2, width=0.125)
    costly = fp.Pruner(model, torch.randn(1, 3, 32, 32), criterion="l1", flops_lambda=10.0,
                       ignore=[model.classifier[0], model.classifier[3]])
    removed_costly = costly.prune(20).removed_per_group
    first_block = ("features.0", "features.3")
    assert sum(removed_costly.get(g, 0) for g in first_block) > sum(removed_plain.get(g, 0) for g in first_block)
