#!/usr/bin/env bash
# A separate virtualenv with the tuned-lens library (Belrose et al., PyPI tuned-lens==0.2.0),
# for the third contender of benchmarks/bench_tuned_lens.py. Idempotent: on an existing venv
# it checks the pinned versions and the library's imports, and installs only if that fails.
#
#     bash benchmarks/tuned_lens_library_env.sh [VENV]      # default /work/tlvenv
#
# torch is installed first, alone, as torch==2.13.0 (this machine's local CPU wheel), and a
# constraints file pins it for every later step, so that no dependency range can pull in a
# multi-GB CUDA build. torchdata is 0.9.0, the last with what tuned-lens 0.2.0 imports
# (torchdata.dataloader2 and torchdata.datapipes; 0.10 removed them). transformers is the
# version tl_lenses uses, so that both read the converted SmolLM2 folder alike (its
# config.json is in transformers 5's format, e.g. rope_parameters, which 4.x would ignore).
set -euo pipefail

VENV="${1:-/work/tlvenv}"
PYTHON="${PYTHON:-python3.11}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "$(realpath -m "$VENV")/" in
    "$REPO"/*) echo "refusing to put the library's venv inside the repository: $VENV" >&2
               exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# The set this was checked with (tuned-lens 0.2.0 names its dependencies without upper bounds).
CONSTRAINTS="$VENV/constraints.txt"
cat > "$CONSTRAINTS" <<'PINS'
torch==2.13.0
torchdata==0.9.0
transformers==5.24.0
accelerate==1.15.0
datasets==5.2.0
huggingface-hub==2.4.0
wandb==0.31.0
plotly==7.1.0
simple-parsing==0.1.9
flatten-dict==0.5.0
PINS

check() {   # the pinned versions are installed and the library's training loop imports
    "$VENV/bin/python" - "$CONSTRAINTS" <<'PY'
import importlib.metadata as md, sys, warnings
warnings.filterwarnings("ignore", category=UserWarning, module=r"torchdata\b.*")
pins = dict(line.strip().split("==") for line in open(sys.argv[1]) if "==" in line)
pins = {"tuned-lens": "0.2.0", **pins}
for name, version in pins.items():
    have = md.version(name).split("+")[0]
    assert have == version, f"{name} {have} is installed, {version} is wanted"
from torchdata import dataloader2, datapipes  # what tuned_lens.scripts.ingredients imports
from tuned_lens.scripts.train_loop import Train  # the training loop and all it imports
print("ok:", ", ".join(f"{name}=={md.version(name)}" for name in pins))
PY
}

if check 2>/dev/null; then
    exit 0
fi

# 1. torch alone, from the local CPU wheel.
"${PIP[@]}" install "torch==2.13.0"
# 2. everything else, with torch (and the rest of the set) pinned.
"${PIP[@]}" install -c "$CONSTRAINTS" "tuned-lens==0.2.0"
check
