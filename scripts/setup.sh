#!/usr/bin/env bash
# Install everything flowerbed needs on Debian/Ubuntu: nginx and python3-venv from Debian's
# packages (only if missing), then a virtual environment in .venv with CPU torch and the kit.
#   bash scripts/setup.sh            a coordinator: the kit alone (no test or lint tools)
#   bash scripts/setup.sh --demo     plus scikit-learn for the demo data
#   bash scripts/setup.sh --dev      plus the test tools (pytest, ruff, mypy) and iproute2,
#                                    nftables and tinyproxy for the multi-host tests
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
dev=0
case "${1:-}" in
  "") ;;
  --demo) extras="[demo]" ;;
  --dev) extras="[dev]"; dev=1 ;;
  --coordinator) ;;
  *) echo "setup: unknown option ${1} (use --demo or --dev, or nothing for a coordinator)" >&2; exit 2 ;;
esac
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
PY="${PYTHON:-python3}"
need=()
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then need+=(nginx-light); fi
if ! "$PY" -c "import venv, ensurepip" >/dev/null 2>&1; then need+=(python3-venv); fi
# The coordinator's processes end with their supervisor (setpriv --pdeathsig; util-linux on Debian 12+).
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
if [ "$dev" -eq 1 ]; then
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
  command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || need+=(nftables)
  command -v tinyproxy >/dev/null 2>&1 || [ -x /usr/bin/tinyproxy ] || need+=(tinyproxy)
  # A site clock that drifts after start (tests/test_clock.py): LD_PRELOAD of libfaketime.
  compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || need+=(libfaketime)
  # The evidence report is checked in a real headless browser (tests/test_report.py).
  command -v chromium-headless-shell >/dev/null 2>&1 || command -v chromium >/dev/null 2>&1 || need+=(chromium-headless-shell)
  # ... and printed to PDF, whose pages are drawn with pdftoppm.
  command -v pdftoppm >/dev/null 2>&1 || need+=(poppler-utils)
fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]} (apt-get)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  # The tests start their own tinyproxy inside a namespace; the package's service is not wanted.
  if [[ " ${need[*]} " == *" tinyproxy "* ]]; then $SUDO service tinyproxy stop >/dev/null 2>&1 || true; fi
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: flowerbed needs Python 3.11 or newer (set PYTHON=python3.11)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
# The CPU build of torch first: an open torch range alone would pull a multi-GB CUDA build. From
# PyTorch's CPU index where it answers within 5 s; else from the default index, said in one line.
cpu_index="https://download.pytorch.org/whl/cpu"
torch_from=()
if .venv/bin/python -c "import urllib.request as u; u.urlopen('$cpu_index/torch/', timeout=5)" >/dev/null 2>&1; then
  torch_from=(--index-url "$cpu_index")
  echo "setup: installing torch 2.13.0 (CPU build) from $cpu_index"
else
  echo "setup: $cpu_index is not reachable: torch 2.13.0 comes from the default index (this machine's has the" \
    "CPU build; a public PyPI gives Linux the CUDA build of several GB)"
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 "${torch_from[@]}"
echo "setup: installing flowerbed into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check "setuptools>=68" wheel
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
# The editable install's own modules compiled once (with PYTHONDONTWRITEBYTECODE set, as on some CI
# machines, every process the kit starts would compile them again: 0.3 s of CPU each).
.venv/bin/python -m compileall -q -j 0 certs clientapp deploy flowerbed serverapp superlink supernode >/dev/null
.venv/bin/flowerbed --version
