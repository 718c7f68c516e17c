#!/usr/bin/env bash
# Idempotent set-up on a fresh CPU machine: PyTorch's CPU build, then longquest and its extras.
# Usage: bash scripts/setup.sh [extras]   (default extras: dev)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-dev}
py=${PYTHON:-python3}
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch 2.13.0 (CPU build)"
  "$py" -m pip install -q torch==2.13.0
fi
if ! "$py" -c "import longquest, triton, transformers" >/dev/null 2>&1 || [ -n "${LONGQUEST_REINSTALL:-}" ] \
   || ! "$py" -m pip show -q pytest ray gguf >/dev/null 2>&1 \
   || ! "$py" -c "import ray.dashboard.optional_deps" >/dev/null 2>&1; then
  echo "[setup] installing longquest[$extras]"
  "$py" -m pip install -q -e ".[$extras]"
fi
