#!/usr/bin/env bash
# Start this site's flowerbed SuperNode from the kit folder (Linux).
# Before the first start: set data_path in site.toml, and activate the environment that has
# flowerbed installed (conda activate flowerbed-supernode-cpu), or set FLOWERBED to its path.
set -euo pipefail
cd "$(dirname "$0")"
exec "${FLOWERBED:-flowerbed}" supernode start --kit . "$@"
