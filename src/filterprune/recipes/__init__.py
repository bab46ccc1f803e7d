"""Recipes built on the library, kept apart from it (as torchvision keeps `references/`):
the pruning blog's experiment on Fashion-MNIST (`demo`), its data (`fashion`) and its network (`vgg`).
The core modules import nothing from here."""
