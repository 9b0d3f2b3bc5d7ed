#!/usr/bin/env bash
# Fills gpu_wheels/ (git-ignored) with the wheels scripts/gpu_check.sh installs on a lent GPU
# machine, which has Python 3.12 and a CUDA torch but no package registry: what the service and
# tests/test_cuda.py import besides torch, at the versions in requirements/lock.txt, as CPython 3.12
# x86-64 Linux wheels (httptools: the server's HTTP protocol builds on uvicorn's httptools one; typer at
# the lock's version for the CLI). No torch and no ONNX packages (the CUDA tests need neither), so the folder
# stays well under the 64 MiB that may travel to that machine.
#
#   bash scripts/gpu_wheels.sh            # then hand gpu_wheels/ to the GPU run (carry it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LOCK=requirements/lock.txt
DEST=gpu_wheels
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Distribution names, with everything they need that a bare CUDA-torch install lacks.
PACKAGES=(
  fastapi starlette annotated-doc typing-inspection opentelemetry-api anyio idna
  uvicorn h11 click httptools
  typer shellingham
  pydantic pydantic-core annotated-types typing-extensions
  pydantic-settings python-dotenv
  orjson python-json-logger prometheus-client
  httpx httpcore certifi
  rich markdown-it-py mdurl pygments
  pytest pytest-timeout iniconfig pluggy packaging
  numpy
  captum tqdm matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil tzdata
)

specs=()
for name in "${PACKAGES[@]}"; do
  version=$(awk -v n="$name" 'tolower($1) ~ "^" n "==" { sub(/^[^=]*==/, "", $1); print $1; exit }' "$LOCK")
  [[ -n "$version" ]] || { echo "gpu_wheels: $name is not in $LOCK" >&2; exit 1; }
  specs+=("$name==$version")
done

PLATFORM=(--only-binary=:all: --implementation cp --python-version 3.12
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p "$DEST"
# --no-deps: exactly the lock's versions; captum would otherwise pull a torch wheel.
"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$DEST" "${specs[@]}"

# The set must be closed: every dependency of every wheel is in it (torch aside, which the GPU
# machine has). A dry run resolves all but captum (it needs torch) from the folder alone.
check=()
for spec in "${specs[@]}"; do [[ "$spec" == captum==* ]] || check+=("$spec"); done
"$PY" -m pip install -q --dry-run --ignore-installed --no-index --find-links "$DEST" \
  "${PLATFORM[@]}" --target "$(mktemp -d)" "${check[@]}"
echo "gpu_wheels: $(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST/"
