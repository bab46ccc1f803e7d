import gzip
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from filterprune.data import DataError, image_folder_datasets, load_image, make_loader
from filterprune.recipes.fashion import (FASHION_CLASSES, FASHION_MNIST_DIR, FashionSubset, balanced_indices,
                                         fashion_mnist)

COLOURS = {"cat": (220, 30, 30), "dog": (30, 30, 220), "fox": (30, 220, 30)}


def save(path: Path, colour=(200, 50, 50), fmt="JPEG", size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt)
    return path


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)  # noisy content, so the encoded data is long enough to cut
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def class_folders(root: Path, names=("cat", "dog"), n=5, start=0) -> None:
    for name in names:
        for i in range(start, start + n):
            fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
            save(root / name / f"{name}{i}.{ext}", COLOURS[name], fmt)


def mean_rgb(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(1, 2))


# ---------------------------------------------------------------- image folders

def test_class_folders_with_test_folder(tmp_path):
    class_folders(tmp_path / "train", n=4)
    class_folders(tmp_path / "test", n=2)
    train, test, classes = image_folder_datasets(tmp_path, size=24)
    assert classes == ["cat", "dog"]
    assert (len(train), len(test)) == (8, 4)
    assert sorted(train.targets) == [0] * 4 + [1] * 4 and sorted(test.targets) == [0, 0, 1, 1]
    for ds in (train, test):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 24, 24) and x.dtype == torch.float32
            r, _, b = mean_rgb(x)  # cats are red, dogs blue, after normalisation too
            assert (r > b) == (y == 0)


def test_val_folder_is_used_as_test(tmp_path):
    class_folders(tmp_path / "train", n=3)
    class_folders(tmp_path / "val", n=1)
    train, test, _ = image_folder_datasets(tmp_path, size=16)
    assert (len(train), len(test)) == (6, 2)
    assert all(p.parent.parent.name == "val" for p, _ in test.samples)


def test_class_folders_in_root_hold_out_a_reproducible_split(tmp_path):
    class_folders(tmp_path, names=("cat", "dog", "fox"), n=10)
    train, test, classes = image_folder_datasets(tmp_path, size=16, test_fraction=0.2, seed=3)
    assert classes == ["cat", "dog", "fox"]
    assert (len(train), len(test)) == (24, 6)
    assert sorted(test.targets) == [0, 0, 1, 1, 2, 2]
    train_files, test_files = {p for p, _ in train.samples}, {p for p, _ in test.samples}
    assert not train_files & test_files
    assert len(train_files | test_files) == 30
    again = image_folder_datasets(tmp_path, size=16, test_fraction=0.2, seed=3)[1]
    assert [p for p, _ in again.samples] == [p for p, _ in test.samples]
    other = image_folder_datasets(tmp_path, size=16, test_fraction=0.2, seed=4)[1]
    assert {p for p, _ in other.samples} != test_files


def test_split_does_not_depend_on_where_the_folder_lives(tmp_path):
    class_folders(tmp_path / "a", n=10)
    class_folders(tmp_path / "b", n=10)
    a = image_folder_datasets(tmp_path / "a", size=16, seed=1)[1]
    b = image_folder_datasets(tmp_path / "b", size=16, seed=1)[1]
    assert [p.name for p, _ in a.samples] == [p.name for p, _ in b.samples]


@pytest.mark.parametrize("inside_train", [True, False])
def test_kaggle_flat_layout(tmp_path, inside_train):
    folder = tmp_path / "train" if inside_train else tmp_path
    for name in ("cat", "dog"):
        for i in range(5):
            save(folder / f"{name}.{i}.jpg", COLOURS[name])
    train, test, classes = image_folder_datasets(tmp_path, size=20, test_fraction=0.4)
    assert classes == ["cat", "dog"]
    assert (len(train), len(test)) == (6, 4)
    for p, y in train.samples + test.samples:
        assert p.name.startswith(classes[y] + ".")
    x, y = test[0]
    assert x.shape == (3, 20, 20)


def test_broken_files_are_skipped_with_one_warning(tmp_path):
    class_folders(tmp_path / "train", n=3)
    cat = tmp_path / "train" / "cat"
    data = jpeg_bytes()
    (cat / "random.jpg").write_bytes(np.random.default_rng(1).bytes(300))
    (cat / "truncated.JPG").write_bytes(data[: len(data) // 2])
    (cat / "empty.png").write_bytes(b"")
    (cat / "notes.txt").write_text("not an image")
    (cat / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with pytest.warns(UserWarning) as record:
        train, test, _ = image_folder_datasets(tmp_path, size=16, test_fraction=0.34)
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith("skipped 3 unreadable image file(s)")
    for name in ("random.jpg", "truncated.JPG", "empty.png"):
        assert name in message
    assert "notes.txt" not in message and ".DS_Store" not in message
    assert len(train) + len(test) == 6
    assert not {p.name for p, _ in train.samples + test.samples} & {"random.jpg", "truncated.JPG"}


def test_good_folder_gives_no_warning(tmp_path):
    class_folders(tmp_path, n=3)
    (tmp_path / "cat" / "notes.txt").write_text("ignored silently")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image_folder_datasets(tmp_path, size=16)


def odd_mode_images() -> dict[str, tuple[Image.Image, tuple[int, int, int]]]:
    """name -> (image, RGB that load_image should give for its pixels)."""
    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([0, 0, 0, 10, 120, 230] + [0] * 762)
    transparent = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    return {
        "gray.png": (Image.new("L", (40, 30), 100), (100, 100, 100)),
        "gray_alpha.png": (Image.new("LA", (40, 30), (100, 0)), (255, 255, 255)),
        "rgba.png": (Image.new("RGBA", (40, 30), (200, 10, 10, 255)), (200, 10, 10)),
        "clear.png": (transparent, (255, 255, 255)),
        "palette.png": (palette, (10, 120, 230)),
        "deep.png": (Image.fromarray(np.full((30, 40), 32896, np.uint16)), (128, 128, 128)),
        "cmyk.jpg": (Image.new("CMYK", (40, 30), (0, 0, 0, 0)), (255, 255, 255)),
    }


def test_load_image_converts_every_mode_to_rgb(tmp_path):
    for name, (image, rgb) in odd_mode_images().items():
        image.save(tmp_path / name)
        loaded = load_image(tmp_path / name)
        assert loaded.mode == "RGB" and loaded.size == (40, 30), name
        assert np.abs(np.asarray(loaded)[10, 10].astype(int) - rgb).max() <= 2, name
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really stored as 16-bit


def test_load_image_error_says_which_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read image .*bad.jpg"):
        load_image(tmp_path / "bad.jpg")


def test_odd_modes_work_in_a_dataset(tmp_path):
    for name, (image, _) in odd_mode_images().items():
        (tmp_path / "odd").mkdir(exist_ok=True)
        image.save(tmp_path / "odd" / name)
    class_folders(tmp_path, names=("cat",), n=2)
    train, test, classes = image_folder_datasets(tmp_path, size=16, test_fraction=0.5)
    assert classes == ["cat", "odd"]
    assert all(x.shape == (3, 16, 16) for ds in (train, test) for x, _ in ds)


def test_augmentation_is_random_and_eval_is_not(tmp_path):
    gradient = np.tile(np.arange(0, 240, 4, dtype=np.uint8), (40, 1))
    for name in ("cat", "dog"):
        for i in range(2):
            (tmp_path / name).mkdir(exist_ok=True)
            Image.fromarray(np.dstack([gradient] * 3)).save(tmp_path / name / f"{i}.png")
    train, test, _ = image_folder_datasets(tmp_path, size=32, test_fraction=0.5, augment=True)
    torch.manual_seed(0)
    draws = [train[0][0] for _ in range(6)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(test[0][0], test[0][0])
    plain = image_folder_datasets(tmp_path, size=32, test_fraction=0.5, augment=False)[0]
    assert torch.equal(plain[0][0], plain[0][0])


@pytest.mark.parametrize("build, message", [
    (lambda root: None, "image folder .*missing not found"),
    (lambda root: root.mkdir(), "is empty"),
    (lambda root: (root / "train").mkdir(parents=True), "train is empty"),
    (lambda root: (save(root / "cat" / "a.jpg"), (root / "dog").mkdir()), "class folder .*dog has no images"),
    (lambda root: (root.mkdir(), (root / "notes.txt").write_text("x")), "no image files in"),
    (lambda root: [save(root / f"cat.{i}.jpg") for i in range(3)], r"found only class \['cat'\]"),
    (lambda root: [save(root / "cat" / f"{i}.jpg") for i in range(3)], "need at least 2 classes"),
    (lambda root: (save(root / "cat.1.jpg"), save(root / "photo.jpg")), "cannot tell the class of .*photo.jpg"),
    (lambda root: (save(root / "cat" / "a.jpg"), save(root / "dog" / "b.jpg")), "'cat' has only 1 usable image"),
    (lambda root: (save(root / "cat" / "a.jpg"), (root / "dog").mkdir(), (root / "dog" / "x.jpg").write_bytes(b"")),
     "class 'dog' in .* has no readable images"),
    (lambda root: (class_folders(root / "train"), class_folders(root / "test", names=("cat", "fox"))),
     r"test classes \['fox'\] .* have no training images"),
])
def test_bad_folders_raise_clear_errors(tmp_path, build, message):
    root = tmp_path / "missing"
    build(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=message) as error:
            image_folder_datasets(root, size=16)
    assert "\n" not in str(error.value)


def test_bad_test_fraction(tmp_path):
    class_folders(tmp_path)
    with pytest.raises(DataError, match="test_fraction must be between 0 and 1"):
        image_folder_datasets(tmp_path, test_fraction=1.0)


def test_make_loader_shuffles_reproducibly():
    dataset = torch.utils.data.TensorDataset(torch.arange(100))

    def order(seed):
        return torch.cat([b[0] for b in make_loader(dataset, 10, shuffle=True, seed=seed)]).tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(100))
    unshuffled = make_loader(dataset, 32, shuffle=False, drop_last=True)
    assert [len(b[0]) for b in unshuffled] == [32, 32, 32]
    assert next(iter(unshuffled))[0].tolist() == list(range(32))


# ---------------------------------------------------------------- Fashion-MNIST

def write_idx(path: Path, magic: int, array: np.ndarray, cut: int = 0) -> None:
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data[: len(data) - cut]))


def tiny_fashion(root: Path, n=6) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir(exist_ok=True)
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 3
    write_idx(root / "t10k-images-idx3-ubyte.gz", 2051, images)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", 2049, labels)
    return images, labels


def test_fashion_mnist_parses_idx_files(tmp_path):
    images, labels = tiny_fashion(tmp_path)
    x, y = fashion_mnist("test", root=tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (6, 28, 28)
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 0, 1, 2]
    assert np.array_equal(x.numpy(), images)


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(DataError, match="Fashion-MNIST not found at .*nowhere: install it with "
                                        "`apt-get install -y dataset-fashion-mnist` or pass root="):
        fashion_mnist("train", root=tmp_path / "nowhere")
    tiny_fashion(tmp_path)
    with pytest.raises(DataError, match="not found at .*train-images-idx3-ubyte.gz"):
        fashion_mnist("train", root=tmp_path)
    with pytest.raises(DataError, match="unknown Fashion-MNIST split 'val'"):
        fashion_mnist("val", root=tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2051, np.zeros(6))
    with pytest.raises(DataError, match="not an IDX file with magic number 2049"):
        fashion_mnist("test", root=tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, np.zeros(6), cut=1)
    with pytest.raises(DataError, match="holds 5 bytes of data but its header announces shape"):
        fashion_mnist("test", root=tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, np.zeros(5))
    with pytest.raises(DataError, match="has 6 images but .* has 5 labels"):
        fashion_mnist("test", root=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read .*t10k-labels"):
        fashion_mnist("test", root=tmp_path)


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = fashion_mnist(split)
        assert x.shape == (n, 28, 28) and x.dtype == torch.uint8
        assert y.shape == (n,) and y.dtype == torch.int64
        assert y.unique().tolist() == list(range(len(FASHION_CLASSES))) == list(range(10))
        assert torch.bincount(y).tolist() == [n // 10] * 10  # Fashion-MNIST is balanced
        assert 50 < x.float().mean() < 100


def test_balanced_indices():
    labels = torch.tensor([0, 1, 2] * 10)
    a = balanced_indices(labels, [2, 0], per_class=4, seed=0)
    assert len(a) == 8 and torch.bincount(labels[a], minlength=3).tolist() == [4, 0, 4]
    assert a.tolist() == sorted(a.tolist())
    assert torch.equal(a, balanced_indices(labels, [2, 0], per_class=4, seed=0))
    assert not torch.equal(a, balanced_indices(labels, [2, 0], per_class=4, seed=1))
    b = balanced_indices(labels, [2, 0], per_class=6, seed=0, exclude=a)
    assert not set(a.tolist()) & set(b.tolist())
    assert balanced_indices(labels, [1], per_class=None, seed=0).tolist() == list(range(1, 30, 3))
    with pytest.raises(DataError, match="class 0 has 2 usable images but 4 are needed"):
        balanced_indices(labels, [0], per_class=4, seed=0, exclude=torch.arange(24))


def test_fashion_subset_relabels_and_resizes():
    images = torch.zeros(6, 28, 28, dtype=torch.uint8)
    images[:, :, :14] = 255  # left half white
    labels = torch.tensor([7, 2, 5, 7, 2, 5])
    ds = FashionSubset(images, labels, torch.tensor([0, 1, 3, 4]), classes=[7, 2], size=32)
    assert len(ds) == 4
    assert [ds[i][1] for i in range(4)] == [0, 1, 0, 1]
    x, _ = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[0], x[2])
    assert x[:, :, 0].eq(1).all() and x[:, :, -1].eq(-1).all()  # 255 -> 1, 0 -> -1
    with pytest.raises(DataError, match=r"not of classes \[7, 2\]"):
        FashionSubset(images, labels, torch.tensor([0, 2]), classes=[7, 2])


def test_fashion_subset_augmentation():
    images = torch.arange(28 * 28, dtype=torch.float32).reshape(1, 28, 28).div(4).to(torch.uint8)
    ds = FashionSubset(images, torch.tensor([3]), torch.tensor([0]), classes=[3], size=32, augment=True)
    torch.manual_seed(0)
    draws = [ds[0][0] for _ in range(8)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert all(d.min() >= -1 and d.max() <= 1 for d in draws)


def test_loaders_pin_memory_when_cuda_is_there_unless_told(monkeypatch):
    data = torch.utils.data.TensorDataset(torch.zeros(4, 1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert make_loader(data, 2, shuffle=False).pin_memory
    assert not make_loader(data, 2, shuffle=False, pin_memory=False).pin_memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not make_loader(data, 2, shuffle=False).pin_memory


def test_validation_is_carved_from_training_images_never_test_images(tmp_path):
    """Issue 19: the loop chooses and stops on validation images; those are training-split images held out
    per class, reproducibly, and never test images (with a held-out test split or a test folder)."""
    from filterprune.data import image_folder_splits

    class_folders(tmp_path / "flat", n=20)
    class_folders(tmp_path / "split" / "train", n=20)
    class_folders(tmp_path / "split" / "test", n=4, start=100)
    for root, per_class in ((tmp_path / "flat", 4), (tmp_path / "split", 5)):  # 25% of 16 (4 of 20 held out for testing), of 20
        train, val, test, classes = image_folder_splits(root, size=16, test_fraction=0.2, val_fraction=0.25, seed=1)
        paths = [{p for p, _ in d.samples} for d in (train, val, test)]
        assert not paths[0] & paths[1] and not paths[1] & paths[2] and not paths[0] & paths[2]
        assert sorted(classes[label] for _, label in val.samples) == ["cat"] * per_class + ["dog"] * per_class
        assert image_folder_splits(root, size=16, test_fraction=0.2, val_fraction=0.25, seed=1)[1].samples == val.samples
        assert image_folder_splits(root, size=16, test_fraction=0.2, val_fraction=0.25, seed=2)[1].samples != val.samples
        # the test split is the one image_folder_datasets gives, with or without a validation split
        assert test.samples == image_folder_datasets(root, size=16, test_fraction=0.2, seed=1)[1].samples


def test_a_validation_folder_is_used_and_may_not_share_test_images(tmp_path):
    from filterprune.data import image_folder_splits

    class_folders(tmp_path / "train", n=6)
    class_folders(tmp_path / "test", n=2, start=50)
    class_folders(tmp_path / "mine", n=3, start=80)
    train, val, test, _ = image_folder_splits(tmp_path, size=16, val_dir=tmp_path / "mine")
    assert len(val) == 6 and len(train) == 12 and all("mine" in str(p) for p, _ in val.samples)
    with pytest.raises(DataError, match="also test images"):
        image_folder_splits(tmp_path, size=16, val_dir=tmp_path / "test")
    with pytest.raises(DataError, match="validation folder .* not found"):
        image_folder_splits(tmp_path, size=16, val_dir=tmp_path / "nowhere")
