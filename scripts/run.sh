#!/usr/bin/env bash
# The main job on its built-in default: set up the environment, then SFT on a few imperfect
# demonstrations of the built-in reaching task followed by FPO, with the DeepSpeed launcher
# (on CPU when there is no GPU). Prints the success rate before SFT, after SFT and after FPO.
# Extra arguments are config overrides, e.g. `bash scripts/run.sh iterations=5`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv} bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
fi
# overwrite=true: running the main job again starts it afresh in runs/reach_fpo (--resume continues it instead)
deepspeed flowrl/train.py --config flowrl/configs/reach_fpo.yaml overwrite=true "$@"
