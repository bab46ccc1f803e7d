"""Fashion-MNIST, read from the IDX files on this machine, and class-balanced subsets of it."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..data import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path} ({e}): reinstall it with "
                        "`apt-get install --reinstall dataset-fashion-mnist`") from e
    header = 4 * (1 + ndim)
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DataError(f"{path} is not an IDX file with magic number {magic}: "
                        "pass the folder holding the original Fashion-MNIST .gz files")
    shape = [int(n) for n in np.frombuffer(data, ">u4", count=ndim, offset=4)]
    if len(data) - header != int(np.prod(shape)):
        raise DataError(f"{path} holds {len(data) - header} bytes of data but its header "
                        f"announces shape {shape}: the file is damaged, reinstall it")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def fashion_mnist(split: str, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split as (uint8 images [N, 28, 28], int64 labels [N])."""
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise DataError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    image_file = root / f"{prefixes[split]}-images-idx3-ubyte.gz"
    label_file = root / f"{prefixes[split]}-labels-idx1-ubyte.gz"
    for path in (root, image_file, label_file):
        if not path.exists():
            raise DataError(f"Fashion-MNIST not found at {path}: install it with "
                            "`apt-get install -y dataset-fashion-mnist` or pass root=")
    images = _read_idx(image_file, 2051, 3)
    labels = _read_idx(label_file, 2049, 1)
    if len(images) != len(labels):
        raise DataError(f"{image_file} has {len(images)} images but {label_file} has "
                        f"{len(labels)} labels: reinstall the data set")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def balanced_indices(labels: torch.Tensor, classes: list[int], per_class: int | None,
                     seed: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Pick `per_class` random indices of each class (all if None), never one in `exclude`; sorted."""
    allowed = torch.ones(len(labels), dtype=torch.bool)
    if exclude is not None:
        allowed[exclude] = False
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in classes:
        idx = torch.nonzero((labels == c) & allowed).flatten()
        if len(idx) < (per_class or 1):
            raise DataError(f"class {c} has {len(idx)} usable images but {per_class or 1} are "
                            "needed: ask for fewer per class or exclude fewer")
        if per_class is not None:
            idx = idx[torch.randperm(len(idx), generator=generator)[:per_class]]
        chosen.append(idx)
    return torch.cat(chosen).sort().values


class FashionSubset(Dataset):
    """Fashion-MNIST images of chosen classes, relabelled 0..len(classes)-1, as 3-channel float images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                 classes: list[int], size: int = 32, augment: bool = False):
        indices = torch.as_tensor(indices, dtype=torch.long)
        match = labels[indices][:, None] == torch.tensor(classes)
        if not match.any(1).all():
            raise DataError(f"some chosen images are not of classes {classes}: "
                            "pick indices with balanced_indices(labels, classes, ...)")
        self.targets = match.int().argmax(1)
        # Resize once for all images so that an epoch only pays for the cheap random crop/flip.
        self.images = v2.functional.resize(images[indices].unsqueeze(1), [size, size],
                                           interpolation=v2.InterpolationMode.BILINEAR)
        self.augment = v2.Compose([v2.RandomCrop(size, padding=size // 8),
                                   v2.RandomHorizontalFlip()]) if augment else None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        if self.augment is not None:
            image = self.augment(image)
        # [0, 255] -> [-1, 1], i.e. mean 0.5 and std 0.5; gray repeated for 3-channel models.
        return image.float().div(127.5).sub(1).repeat(3, 1, 1), int(self.targets[i])
