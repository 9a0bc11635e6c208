#!/usr/bin/env bash
# README command 2: set up, then lint, type-check and run the whole test suite (pytest).
#   bash scripts/test.sh            the whole suite, tests that mostly wait run concurrently (pytest-xdist)
#   bash scripts/test.sh --quick    lint, types and every test that starts no federation (marker
#                                   `federation`): the edit-test loop, a few minutes
# Other arguments go to pytest (e.g. a test file). FLOWERBED_TEST_WORKERS sets the number of workers.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
if [[ "${1:-}" == "--quick" ]]; then
  quick=1
  shift
fi
if [[ $quick == 0 || ! -x .venv/bin/python ]]; then
  bash scripts/setup.sh --dev
fi
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
ruff format --check .
bash scripts/typecheck.sh
if [[ $quick == 1 ]]; then
  python -m pytest -p no:cacheprovider -m "not federation" -n "${FLOWERBED_TEST_WORKERS:-2}" --durations=20 "$@"
else
  # Three workers on two cores: most tests wait on real processes (rounds, timeouts, link cuts);
  # the longest start first (docs/test-durations.json), a module's shared coordinator stays on one worker.
  python -m pytest -p no:cacheprovider -n "${FLOWERBED_TEST_WORKERS:-3}" --dist loadgroup --no-loadscope-reorder \
    --durations=20 "$@"
fi
