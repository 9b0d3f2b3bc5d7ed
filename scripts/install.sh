#!/usr/bin/env bash
# Installs icaserve into the current Python. `--test` adds the test tools and Prometheus.
# torch is pinned first: an unpinned torch pulls gigabytes of CUDA packages on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

"$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
  || "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"

if [[ "${1:-}" == "--test" ]]; then
  "$PY" -m pip install -q -e ".[test]"
  # The observability tests run a real Prometheus server (Debian's package) on loopback.
  if ! command -v prometheus >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
      apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
    else
      echo "note: 'prometheus' not installed (needs apt-get as root); its test will be skipped" >&2
    fi
  fi
else
  "$PY" -m pip install -q -e .
fi
