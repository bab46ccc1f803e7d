#!/usr/bin/env bash
# The main job: set up if needed, then run the blog's experiment on Fashion-MNIST.
# Extra arguments go to `filterprune demo` (e.g. --quick, --out DIR).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
filterprune demo "$@"
