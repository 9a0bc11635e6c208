#!/usr/bin/env bash
# README command 2: set up, then lint, type-check and run the whole test suite (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
ruff format --check .
bash scripts/typecheck.sh
python -m pytest -p no:cacheprovider --durations=15 "$@"
