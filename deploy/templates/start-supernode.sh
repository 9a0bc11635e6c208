#!/usr/bin/env bash
# Start this site's flowerbed SuperNode from the kit folder (Linux).
# It uses, in this order: $FLOWERBED, the kit's own .venv (the offline install), or `flowerbed` on
# PATH (conda activate flowerbed-supernode-cpu). Set data_path in site.toml before the first start.
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${FLOWERBED:-}" ] && [ -x .venv/bin/flowerbed ]; then FLOWERBED=.venv/bin/flowerbed; fi
exec "${FLOWERBED:-flowerbed}" supernode start --kit . "$@"
