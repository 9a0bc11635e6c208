#!/usr/bin/env bash
# README command 2: set up, then lint, type-check and run the whole test suite (pytest).
#   bash scripts/test.sh            the whole suite, two tests at a time (FLOWERBED_TEST_WORKERS=N: N at
#                                   once; 1: one test at a time)
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
workers="${FLOWERBED_TEST_WORKERS:-2}"
if [[ $quick == 1 ]]; then
  python -m pytest -p no:cacheprovider -m "not federation" -n "${FLOWERBED_TEST_WORKERS:-2}" --durations=20 "$@"
elif [[ $workers == 1 ]]; then
  python -m pytest -p no:cacheprovider --durations=20 "$@"
else
  # The suite keeps one of two cores busy on average (process start-up, training), so two tests run
  # at once (three starved each other: load 8-10, timeouts). The CPU-bound tests and the tests that measure seconds share one lane, one at a time
  # (tests/conftest.py ONE_LANE): beside each other they starved the timing tests' sites. A module's
  # shared coordinator stays on one worker; the longest units start first (docs/test-durations.json).
  python -m pytest -p no:cacheprovider -n "$workers" --dist loadgroup --no-loadscope-reorder \
    --durations=20 "$@"
fi
