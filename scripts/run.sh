#!/usr/bin/env bash
# The main job on its built-in default: set up, then benchmark every fused op on every
# backend available here, side by side with torch eager and torch.compile.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv} bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
python benchmarks/bench_ops.py "$@"
