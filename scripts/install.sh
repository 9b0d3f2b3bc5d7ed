#!/usr/bin/env bash
# Installs icaserve into its own virtual environment (.venv, or $ICASERVE_VENV), so packages that
# a machine already holds can neither hide a broken install nor conflict with ours.
# `--test` adds the test tools, Prometheus and Chromium.
# Every dependency comes from requirements/lock.txt (constraints), so a fresh machine gets the
# versions the suite was last run with; scripts/lock.sh regenerates it. torch is pinned there too
# and installed first: an unpinned torch pulls gigabytes of CUDA packages on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ICASERVE_VENV:-.venv}"
LOCK=requirements/lock.txt
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
PY="$VENV/bin/python"

"$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
  || "$PY" -m pip install -q -c "$LOCK" "torch==2.13.0"

if [[ "${1:-}" == "--test" ]]; then
  "$PY" -m pip install -q -c "$LOCK" -e ".[test]"
  # The observability tests run a real Prometheus server (Debian's package) on loopback.
  if ! command -v prometheus >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
      apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
    else
      echo "note: 'prometheus' not installed (needs apt-get as root); its test will be skipped" >&2
    fi
  fi
  # The viewer's browser test (tests/test_viewer.py) drives Debian's Chromium headless through
  # playwright; no browser is downloaded (never `playwright install`).
  if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
      apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      echo "note: 'chromium' not installed (needs apt-get as root); the viewer's browser test will be skipped" >&2
    fi
  fi
else
  "$PY" -m pip install -q -c "$LOCK" -e .
fi
# The environment holds only what the lock gave it; pip check confirms the set is consistent.
"$PY" -m pip check >/dev/null || { "$PY" -m pip check; exit 1; }
echo "installed into $VENV (activate with: . $VENV/bin/activate)" >&2
