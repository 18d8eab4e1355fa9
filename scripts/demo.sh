#!/usr/bin/env bash
# One command for the demo on a fresh machine: set up .venv, then run scripts/demo.py
# (pretrain -> finetune -> probe -> visualise) on the real brain volumes that ship inside the
# sample-data packages. Extra arguments go to the demo (e.g. --quick).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "${VENV_DIR:-$ROOT/.venv}/bin/python" scripts/demo.py "$@"
