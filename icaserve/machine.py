"""What machine a measurement ran on: benchmarks and reports name it beside every number."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (a
    container's `--cpus` or a Kubernetes CPU limit, which the affinity mask does not show)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def machine_info() -> dict:
    import torch

    usable = usable_cpus()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "gpu": gpu,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg": load,
    }


def machine_line(info: dict | None = None) -> str:
    """One line for a table caption: CPU, cores, GPU, torch and Python versions."""
    i = info or machine_info()
    gpu = f", GPU {i['gpu']}" if i.get("gpu") else ", no GPU"
    return f"{i['cpu']}, {i['cores']} cores{gpu}, torch {i['torch']}, Python {i['python']}"
