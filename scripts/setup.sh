#!/usr/bin/env bash
# Install everything flowerbed needs on Debian/Ubuntu: nginx and python3-venv from Debian's
# packages (only if missing), then a virtual environment in .venv with CPU torch and the kit.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
PY="${PYTHON:-python3}"
need=()
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then need+=(nginx-light); fi
if ! "$PY" -c "import venv, ensurepip" >/dev/null 2>&1; then need+=(python3-venv); fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]} (apt-get)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: flowerbed needs Python 3.11 or newer (set PYTHON=python3.11)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
# The CPU build of torch first: an open torch range alone would pull a multi-GB CUDA build.
echo "setup: installing torch (CPU) and flowerbed into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
.venv/bin/flowerbed --version
