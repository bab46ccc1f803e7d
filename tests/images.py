"""Generated images shared by the CLI and schedule tests: a colour and a pattern per class."""

import numpy as np
import pytest
import torch

COLOURS = {"cat": (220, 40, 40), "dog": (40, 40, 220), "fox": (40, 190, 40)}


def picture(kind: str, i: int, size: int = 32) -> np.ndarray:
    """A class colour with a class pattern (stripes across, stripes down, diagonals) and noise."""
    k = list(COLOURS).index(kind)
    y, x = np.mgrid[:size, :size]
    pattern = [(y // 4) % 2, (x // 4) % 2, ((x + y) // 4) % 2][k]
    noise = np.random.default_rng(1000 * k + i).normal(0, 12, (size, size, 3))
    return (np.array(COLOURS[kind]) * (0.55 + 0.45 * pattern[..., None]) + noise).clip(0, 255).astype(np.uint8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread (imported by a test module, applies to it): faster for these tiny models on a
    busy 2-core machine, and the same arithmetic as the one-thread subprocesses."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
