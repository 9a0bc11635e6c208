#!/usr/bin/env bash
# Install flowerbed into .venv from this kit's wheels/ (Linux), without any package index: with uv
# when the kit carries its wheel (it installs torch and the rest several times faster), else with pip.
# PYTHON picks the interpreter (default python3, 3.11).
set -euo pipefail
cd "$(dirname "$0")"
python="${PYTHON:-python3}"
wheel=$(ls flowerbed-*.whl | head -n 1)
"$python" -m venv .venv
if ls wheels/uv-*.whl >/dev/null 2>&1 && .venv/bin/pip install --quiet --no-index --find-links wheels uv; then
  echo "installing with uv, from wheels/"
  .venv/bin/uv pip install --python .venv/bin/python --no-index --find-links wheels --link-mode copy \
    -r wheels/requirements.txt "$wheel"
else
  echo "no uv in wheels/: installing with pip, from wheels/ (a few minutes)"
  .venv/bin/pip install --no-index --find-links wheels -r wheels/requirements.txt "$wheel"
fi
echo "installed $(.venv/bin/flowerbed --version) in .venv; start with ./start-supernode.sh"
