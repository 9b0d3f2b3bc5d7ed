"""Prometheus metrics: one prefix (`icaserve_`), base units in names, bounded label sets.

Every family the service exposes is defined here (README, "Operators", lists them). Labels only
take values from bounded sets: route templates (never raw paths), status codes, error kinds,
model names and versions that are loaded, the two queues, attribution methods, worker pids.

Several worker processes (`icaserve serve --workers N`): the `serve` command sets and wipes
PROMETHEUS_MULTIPROC_DIR before the workers start, each worker writes its values to files there,
and every scrape merges all workers' files into a fresh registry, so counters and histograms are
totals over workers whichever worker answers. Gauges say how to merge (`multiprocess_mode`);
the `live*` ones drop a worker's values once it is dead: each scrape finds the pids that wrote
files, and removes the live-gauge files of those that are gone (`mark_process_dead`), so a
killed worker's in-flight requests or queue entries do not linger. Counter files of dead workers
stay, so totals never go backwards.

Process metrics (CPU, memory, file descriptors) come per live worker, labelled by `pid`, read
from /proc by whichever worker answers the scrape: prometheus_client's default process collector
would report only the answering worker, and is absent in multiprocess mode.
"""

from __future__ import annotations

import functools
import glob
import os
import re
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

PREFIX = "icaserve"
# Sub-millisecond predictions to multi-second explanations.
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)
BATCH_BUCKETS = tuple(2**k for k in range(13))  # 1 ... 4096, the largest ICASERVE_MAX_BATCH_SIZE
QUEUES = ("predict", "explain")
# Probes and scrapes: not counted as requests, not in flight (a scrape would otherwise count itself).
UNCOUNTED_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


def _multiproc_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


if _multiproc_dir():
    # Live gauges left by an earlier, dead process with this pid would be read back as ours.
    multiprocess.mark_process_dead(os.getpid())

# The service's own registry: exactly the families below, in both single- and multi-process mode.
REGISTRY = CollectorRegistry(auto_describe=True)
disable_created_metrics()  # no `_created` series: multiprocess mode has none either

REQUESTS = Counter(f"{PREFIX}_requests_total", "HTTP requests answered, by endpoint (route template), model, "
                   "version and status code.", ["endpoint", "model", "version", "status"], registry=REGISTRY)
ERRORS = Counter(f"{PREFIX}_errors_total", "Error responses by kind (the `code` of the error body).", ["kind"],
                 registry=REGISTRY)
REQUEST_SECONDS = Histogram(f"{PREFIX}_request_duration_seconds", "Whole-request latency by endpoint.",
                            ["endpoint"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
QUEUE_WAIT_SECONDS = Histogram(f"{PREFIX}_queue_wait_seconds", "Time a request waited in its batching queue.",
                               ["queue"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
COMPUTE_SECONDS = Histogram(f"{PREFIX}_model_compute_seconds", "Model time of one merged batch.", ["queue"],
                            buckets=LATENCY_BUCKETS, registry=REGISTRY)
BATCH_SIZE = Histogram(f"{PREFIX}_batch_size", "Sequences in one merged batch.", ["queue"], buckets=BATCH_BUCKETS,
                       registry=REGISTRY)
QUEUE_DEPTH = Gauge(f"{PREFIX}_queue_depth", "Requests waiting per queue (summed over live workers).", ["queue"],
                    multiprocess_mode="livesum", registry=REGISTRY)
IN_FLIGHT = Gauge(f"{PREFIX}_requests_in_flight", "Requests being handled (summed over live workers; probes "
                  "and scrapes excluded).", multiprocess_mode="livesum", registry=REGISTRY)
EXPLANATIONS = Counter(f"{PREFIX}_explanations_total", "Sequences explained, by attribution method.", ["method"],
                       registry=REGISTRY)
EXPLAIN_SECONDS = Histogram(f"{PREFIX}_explain_duration_seconds", "Whole successful explain-request latency by "
                            "attribution method.", ["method"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
MODEL_LOADED = Gauge(f"{PREFIX}_model_loaded", "1 for each model version loaded and serving (0 once retired).",
                     ["model", "version", "backend", "device"], multiprocess_mode="livemax", registry=REGISTRY)
MODEL_LOAD_FAILURES = Counter(f"{PREFIX}_model_load_failures_total", "Model versions refused at load or reload, "
                              "by reason (exception type).", ["model", "reason"], registry=REGISTRY)
MODEL_LOADS = Counter(f"{PREFIX}_model_loads_total", "Model versions loaded (read, verified, warmed up), by why: "
                      "`startup`, `new_version` (a poll or reload found it), `pinned` (a request named a version "
                      "not loaded).", ["model", "reason"], registry=REGISTRY)
STORE_SCANS = Counter(f"{PREFIX}_model_store_scans_total", "Looks at the store for new versions (start-up, polls, "
                      "POST /admin/reload).", registry=REGISTRY)
LAST_RELOAD = Gauge(f"{PREFIX}_model_last_reload_timestamp_seconds", "Unix time of the last successful model "
                    "version (re)load.", multiprocess_mode="max", registry=REGISTRY)
GPU_MEMORY = Gauge(f"{PREFIX}_gpu_memory_allocated_bytes", "CUDA memory allocated by torch tensors (0 on CPU).",
                   multiprocess_mode="liveall", registry=REGISTRY)
GPU_MEMORY_RESERVED = Gauge(f"{PREFIX}_gpu_memory_reserved_bytes", "CUDA memory held by torch's caching "
                            "allocator (0 on CPU).", multiprocess_mode="liveall", registry=REGISTRY)

# Known label values exist from the start, so dashboards show 0 rather than "no data".
for _queue in QUEUES:
    QUEUE_DEPTH.labels(_queue)


class WorkerProcessCollector(Collector):
    """`icaserve_process_*` (CPU seconds, resident and virtual memory, start time, open and max
    file descriptors) for every live worker, labelled by pid."""

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for pid in live_worker_pids():
            reader = ProcessCollector(namespace=PREFIX, pid=lambda pid=pid: pid, registry=None)
            for family in reader.collect():
                out = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for s in family.samples:
                    out.add_sample(s.name, {**s.labels, "pid": str(pid)}, s.value)
        return list(families.values())


_DB_FILE = re.compile(r"_(\d+)\.db$")


@functools.lru_cache(maxsize=4096)  # bounded: routes x models x versions x statuses seen
def request_counter(endpoint: str, model: str, version: str, status: int) -> Any:
    """REQUESTS' child for these labels, looked up once (`labels()` costs a locked lookup per call)."""
    return REQUESTS.labels(endpoint, model, version, str(status))


@functools.lru_cache(maxsize=256)
def request_seconds(endpoint: str) -> Any:
    """REQUEST_SECONDS' child for `endpoint`, looked up once."""
    return REQUEST_SECONDS.labels(endpoint)


def _is_live_sibling(pid: int) -> bool:
    """A live worker of this server: running (not a zombie) and, where /proc tells, a child of
    our parent, so a dead worker's pid reused by an unrelated process does not count."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return True  # no /proc: alive is all we can tell
    return state not in (b"Z", b"X") and int(ppid) == os.getppid()


def live_worker_pids() -> list[int]:
    """Pids of the live workers (this process alone outside multiprocess mode). A dead worker's
    live-gauge files are removed, so its in-flight requests and queue entries stop counting."""
    me = os.getpid()
    path = _multiproc_dir()
    if path is None:
        return [me]
    pids = {me}
    for name in glob.glob(os.path.join(path, "*.db")):
        m = _DB_FILE.search(name)
        if m:
            pids.add(int(m.group(1)))
    live = []
    for pid in sorted(pids):
        if pid == me or _is_live_sibling(pid):
            live.append(pid)
        elif glob.glob(os.path.join(path, f"gauge_live*_{pid}.db")):
            multiprocess.mark_process_dead(pid, path)
    return live


REGISTRY.register(WorkerProcessCollector())


def sample_gpu() -> None:
    """This worker's CUDA memory; cheap, and a no-op until CUDA is in use."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        GPU_MEMORY.set(torch.cuda.memory_allocated())
        GPU_MEMORY_RESERVED.set(torch.cuda.memory_reserved())


def render() -> tuple[bytes, str]:
    """The exposition text for a scrape, merged over workers in multiprocess mode."""
    sample_gpu()
    if _multiproc_dir() is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    live_worker_pids()  # reap dead workers' live gauges before their files are read
    multiprocess.MultiProcessCollector(registry)
    registry.register(WorkerProcessCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
