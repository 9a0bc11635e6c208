#!/usr/bin/env bash
# README command 1: set up, then run the five-site demo federation on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --demo
exec .venv/bin/flowerbed demo "$@"
