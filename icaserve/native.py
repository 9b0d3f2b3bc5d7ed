"""Small C kernels of this package, compiled on first use and loaded with ctypes.

Used where a measurement showed stock torch / numpy / orjson calls leave most of the time on the
table (training/hop_sum.c: ICA's hop sum; service/tensor_json.c: a JSON body's tensors). Each is a
plain C file with no Python or torch headers, so building it takes a fraction of a second with the
system compiler (`cc -O3 -march=native -fopenmp-simd`, no threads) into a per-user cache
(`ICASERVE_KERNEL_DIR`, else `$XDG_CACHE_HOME/icaserve` or `~/.cache/icaserve`), named by a hash of
the source, the flags, the compiler and the CPU's model and flags: a cache copied to another CPU is
rebuilt rather than run with instructions that CPU lacks. Concurrent first uses (several workers)
each build to a temporary name and rename it into place. Without a compiler, or when the build
fails, `load` returns None and the caller keeps its stock path (one warning per kernel).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("icaserve.native")

CFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC")


def _cpu_identity() -> str:
    """The CPU's model name and flags (what -march=native compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(lines))  # one copy of each distinct line


def _cache_dir() -> Path:
    given = os.environ.get("ICASERVE_KERNEL_DIR")
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "icaserve"


def _build(source: Path, compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(CFLAGS), version, _cpu_identity(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *CFLAGS, "-o", tmp, str(source)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:500]}")
        os.replace(tmp, target)  # atomic: a concurrent build's file is equal
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(source: Path, what: str, switch: str, functions: dict[str, list[Any]]) -> ctypes.CDLL | None:
    """The compiled `source` (built on first use), each of its `functions` given its argument types
    and an int status result; None when the environment variable `switch` is 0/false/no/off, or,
    with one warning naming `what` runs on the stock path, when it cannot be built or loaded."""
    if os.environ.get(switch, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: %s runs on the stock path", what)
        return None
    try:
        lib = ctypes.CDLL(str(_build(source, compiler)))
        for name, argtypes in functions.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        return lib
    except Exception as exc:  # a failed build or load: the stock path gives the same answers
        log.warning("%s: the C kernel is unavailable (%s); the stock path runs", what, exc)
        return None
