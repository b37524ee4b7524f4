#!/usr/bin/env bash
# Creates (or reuses) a separate virtual environment holding lerobot 0.6.1 with its π0 / π0.5
# policies, used only as a reference for weight/numerics parity (scripts/lerobot_reference.py,
# tests/test_lerobot_parity.py). It never touches the project's own .venv.
#
#   LEROBOT_VENV=.venv-lerobot      where the venv goes
#   LEROBOT_PYTHON=...              a Python >= 3.12 (default: pyenv's 3.12.1, else python3.12)
#   FRESH=1                         delete and recreate the venv
#
# Recipe (measured on our CPU machines): Python 3.12, torch==2.11.0 + torchvision==0.26.0
# from PyPI (a CUDA build, ~2 GB; it runs on CPU too), then lerobot[pi]==0.6.1 (which pulls
# transformers 5.4-5.5). The venv is ~5 GB. Idempotent: exits at once when the venv already
# imports lerobot's π0 / π0.5 policies at the expected versions and flowkernels (editable, this checkout,
# built against the venv's torch 2.11 without build isolation; needed by flowkernels/integrations/lerobot.py,
# tests/test_lerobot_dropin.py and benchmarks/bench_lerobot.py). Never prompts.
#   SKIP_FLOWKERNELS=1              do not install flowkernels into the venv
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LEROBOT_VENV:-.venv-lerobot}
TORCH_SPEC="torch==2.11.0"
TORCHVISION_SPEC="torchvision==0.26.0"
LEROBOT_SPEC="lerobot[pi]==0.6.1"
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

check() {
  "$VENV/bin/python" - <<'EOF' 2>/dev/null
import lerobot, torch, torchvision, transformers  # noqa: F401
from lerobot.policies.pi0.modeling_pi0 import PI0Policy  # noqa: F401
from lerobot.policies.pi05.modeling_pi05 import PI05Policy  # noqa: F401
from importlib.metadata import version
assert version("lerobot") == "0.6.1", version("lerobot")
assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
print(f"lerobot {version('lerobot')}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}")
EOF
}

check_flowkernels() {
  # an install of *this* checkout whose compiled extension loads under the venv's torch
  "$VENV/bin/python" - "$PWD" <<'EOF' 2>/dev/null
import sys
from pathlib import Path
import flowkernels, flowkernels._C  # noqa: F401
import flowkernels.integrations.lerobot  # noqa: F401
assert Path(flowkernels.__file__).resolve().parents[1] == Path(sys.argv[1]).resolve(), flowkernels.__file__
EOF
}

install_flowkernels() {
  if [ "${SKIP_FLOWKERNELS:-0}" = "1" ] || check_flowkernels; then return 0; fi
  echo "installing flowkernels (editable, no build isolation) into $VENV"
  # ninja speeds up the C++ build; --no-deps and no [rl]/[dev] extras: nothing may move the venv's torch.
  "$VENV/bin/python" -m pip install -q --progress-bar off ninja wheel "setuptools>=64" "nvtx>=0.2"
  FLOWKERNELS_BUILD_CUDA=${FLOWKERNELS_BUILD_CUDA:-0} "$VENV/bin/python" -m pip install -q --progress-bar off \
    --no-build-isolation --no-deps -e .
  check_flowkernels || { echo "error: $VENV does not import this checkout's flowkernels" >&2; exit 1; }
  check >/dev/null || { echo "error: installing flowkernels broke lerobot in $VENV" >&2; exit 1; }
}

if [ "${FRESH:-0}" = "1" ]; then rm -rf "$VENV"; fi
if [ -x "$VENV/bin/python" ] && check; then
  install_flowkernels
  echo "$VENV is ready"
  exit 0
fi

if [ -z "${LEROBOT_PYTHON:-}" ]; then
  if command -v pyenv >/dev/null 2>&1 && [ -x "$(pyenv root)/versions/3.12.1/bin/python3.12" ]; then
    LEROBOT_PYTHON="$(pyenv root)/versions/3.12.1/bin/python3.12"
  elif command -v python3.12 >/dev/null 2>&1; then
    LEROBOT_PYTHON=$(command -v python3.12)
  else
    echo "error: lerobot 0.6.1 needs Python >= 3.12; set LEROBOT_PYTHON" >&2
    exit 1
  fi
fi
"$LEROBOT_PYTHON" -c 'import sys; assert sys.version_info >= (3, 12), sys.version' || {
  echo "error: $LEROBOT_PYTHON is older than Python 3.12" >&2
  exit 1
}

if [ ! -x "$VENV/bin/python" ]; then
  # A venv this run creates is deleted again if the run fails (no network, a full disk): a half-built
  # venv without torch must not look like a lerobot environment to the tests.
  rm -rf "$VENV"
  "$LEROBOT_PYTHON" -m venv "$VENV"
  trap 'status=$?; if [ $status -ne 0 ]; then echo "removing the half-built $VENV" >&2; rm -rf "$VENV"; fi' EXIT
fi
pip_install() {
  # drops pip's "Location 'file:///…' is ignored" noise from local extra indexes; pipefail keeps pip's status
  "$VENV/bin/python" -m pip install -q --progress-bar off "$@" 2>&1 | { grep -v "^WARNING: Location 'file://" || true; }
}
pip_install --upgrade pip
# torch first and pinned: lerobot accepts torch < 2.12, and an unpinned resolve may pick another build.
pip_install "$TORCH_SPEC" "$TORCHVISION_SPEC"
pip_install "$LEROBOT_SPEC" "$TORCH_SPEC" "$TORCHVISION_SPEC"
check || { echo "error: $VENV does not import lerobot's π0 / π0.5 policies" >&2; exit 1; }
install_flowkernels
