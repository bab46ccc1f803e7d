"""Datasets: users' own folders of labelled images (ImageFolder or Kaggle layouts), and loaders."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
_LAYOUTS = ("expected one folder per class (root/train/<class>/*.jpg or root/<class>/*.jpg) "
            "or Kaggle-style flat files (root/train/cat.0.jpg or root/cat.0.jpg)")


class DataError(ValueError):
    """Bad or missing input data; the message says what to do."""


# ---------------------------------------------------------------- image folders

def load_image(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB, upright per its EXIF orientation.

    Transparent images are composited on white (dropping alpha would reveal whatever colour
    hides under transparent pixels, often black); 16-bit images are scaled down to 8 bits.
    """
    try:
        with Image.open(path) as f:
            image = ImageOps.exif_transpose(f)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise DataError(f"cannot read image {path} ({e}): remove or replace the file") from e
    if image.mode.startswith("I"):  # "I;16*" and 32-bit "I" (how some 16-bit PNGs open)
        scaled = np.asarray(image, dtype=np.float32) / 257  # 65535 -> 255
        image = Image.fromarray(scaled.round().clip(0, 255).astype(np.uint8))
    if image.has_transparency_data:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("RGB")


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            kind = image.format
            image.verify()
        # verify() checks every PNG chunk but only the header of other formats, so decode those,
        # except a JPEG ending in its end-of-image marker (truncated ones lack it): cheap for
        # the common case, thorough for the rest.
        if kind == "PNG" or (kind == "JPEG" and _tail(path) == b"\xff\xd9"):
            return True
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:  # any decoding failure makes the file unusable
        return False


def _tail(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-2, os.SEEK_END)
        return f.read()


def _is_image(path: Path) -> bool:
    # Hidden files (.DS_Store, macOS "._cat.jpg" forks) are never images.
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _scan(folder: Path) -> dict[str, list[Path]]:
    """Class name -> image files, from class sub-folders or flat <class>.<id>.<ext> names."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not entries:
        raise DataError(f"{folder} is empty: {_LAYOUTS}")
    subdirs = [p for p in entries if p.is_dir()]
    if subdirs:
        by_folder = {d.name: sorted(p for p in d.rglob("*") if _is_image(p)) for d in subdirs}
        for name, files in by_folder.items():
            if not files:
                raise DataError(f"class folder {folder / name} has no images "
                                f"({', '.join(sorted(IMAGE_EXTENSIONS))}): add some or remove it")
        return by_folder
    files = [p for p in entries if _is_image(p)]
    if not files:
        raise DataError(f"no image files in {folder}: {_LAYOUTS}")
    classes: dict[str, list[Path]] = {}
    for p in files:
        if "." not in p.stem:
            raise DataError(f"cannot tell the class of {p}: name flat files <class>.<id>"
                            f"{p.suffix} (like cat.0.jpg) or put them in one folder per class")
        classes.setdefault(p.name.split(".")[0], []).append(p)
    return classes


def _hold_out(name: str, files: list[Path], fraction: float, seed: int,
              base: Path, purpose: str = "test") -> tuple[list[Path], list[Path]]:
    if len(files) < 2:
        raise DataError(f"class {name!r} has only 1 usable image ({files[0]}): need 2 or more "
                        f"per class to hold some out for {'testing' if purpose == 'test' else purpose}, or add a {purpose} folder")
    # Rank by a seeded hash of the relative path: independent of directory listing order and of
    # where the folder lives, and adding a file barely moves the others between train and test.
    # Validation is drawn with another salt, so it is not the next images of the test ranking.
    salt = f"{seed}" if purpose == "test" else f"{purpose}/{seed}"
    ranked = sorted(files, key=lambda p: hashlib.sha256(
        f"{salt}/{p.relative_to(base).as_posix()}".encode()).digest())
    n_test = min(max(round(fraction * len(files)), 1), len(files) - 1)
    return sorted(ranked[n_test:]), sorted(ranked[:n_test])


class ImageFiles(Dataset):
    """Labelled image files (ImageFolder-like: `samples`, `targets`, `classes`), loaded RGB and transformed."""

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], transform: v2.Transform):
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(load_image(path)), label


def image_folder_datasets(root: str | Path, size: int = 224, test_fraction: float = 0.2,
                          seed: int = 0, augment: bool = True) -> tuple[Dataset, Dataset, list[str]]:
    """Return (train, test, class names) from a folder of labelled images: image_folder_splits
    without a validation split."""
    train, _, test, classes = image_folder_splits(root, size, test_fraction, seed, augment, val_fraction=0.0)
    return train, test, classes


def image_folder_splits(root: str | Path, size: int = 224, test_fraction: float = 0.2, seed: int = 0,
                        augment: bool = True, val_fraction: float = 0.1,
                        val_dir: str | Path | None = None) -> tuple[Dataset, Dataset | None, Dataset, list[str]]:
    """Return (train, validation, test, class names) from a folder of labelled images.

    Validation images, for choosing and stopping (never the test images): the folder `val_dir`
    (the same layouts; an image also among the test images is an error), else `val_fraction` of
    each class's training images (after the test images are held out), chosen by `seed`; None
    when val_fraction is 0. Layouts: one sub-folder per class (root/train/<class>/, with an optional root/test/<class>/
    or root/val/<class>/; or root/<class>/), or Kaggle Dogs-vs-Cats flat files named
    <class>.<id>.<ext> (root/train/cat.0.jpg, or root/cat.0.jpg). Without a test or val folder,
    `test_fraction` of each class is held out, chosen by `seed`. Unreadable files are skipped
    with one warning. Images come out as normalised float tensors [3, size, size].
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} not found: pass the folder that holds your images")
    if (root / "train").is_dir():
        train_dir = root / "train"
        test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    else:  # then a "test" or "val" folder is just a class name
        train_dir, test_dir = root, None
    if test_dir is None and not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    train = _scan(train_dir)
    test = _scan(test_dir) if test_dir is not None else {}

    bad = [p for files in [*train.values(), *test.values()] for p in files if not _readable(p)]
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image file(s): "
                      f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''}", stacklevel=2)
    skipped = set(bad)
    for where, found in ((train_dir, train), (test_dir, test)):
        for name, files in found.items():
            found[name] = [p for p in files if p not in skipped]
            if not found[name]:
                raise DataError(f"class {name!r} in {where} has no readable images: "
                                "replace the broken files or remove the class")

    classes = sorted(train)
    if len(classes) < 2:
        raise DataError(f"found only class {classes} in {train_dir}: need at least 2 classes; {_LAYOUTS}")
    if missing := sorted(set(test) - set(train)):
        raise DataError(f"test classes {missing} in {test_dir} have no training images in "
                        f"{train_dir}: add them to training or remove them from the test folder")
    if test_dir is None:
        for name in classes:
            train[name], test[name] = _hold_out(name, train[name], test_fraction, seed, train_dir)
    val = _validation(train, test, classes, val_fraction, val_dir, seed, train_dir)

    def dataset(found: dict[str, list[Path]], transform: v2.Transform) -> ImageFiles:
        samples = [(p, label) for label, name in enumerate(classes) for p in found.get(name, [])]
        return ImageFiles(samples, classes, transform)

    train_steps = train_transform(size) if augment else eval_transform(size)
    return (dataset(train, train_steps), None if val is None else dataset(val, eval_transform(size)),
            dataset(test, eval_transform(size)), classes)


def _validation(train: dict[str, list[Path]], test: dict[str, list[Path]], classes: list[str], fraction: float,
                folder: str | Path | None, seed: int, base: Path) -> dict[str, list[Path]] | None:
    """The validation files by class: `folder`'s, or `fraction` of `train`'s (taken out of `train`)."""
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"validation folder {folder} not found: pass a folder of images by class, like the training folder's")
        val = _scan(folder)
        if unknown := sorted(set(val) - set(classes)):
            raise DataError(f"validation classes {unknown} in {folder} have no training images: use the training folder's class names")
        tested = {p.resolve() for files in test.values() for p in files}
        if shared := [p for files in val.values() for p in files if p.resolve() in tested]:
            raise DataError(f"{len(shared)} validation images are also test images (e.g. {shared[0]}): "
                            "validation must be other images than the test's")
        return val
    if fraction == 0:
        return None
    if not 0 < fraction < 1:
        raise DataError(f"the validation fraction must be between 0 and 1 (exclusive), got {fraction}")
    val = {}
    for name in classes:
        train[name], val[name] = _hold_out(name, train[name], fraction, seed, base, purpose="validation")
    return val


_FINISH = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def eval_transform(size: int) -> v2.Transform:
    """PIL image -> normalised tensor: resize the short side to size*8/7, centre crop `size`."""
    return v2.Compose([v2.ToImage(), v2.Resize(int(size * 8 / 7)), v2.CenterCrop(size), *_FINISH])


def train_transform(size: int) -> v2.Transform:
    """Augmented: a random crop of 50-100% of the image resized to `size`, random flips."""
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.5, 1.0)), v2.RandomHorizontalFlip(), *_FINISH])


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0,
                num_workers: int = 0, drop_last: bool = False, pin_memory: bool | None = None) -> DataLoader:
    """DataLoader whose shuffling (and workers' random augmentation seeds) follow `seed`.

    pin_memory (default: whether CUDA is available): page-locked batches, so that the copy to the
    GPU (train.to_device, non_blocking) overlaps with the previous step's compute.
    """
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      drop_last=drop_last, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=num_workers > 0, pin_memory=default_pin_memory(pin_memory))


def default_pin_memory(pin_memory: bool | None = None) -> bool:
    """pin_memory as asked, or (None) whether CUDA is available: pinning only pays for copies to a GPU."""
    return torch.cuda.is_available() if pin_memory is None else pin_memory
