"""Small helpers every module needs once: an atomic file write, a mode-preserving eval switch,
a snapshot of a model's state, which indices of a slot a removal drops, and a model's tensors as
safetensors stores them (for io.save and measure's size on disk, without measure importing io)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    A crash or a full disk never leaves a half-written file under `path`, and an older file
    there stays as it was. An OSError says which file could not be written and what to do.
    """
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as err:
        raise OSError(err.errno, f"could not write {path} ({err.strerror or err}): check that the folder exists "
                      "and is writable, or choose another output folder") from err
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; what we write are ordinary files
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(err.errno, f"could not write {path} ({err.strerror or err}): free some disk space or choose "
                      f"another output folder; files already in {path.parent} were left as they were") from err
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` atomically (see atomic_path)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@contextlib.contextmanager
def _in_mode(model: nn.Module, train: bool) -> Iterator[nn.Module]:
    modes = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def evaluating(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Put every module of `model` in eval mode; afterwards give each its own mode back.

    model.train(was_training) would not do: a user who froze some BatchNorms in eval mode
    inside a training model would find them switched back to training.
    """
    return _in_mode(model, False)


def training(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Like `evaluating`, in train mode."""
    return _in_mode(model, True)


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Give back every buffer's values (BatchNorm statistics and counters) after the block.

    For code that must run a model without changing it, when a module may update its statistics
    even in eval mode (timm's norm layers traced in train mode, for instance).
    """
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in saved and b.shape == saved[name].shape:
                    b.copy_(saved[name])


def dropped_indices(owner: torch.Tensor, remove: torch.Tensor) -> torch.Tensor:
    """Bool mask over a slot's indices: True where the unit owning that index is in `remove`.

    owner: unit index per position of the slot, -1 where the position is pinned (never removed).
    remove: bool mask over all units of the graph.
    """
    owned = owner >= 0
    dropped = torch.zeros_like(owned)
    dropped[owned] = remove[owner[owned]]
    return dropped


def state_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict as safetensors can store it, and {dropped name: kept name} for shared tensors."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in model.state_dict().items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:  # the same tensor under two names (tied weights)
            aliases[name] = seen[key]
            continue
        seen[key] = name
        # safetensors refuses tensors that share memory, e.g. two views of one buffer.
        tensors[name] = t.contiguous() if ptr not in storages else t.clone(memory_format=torch.contiguous_format)
        if t.numel():
            storages.add(ptr)
    return tensors, aliases
