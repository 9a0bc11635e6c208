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
  # One test at a time: on this 2-core machine the suite keeps one core busy on average, and two or
  # three workers starved tests of their round timeouts (2 workers: the 38 longest tests in 26 min
  # instead of 46, but 4 of them failed; 3 workers: load 8-10, slower still). Longest first.
  python -m pytest -p no:cacheprovider --durations=20 "$@"
else
  # FLOWERBED_TEST_WORKERS=N (for more cores): the CPU-bound tests and the tests that measure seconds
  # share one lane, one at a time (tests/conftest.py ONE_LANE); a module's shared coordinator stays on
  # one worker; the longest units start first (docs/test-durations.json).
  python -m pytest -p no:cacheprovider -n "$workers" --dist loadgroup --no-loadscope-reorder \
    --durations=20 "$@"
fi
