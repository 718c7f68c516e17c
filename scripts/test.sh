#!/usr/bin/env bash
# The README's test command: set up, then run every test (GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider --timeout=900 "$@"
