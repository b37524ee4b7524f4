#!/usr/bin/env bash
# Creates (or reuses) a virtual environment and installs flowkernels into it, building the
# C++ (and, with a CUDA torch and nvcc, the CUDA) extension.
#   VENV=.venv  FRESH=1 (recreate)  TORCH_SPEC=torch==2.13.0 (CPU build on the dev/CI machines, whose pip
#   index serves it)  TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (torch from that index: the CPU
#   build on a machine whose default index, like PyPI, would give the multi-GB CUDA one)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ "${FRESH:-0}" = "1" ]; then rm -rf "$VENV"; fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch is pinned and installed first: an unpinned torch may pull a multi-GB CUDA build, and
# the extension must be built against the torch it runs with (--no-build-isolation).
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  python -m pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
fi
python -m pip install -q "$TORCH_SPEC" setuptools wheel ninja
# wandb: the optional Weights & Biases logger (wandb=offline|online), installed so its test runs
python -m pip install -q --no-build-isolation -e ".[dev,rl,wandb]"
python -c "import flowkernels, flowkernels._C as C; print('flowkernels', flowkernels.__version__, 'backends:', flowkernels.available_backends(), 'cuda kernels:', C.has_cuda)"
