"""Checkpoints of an iterative pruning run: the model after an iteration and the log that names it.

A folder holds one pair: model-<iteration>.safetensors and state.json (iteration, model file name,
its SHA-256, the run log). Both are written atomically, the model first, so a crash at any moment
leaves the previous pair intact; a damaged pair is reported, never loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import nn

from . import io
from .utils import atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or from a different run."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(folder: str | Path, model: nn.Module, log: dict, iteration: int) -> None:
    """Model first, then the state that names it: a crash between the two leaves the old pair intact."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_file = folder / f"model-{iteration:03d}.safetensors"
    io.save(model, model_file)
    state = {"iteration": iteration, "model": model_file.name, "sha256": sha256(model_file), "log": log}
    atomic_write(folder / "state.json", json.dumps(state, indent=2))
    for old in folder.glob("model-*.safetensors"):
        if old != model_file:
            old.unlink()
    for stale in [*folder.glob(".model-*"), *folder.glob(".state.json.*")]:  # temporaries of a write that was killed
        stale.unlink(missing_ok=True)


def load(folder: str | Path) -> tuple[nn.Module, dict, int]:
    """The last finished iteration's model, log and number; damage is reported, never used."""
    folder = Path(folder)
    state_file = folder / "state.json"
    if not state_file.exists():
        raise CheckpointError(f"no checkpoint in {folder}: start without --resume")
    try:
        state = json.loads(state_file.read_text())
        model_file = folder / state["model"]
        if sha256(model_file) != state["sha256"]:
            raise CheckpointError(f"checkpoint {model_file} does not match its recorded checksum: it is damaged; "
                                  f"delete it to start over (without --resume)")
        return io.load(model_file), state["log"], state["iteration"]
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise CheckpointError(f"checkpoint in {folder} is damaged ({err}); delete it to start over") from err


def save_teacher(folder: str | Path, model: nn.Module) -> None:
    """The unpruned model that distillation learns from, with its checksum (written once, before iteration 1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = io.save(model, folder / "teacher.safetensors")
    atomic_write(folder / "teacher.sha256", sha256(path))


def load_teacher(folder: str | Path) -> nn.Module:
    """The teacher saved by save_teacher; CheckpointError if it is missing or damaged."""
    path = Path(folder) / "teacher.safetensors"
    try:
        if sha256(path) != (path.parent / "teacher.sha256").read_text().strip():
            raise CheckpointError(f"{path} does not match its recorded checksum: it is damaged; delete the checkpoint "
                                  "to start over (without --resume)")
        return io.load(path)
    except (ValueError, OSError) as err:
        raise CheckpointError(f"the teacher of distillation in {folder} is missing or damaged ({err}); delete the "
                              "checkpoint to start over") from err


def check_same_run(folder: str | Path, saved: dict, now: dict, keys: tuple[str, ...]) -> None:
    """CheckpointError if the options `keys` of the run being resumed (`now`) differ from the saved ones."""
    changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in keys if saved.get(k) != now[k]]
    if changed:
        raise CheckpointError(f"the checkpoint in {folder} was made with other options ({', '.join(changed)}): resume with "
                              "the same options, or start without --resume (or with another output folder)")
