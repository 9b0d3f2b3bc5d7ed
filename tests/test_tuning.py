"""icaserve.tuning: the raised malloc thresholds keep freed large blocks in the process, and
release_free_memory hands them back (what keeps `icaserve evaluate` within bounds; tuning.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from icaserve.tuning import release_free_memory, tune_malloc

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

tuned = tune_malloc()
blocks = [np.ones(50 * 2**20 // 8) for _ in range(8)]  # 400 MB in 50 MB blocks, pages touched
keep = np.ones(1000)  # a later allocation, so the freed blocks are not only the heap's top
del blocks
after_free = rss_mb()
release_free_memory()
print(json.dumps({"tuned": tuned, "after_free": after_free, "after_release": rss_mb()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_release_free_memory_returns_what_the_tuned_heap_keeps() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    if not r["tuned"]:
        pytest.skip("not glibc: nothing to tune")
    assert r["after_free"] - r["after_release"] > 300, r  # the 400 MB went back to the kernel
