#!/usr/bin/env bash
# README command 2: set up, then lint, type-check and run the whole test suite (pytest).
#   bash scripts/test.sh            the whole suite: two tests at a time, then the solo ones alone
#                                   (FLOWERBED_TEST_WORKERS=N: N at a time; 1: one at a time)
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
  python -m pytest -p no:cacheprovider -m "not federation" -n "$workers" --durations=20 "$@"
elif [[ $workers == 1 ]]; then
  python -m pytest -p no:cacheprovider --durations=20 "$@"  # one test at a time
else
  # Two phases, one session (tests/durations.py adds them up): every test but the solo ones on
  # $workers pytest-xdist workers (a module's shared coordinator stays on one worker, the longest
  # units start first), then the solo tests (marker `solo`, tests/conftest.py SOLO: they keep both
  # cores busy) one at a time. A phase that selects no test (exit 5) is no failure.
  export FLOWERBED_TEST_SESSION="${FLOWERBED_TEST_SESSION:-$$-$(date +%s)}"
  status=0
  python -m pytest -p no:cacheprovider -n "$workers" --dist loadgroup --no-loadscope-reorder -m "not solo" \
    --durations=20 "$@" || status=$?
  [[ $status == 5 ]] && status=0
  solo=0
  python -m pytest -p no:cacheprovider -m solo --durations=10 "$@" || solo=$?
  [[ $solo == 5 ]] && solo=0
  exit $(( status != 0 ? status : solo ))
fi
