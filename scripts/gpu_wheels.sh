#!/usr/bin/env bash
# Wheels for a GPU machine that cannot download anything (its image has torch, triton,
# transformers, numpy, safetensors, tensorboard, tqdm, msgpack, ninja, psutil, py-cpuinfo, einops,
# but no DeepSpeed and no lerobot). Fills .whl/ (git-ignored, ~10 MB) with DeepSpeed built here
# (pure Python, no ops prebuilt) and the pure-Python / cp312 wheels it and lerobot 0.6.1 need
# beyond that image. benchmarks/gpu_session.sh installs them there with --no-index --no-deps.
#
#   bash scripts/gpu_wheels.sh         # then carry .whl with the device call
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.whl
rm -rf "$DEST"
mkdir -p "$DEST"
pip_q() { "$PY" -m pip "$@" -q --progress-bar off 2>&1 | { grep -v "^WARNING: Location 'file://" || true; }; }
# DeepSpeed ships an sdist only: build a py3-none-any wheel without compiling any op
DS_BUILD_OPS=0 pip_q wheel --no-deps --no-build-isolation -w "$DEST" "deepspeed==0.19.8"
# the GPU image's Python is 3.12 (x86_64); exact versions, no dependency resolution
pip_q download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$DEST" \
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  lerobot==0.6.1 draccus==0.11.6 mergedeep==1.3.4 toml==0.10.2 typing-inspect==0.9.0 \
  gymnasium==1.4.0 Farama-Notifications==0.0.6 termcolor==3.3.0
ls "$DEST"
du -sh "$DEST"
