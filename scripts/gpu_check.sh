#!/usr/bin/env bash
# The prepared accelerator check (docs/benchmarks.md, "GPU check"): CUDA tests, bf16 matmul peak,
# ViT-L recipe speed / MFU / memory, training loop and loader throughput, as one table.
#
#   bash scripts/gpu_check.sh                  # one GPU, < 8 minutes
#   bash scripts/gpu_check.sh --cpu-smoke      # toy sizes on the CPU: the plumbing only
#   OUT=results bash scripts/gpu_check.sh      # also results/gpu_check.{md,json,log}
#
# Options after the script name go to scripts/gpu_check.py (--help lists them). Environment:
# PYTHON (default: the repository's .venv if there is one, else python3), OUT, and
# GPU_CHECK_TIMEOUT (seconds before the whole check is stopped; default 480 = 8 minutes).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# The checkout itself is importable: a GPU machine's image may hold torch but not this package.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if ! missing="$("$PYTHON" - <<'EOF'
import importlib.util
names = ("torch", "numpy", "scipy", "monai", "nibabel", "omegaconf", "pydicom", "submitit", "tqdm", "pytest")
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
)"; then
    echo "gpu_check.sh: $PYTHON does not run" >&2
    exit 1
fi
if [ -n "$missing" ]; then
    echo "gpu_check.sh: $PYTHON lacks: $missing. Install them (pip install -e '.[test]'; offline, from" \
         "wheels carried to the machine) or set PYTHON to an interpreter that has them." >&2
    exit 1
fi

args=()
if [ -n "${OUT:-}" ]; then args+=(--out "$OUT"); fi
exec timeout --kill-after=15 "${GPU_CHECK_TIMEOUT:-480}" "$PYTHON" scripts/gpu_check.py ${args[@]+"${args[@]}"} "$@"
