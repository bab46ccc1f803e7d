#!/usr/bin/env bash
# The test suite: set up if needed, then pytest (well under 10 minutes on 2 CPU cores).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
python -m pytest "$@"
