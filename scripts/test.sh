#!/usr/bin/env bash
# One command for the whole test suite on a fresh machine: set up .venv, then run pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k vit -x`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
PY="${VENV_DIR:-$ROOT/.venv}/bin/python"
# Two pytest workers (pytest-xdist) with one intra-op thread each: the tests are small and mostly
# single-threaded, so two processes keep a 2-core machine busy where one left a core idle. Whole
# files go to one worker (--dist loadfile), so a module's fixtures are built once. The tests
# marked `torchrun` start gloo process pairs of their own; they run afterwards, one at a time
# (beside a busy second worker a two-rank FSDP run once died at exit with SIGABRT).
# PYTEST_WORKERS=0 runs everything in this one process (e.g. with a debugger); another number
# sets the workers.
workers="${PYTEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then
  exec "$PY" -m pytest -q --durations=15 "$@"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
first=0 second=0
"$PY" -m pytest -q --durations=15 -n "$workers" --dist loadfile -m "not torchrun" "$@" || first=$?
echo "[test] the torchrun-marked tests, one at a time"
"$PY" -m pytest -q --durations=5 -m torchrun "$@" || second=$?
# pytest's 5 means "no test selected": fine for one phase (e.g. -k picked tests of the other).
[ "$first" = 5 ] && [ "$second" = 5 ] && exit 5
for rc in "$first" "$second"; do [ "$rc" = 0 ] || [ "$rc" = 5 ] || exit "$rc"; done
exit 0
