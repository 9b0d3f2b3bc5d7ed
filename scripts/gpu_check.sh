#!/usr/bin/env bash
# The GPU checks in one prepared run (under 8 minutes), for a lent GPU machine: Python 3.12 with a
# CUDA torch and no package registry. It prints the GPU (nvidia-smi) and the torch / CUDA / cuDNN /
# NCCL versions, installs from gpu_wheels/ (filled here by scripts/gpu_wheels.sh) whatever the tests
# import that is missing or at another version than requirements/lock.txt's, runs the CUDA tests
# (`pytest -m cuda -v`, tests/test_cuda.py) and then benchmarks/bench_gpu.py: ICA forward +
# input-gradient on CUDA vs its step-by-step definition and vs the CPU, the shipped model's batches
# in-process, and a real server with ICASERVE_DEVICE=cuda beside a CPU one (it writes gpu.json;
# `python benchmarks/bench_gpu.py --render gpu.json` puts its tables into BENCHMARKS.md).
# Everything printed also goes to $OUT/gpu_check.log (with junit.xml, nvidia-smi.txt, gpu.json and
# bench_gpu.txt beside it) when OUT is set, else to a fresh folder under /tmp.
#
#   bash scripts/gpu_check.sh                      # on the lent machine: carry gpu_wheels/, timeout ~540 s
#   GPU_CHECK_BENCH=0 bash scripts/gpu_check.sh     # without the benchmark
#   GPU_CHECK_INSTALL=0 ...                         # only say what would be installed
#
# Exit status: that of the tests (the benchmark and pip only report).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

main() {
started=$SECONDS

step "GPU"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi 2>&1 | tee "$OUT_DIR/nvidia-smi.txt"
else
  echo "nvidia-smi: not found"
fi

step "versions"
"$PY" - <<'EOF'
import platform

import torch

print("python", platform.python_version(), "|", platform.platform())
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print("CUDA available:", torch.cuda.is_available(), "| GPUs:", n, [torch.cuda.get_device_name(i) for i in range(n)])
if n:
    print("NCCL", torch.cuda.nccl.version(), "| capability", torch.cuda.get_device_capability(0))
EOF

step "dependencies"
if [[ -d gpu_wheels ]]; then
  # wheels whose distribution is missing here, or installed at another version
  mapfile -t wanted < <("$PY" - <<'EOF'
import importlib.metadata as md
import pathlib
import re

for whl in sorted(pathlib.Path("gpu_wheels").glob("*.whl")):
    dist, version = whl.name.split("-")[:2]
    try:
        have = md.version(dist)
    except md.PackageNotFoundError:
        have = None
    if have is None or re.sub(r"\+.*", "", have) != version:
        print(whl)
EOF
)
  if (( ${#wanted[@]} == 0 )); then
    echo "everything in gpu_wheels/ is installed already"
  elif [[ "${GPU_CHECK_INSTALL:-1}" == 0 ]]; then
    printf 'would install: %s\n' "${wanted[@]}"
  else
    # the folder is a closed set at the lock's versions (torch aside): no resolution needed
    "$PY" -m pip install -q --no-index --find-links gpu_wheels/ --no-deps "${wanted[@]}" || echo "pip install failed"
  fi
else
  echo "no gpu_wheels/ folder: using what is installed"
fi
"$PY" - <<'EOF'
import importlib

for mod in ("numpy", "pydantic", "pydantic_settings", "fastapi", "uvicorn", "orjson", "httpx", "prometheus_client",
            "pythonjsonlogger", "rich", "captum", "pytest", "httptools", "typer"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod:18} {getattr(m, '__version__', 'ok')}")
    except Exception as exc:  # report, do not stop: the tests say what they miss
        print(f"{mod:18} MISSING ({type(exc).__name__}: {exc})")
EOF

step "CUDA tests"
timeout 360 "$PY" -m pytest -m cuda -v -rs -p no:cacheprovider --junitxml "$OUT_DIR/junit.xml" \
  ${GPU_CHECK_TESTS:-tests/test_cuda.py}
tests_rc=$?
echo "pytest exit status: $tests_rc"

if [[ "${GPU_CHECK_BENCH:-1}" != 0 ]]; then
  step "benchmarks/bench_gpu.py (ICA, the shipped model and a real server, CUDA beside the CPU)"
  PYTHONUNBUFFERED=1 timeout "${GPU_CHECK_BENCH_TIMEOUT:-240}" "$PY" benchmarks/bench_gpu.py --out "$OUT_DIR" \
    2>&1 | tee "$OUT_DIR/bench_gpu.txt"
  echo "benchmark exit status: ${PIPESTATUS[0]}"
fi

step "done"
echo "tests: exit $tests_rc; $((SECONDS - started)) s in all; outputs in $OUT_DIR"
return "$tests_rc"
}

main 2>&1 | tee -a "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
