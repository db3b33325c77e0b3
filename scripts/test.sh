#!/usr/bin/env bash
# Run the whole test suite (tiny random models + a few tests on the embedded model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
