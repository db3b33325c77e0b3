#!/usr/bin/env bash
# The main job: every method on the embedded model, as an HTML report in out/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python demos/main.py --out out "$@"
