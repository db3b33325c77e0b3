#!/usr/bin/env bash
# Run the whole test suite (tiny random models + a few tests on the embedded model).
# TL_LENSES_TL="transformer_lens==4.3.0" runs it under that TransformerLens, in .venv-tl4
# (see scripts/setup.sh); VENV=DIR picks the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -n "${TL_LENSES_TL:-}" ]; then
  major=$(printf '%s' "$TL_LENSES_TL" | sed -E 's/^[^0-9]*([0-9]+).*/\1/')
  VENV=${VENV:-.venv-tl$major}
else
  VENV=${VENV:-.venv}
fi
export HF_HUB_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q "$@"
