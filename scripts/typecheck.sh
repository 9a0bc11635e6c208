#!/usr/bin/env bash
# mypy cannot follow setuptools' package-dir mapping, so check a tree that mirrors the
# installed `flowerbed.*` namespace through symlinks to the real folders.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck
rm -rf "$tree" && mkdir -p "$tree"
cp -as "$PWD/flowerbed" "$tree/flowerbed"
for pkg in certs superlink supernode serverapp clientapp deploy; do
  ln -s "$PWD/$pkg" "$tree/flowerbed/$pkg"
done
ln -s "$PWD/benchmarks" "$tree/benchmarks"
cd "$tree" && python -m mypy --config-file ../../pyproject.toml -p flowerbed -p benchmarks
