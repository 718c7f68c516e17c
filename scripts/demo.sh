#!/usr/bin/env bash
# The README's main command: set up, then run the demo job on its embedded default
# (SmolLM2-135M-Instruct, passkey questions over long documents, CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec "${PYTHON:-python3}" -m longquest.launch.cli demo "$@"
