#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a local virtual environment with the pinned PyTorch,
# filterprune installed in it (editable, with test extras), and Fashion-MNIST from Debian.
# Sourced by scripts/demo.sh and scripts/test.sh; re-running it only redoes what changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.filterprune-setup"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "setup: installing torch 2.14.1, torchvision 0.29.1 and filterprune into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e "$ROOT[test]"
    echo "$WANT" > "$STAMP"
fi

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist > /dev/null
fi
export PATH="$VENV/bin:$PATH"
