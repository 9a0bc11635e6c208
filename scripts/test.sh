#!/usr/bin/env bash
# README command 2: set up, then lint, type-check and run the whole test suite (pytest).
#   bash scripts/test.sh            the whole suite, one test at a time (FLOWERBED_TEST_WORKERS=N: N at once)
#   bash scripts/test.sh --quick    lint, types and every test that starts no federation (marker
#                                   `federation`): the edit-test loop, a few minutes
# Other arguments go to pytest (e.g. a test file).
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
workers="${FLOWERBED_TEST_WORKERS:-1}"
if [[ $quick == 1 ]]; then
  python -m pytest -p no:cacheprovider -m "not federation" -n "${FLOWERBED_TEST_WORKERS:-2}" --durations=20 "$@"
elif [[ $workers == 1 ]]; then
  # One test at a time: the fault and absence tests measure seconds, and on two cores a concurrent
  # CPU-bound test starves their sites (a 137-row round took 90 s and the tests failed). Longest first.
  python -m pytest -p no:cacheprovider --durations=20 "$@"
else
  # FLOWERBED_TEST_WORKERS=N: N workers; a module's shared coordinator and the CPU-bound tests stay on
  # one worker each, the longest units start first (docs/test-durations.json). Needs more cores.
  python -m pytest -p no:cacheprovider -n "$workers" --dist loadgroup --no-loadscope-reorder \
    --durations=20 "$@"
fi
