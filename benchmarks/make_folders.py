"""Write Fashion-MNIST (Debian's dataset-fashion-mnist) as image folders, the layout the CLI reads:
DIR/train/<class>/<n>.png and DIR/test/<class>/<n>.png.

    python benchmarks/make_folders.py DIR [--per-class 300] [--test-per-class 100] [--classes 0 1 ...]

Used to run the CLI's image-folder pipeline (e.g. the blog's VGG16 recipe at 224, bench_gpu.py)
on real images that are on this machine; a seeded random choice per class, so the folders
are the same on every run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from filterprune.recipes.fashion import balanced_indices, fashion_mnist

NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--per-class", type=int, default=300, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    args = parser.parse_args()
    for split, per_class in (("train", args.per_class), ("test", args.test_per_class)):
        images, labels = fashion_mnist(split)
        for i in balanced_indices(labels, args.classes, per_class, seed=0).tolist():
            folder = Path(args.out) / split / NAMES[int(labels[i])]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i].numpy()).save(folder / f"{i}.png")
    print(f"wrote {args.out}: {len(args.classes)} classes, {args.per_class} training and {args.test_per_class} test images each")


if __name__ == "__main__":
    main()
