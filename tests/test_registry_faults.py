"""The model registry and the batching queues under version churn (service/registry.py,
service/batching.py), against real servers on loopback where the fault is in the server:

- a version folder copied under another number (its manifest names the old one) is refused once,
  with that reason, and not reloaded on every poll; it loads once its manifest is fixed;
- a version refused while its model.ts was still being written is retried when the file is
  complete (poller), and on POST /admin/reload (polling off), also when its files look unchanged;
- the explain queue bound holds per model while a new version is swapped in under requests that
  were routed to the old one;
- versions named by requests stay loaded (least recently used dropped, bounded by
  ICASERVE_MAX_VERSIONS_LOADED), also across a swap: loads are counted by
  `icaserve_model_loads_total`;
- expired or abandoned batch jobs leave no "Future exception was never retrieved", and an
  `Expired` raised by the compute fails its batch without a traceback;
- `icaserve serve --workers 2`: one POST /admin/reload reaches both workers.

Synchronisation is by polling observable state (metrics, /models) with generous bounds.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import pytest

from conftest import N_FEATURES, READY_TIMEOUT_S, REPO, free_port, metric, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ADMIN_KEY = "admin-key-registry"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


# -- helpers ---------------------------------------------------------------------------------------


def seq(t: int, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(t, N_FEATURES)).round(4).tolist()




def scrape(c: httpx.Client, sample: str, **labels: str) -> float:
    return metric(c.get("/metrics").text, sample, **labels)




def serving_version(c: httpx.Client, name: str) -> int | None:
    return c.get(f"/models/{name}").json()["serving_version"]


def copy_version_as(store: Path, name: str, source: int, new: int, *, fix_manifest: bool = True,
                    source_name: str | None = None) -> Path:
    """`cp -r <source_name>/<source> .stage && mv .stage <name>/<new>`; with `fix_manifest` (as a
    correct publisher would) the manifest names `name` and `new`. Whole, with one rename."""
    stage = store / f".stage-{name}-{new}"
    shutil.copytree(store / (source_name or name) / str(source), stage)
    if fix_manifest:
        path = stage / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest.update(name=name, version=new)
        path.write_text(json.dumps(manifest))
    (store / name).mkdir(exist_ok=True)
    return stage.rename(store / name / str(new))


def half_written_version(store: Path, name: str, source: int, new: int) -> tuple[Path, bytes]:
    """Version `new` as a copy of `source` whose model.ts is only half there yet (manifest last,
    so the first look at the folder sees the half file). Returns the folder and the missing half."""
    vdir = store / name / str(new)
    vdir.mkdir()
    src = store / name / str(source)
    data = (src / "model.ts").read_bytes()
    (vdir / "model.ts").write_bytes(data[: len(data) // 2])
    if (src / "model.onnx").exists():
        shutil.copyfile(src / "model.onnx", vdir / "model.onnx")
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["version"] = new
    (vdir / ".manifest.tmp").write_text(json.dumps(manifest))
    (vdir / ".manifest.tmp").rename(vdir / "manifest.json")
    return vdir, data[len(data) // 2:]


def loads(c: httpx.Client, name: str, reason: str | None = None) -> float:
    labels = {"model": name} if reason is None else {"model": name, "reason": reason}
    return scrape(c, "icaserve_model_loads_total", **labels)


def failures(c: httpx.Client, name: str, reason: str | None = None) -> float:
    labels = {"model": name} if reason is None else {"model": name, "reason": reason}
    return scrape(c, "icaserve_model_load_failures_total", **labels)


# -- one server with a fast poller: copied and half-written versions ------------------------------


@pytest.fixture(scope="module")
def polling_server(server_factory, copy_store):
    server = server_factory(copy_store(), {"POLL_INTERVAL_S": 0.2})
    yield server
    server.stop()


def test_copied_version_is_refused_once_not_reloaded_every_poll(polling_server):
    """Item 9: `cp -r ica/1 .stage && mv .stage ica/3`: the manifest says version 1. Before, the
    copy loaded as "version 1" on every poll (a new latest each time) and served as version 1."""
    server, store = polling_server, polling_server.store
    with server.client() as c:
        assert serving_version(c, "ica") == 2
        loads_before, failed_before = loads(c, "ica"), failures(c, "ica")
        copy_version_as(store, "ica", 1, 3, fix_manifest=False)
        wait_for(lambda: failures(c, "ica", "ManifestError") >= 1, 30, "the copy's refusal", server)
        scans = scrape(c, "icaserve_model_store_scans_total")
        wait_for(lambda: scrape(c, "icaserve_model_store_scans_total") >= scans + 10, 30, "ten more polls", server)
        # refused once, not loaded, not retried while its files stay as they are
        assert failures(c, "ica") == failed_before + 1
        assert loads(c, "ica") == loads_before
        one = c.get("/models/ica").json()
        assert one["serving_version"] == 2 and one["versions"] == [1, 2, 3], one
        assert "does not match its folder" in one["refused"]["3"], one
        text = c.get("/metrics").text
        assert metric(text, "icaserve_model_loaded", model="ica", version="3") == 0
        r = c.post("/models/ica/predict", json={"inputs": [seq(8)]})
        assert r.status_code == 200 and r.json()["version"] == 2, r.text
        r = c.post("/models/ica/versions/3/predict", json={"inputs": [seq(8)]})  # by number: refused, no load
        assert r.status_code == 503 and r.json()["code"] == "not_ready", r.text
        assert "does not match its folder" in r.json()["error"]
        assert loads(c, "ica") == loads_before
        # fixing the manifest changes the folder's files: retried, and served as version 3
        manifest = store / "ica" / "3" / "manifest.json"
        fixed = {**json.loads(manifest.read_text()), "version": 3}
        (store / "ica" / ".manifest-3").write_text(json.dumps(fixed))  # outside the folder, then one rename
        (store / "ica" / ".manifest-3").rename(manifest)
        wait_for(lambda: serving_version(c, "ica") == 3, 30, "the fixed version to serve", server)
        assert loads(c, "ica", "new_version") == 1 and loads(c, "ica") == loads_before + 1
        assert failures(c, "ica") == failed_before + 1
        r = c.post("/models/ica/predict", json={"inputs": [seq(8)]})
        assert r.status_code == 200 and r.json()["version"] == 3, r.text


def test_half_written_version_is_retried_once_complete(polling_server):
    """Item 10 (poller): a version whose model.ts was still being written is refused (checksum);
    before, it stayed refused after the file was complete, until a restart."""
    server, store = polling_server, polling_server.store
    with server.client() as c:
        assert serving_version(c, "lstm") == 1
        failed_before = failures(c, "lstm")
        vdir, rest = half_written_version(store, "lstm", 1, 2)
        wait_for(lambda: failures(c, "lstm", "ChecksumMismatch") >= 1, 30, "the half file's refusal", server)
        scans = scrape(c, "icaserve_model_store_scans_total")
        wait_for(lambda: scrape(c, "icaserve_model_store_scans_total") >= scans + 5, 30, "five more polls", server)
        assert failures(c, "lstm") == failed_before + 1  # unchanged files: not retried
        assert serving_version(c, "lstm") == 1
        with open(vdir / "model.ts", "ab") as f:  # the writer finishes
            f.write(rest)
        wait_for(lambda: serving_version(c, "lstm") == 2, 30, "the completed version to serve", server)
        assert loads(c, "lstm", "new_version") == 1
        assert c.get("/models/lstm").json()["refused"] == {}


# -- one server, polling off, with the admin API: reload, queue bound, pinned versions ------------

QUEUE = 2  # ICASERVE_EXPLAIN_QUEUE_SIZE


@pytest.fixture(scope="module")
def admin_server(server_factory, copy_store):
    store = copy_store()
    # a model of its own for the pinned-versions test (copies of the plain LSTM: quick to load)
    for v in (1, 2):
        copy_version_as(store, "pin", 1, v, source_name="lstm")
    server = server_factory(store, {"ADMIN_KEY": ADMIN_KEY, "EXPLAIN_QUEUE_SIZE": QUEUE, "MAX_BATCH_SIZE": 1,
                                    "MAX_VERSIONS_LOADED": 3, "DEFAULT_MODEL": "ica"})
    yield server
    server.stop()


def test_admin_reload_retries_a_refused_version(admin_server):
    """Item 10 (admin): with polling off, POST /admin/reload retries a refused version."""
    server, store = admin_server, admin_server.store
    with server.client() as c:
        vdir, rest = half_written_version(store, "lstm", 1, 2)
        r = c.post("/admin/reload", headers=ADMIN)
        assert r.status_code == 200 and r.json()["serving"]["lstm"] == 1, r.text
        assert "checksum" in r.json()["refused"]["lstm/2"].lower(), r.json()
        with open(vdir / "model.ts", "ab") as f:
            f.write(rest)
        r = c.post("/admin/reload", headers=ADMIN)
        assert r.status_code == 200 and r.json()["serving"]["lstm"] == 2, r.text
        assert "lstm/2" not in r.json()["refused"]
        r = c.post("/models/lstm/predict", json={"inputs": [seq(8)]})
        assert r.status_code == 200 and r.json()["version"] == 2, r.text


def send_head_and_half(port: int, path: str, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body[: len(body) // 2])
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict]:
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(payload)


def test_explain_queue_bound_holds_across_a_swap(admin_server):
    """Item 11: ten /explain requests routed to version 2, whose bodies arrive after version 3
    was swapped in. Before, the retired version's closed batcher ran each of them in a thread of
    its own, outside any queue: all 10 answered 200. The bound is per model: one computing, QUEUE
    waiting, the rest 503."""
    server, store = admin_server, admin_server.store
    port = int(server.url.rsplit(":", 1)[1])
    # each request computes for a while (32 sequences of 64 steps, 256 IG steps: within the cost cap)
    body = json.dumps({"inputs": [seq(64, 500 + i) for i in range(32)], "method": "integrated_gradients",
                       "parameters": {"steps": 256}}).encode()
    socks: list[socket.socket] = []
    with server.client() as c:
        assert serving_version(c, "ica") == 2
        in_flight = scrape(c, "icaserve_requests_in_flight")
        try:
            for _ in range(10):
                socks.append(send_head_and_half(port, "/models/ica/explain", body))
            wait_for(lambda: scrape(c, "icaserve_requests_in_flight") >= in_flight + 10, 30,
                     "the ten requests to be in flight", server)
            assert c.get("/models/ica").status_code == 200  # the event loop went round: they are routed
            copy_version_as(store, "ica", 2, 3)
            r = c.post("/admin/reload", headers=ADMIN)
            assert r.status_code == 200 and r.json()["serving"]["ica"] == 3, r.text
            for sock in socks:  # the rest of every body, together
                sock.sendall(body[len(body) // 2:])
            answers = [read_response(sock) for sock in socks]
        finally:
            for sock in socks:
                sock.close()
        statuses = [status for status, _ in answers]
        assert set(statuses) <= {200, 503}, answers
        # one computing plus QUEUE waiting; a little slack in case the first finishes while bodies arrive
        assert 1 <= statuses.count(200) <= QUEUE + 3, statuses
        assert statuses.count(503) >= 10 - (QUEUE + 3), statuses
        for status, answer in answers:
            if status == 200:  # answered by the version it was routed to
                assert answer["version"] == 2 and len(answer["explanations"]) == 32
            else:
                assert answer["code"] == "overloaded", answer
        assert c.post("/explain", json={"inputs": [seq(8)]}).json()["version"] == 3  # and it recovers
    print(f"\n10 requests across a swap with an explain queue of {QUEUE}: {statuses}")


def test_pinned_versions_stay_loaded_across_requests_and_swaps(admin_server):
    """Item 12: requests naming versions; before, the version swapped out as latest was unloaded
    (the next request naming it reloaded it), and a version loaded for a request before the
    reload found it was loaded a second time."""
    server, store = admin_server, admin_server.store
    x = {"inputs": [seq(8, 7)]}

    def ask(c: httpx.Client, v: int) -> None:
        r = c.post(f"/models/pin/versions/{v}/predict", json=x)
        assert r.status_code == 200 and r.json()["version"] == v, r.text

    with server.client() as c:
        assert loads(c, "pin") == 1 and loads(c, "pin", "startup") == 1
        for _ in range(3):
            for v in (1, 2):
                ask(c, v)
        assert loads(c, "pin", "pinned") == 1  # version 1, once
        copy_version_as(store, "pin", 1, 3)
        ask(c, 3)  # named before a reload found it: loaded for the request
        assert loads(c, "pin", "pinned") == 2
        r = c.post("/admin/reload", headers=ADMIN)
        assert r.status_code == 200 and r.json()["serving"]["pin"] == 3, r.text
        assert loads(c, "pin", "new_version") == 0  # became the latest without a second load
        for _ in range(5):  # three versions, max_versions_loaded 3: all stay loaded
            for v in (1, 2, 3):
                ask(c, v)
        assert loads(c, "pin") == 3, c.get("/metrics").text[-3000:]
        text = c.get("/metrics").text
        assert [metric(text, "icaserve_model_loaded", model="pin", version=str(v)) for v in (1, 2, 3)] == [1, 1, 1]
        # a fourth version: the least recently used (1) is dropped, the others stay
        copy_version_as(store, "pin", 1, 4)
        assert c.post("/admin/reload", headers=ADMIN).json()["serving"]["pin"] == 4
        assert loads(c, "pin", "new_version") == 1
        for v in (2, 3, 4, 3, 2):
            ask(c, v)
        assert loads(c, "pin") == 4
        text = c.get("/metrics").text
        assert [metric(text, "icaserve_model_loaded", model="pin", version=str(v)) for v in (1, 2, 3, 4)] == \
            [0, 1, 1, 1]
        ask(c, 1)  # back again: one load, and the least recently used of the others (4 is latest: 3) goes
        assert loads(c, "pin", "pinned") == 3
        text = c.get("/metrics").text
        assert [metric(text, "icaserve_model_loaded", model="pin", version=str(v)) for v in (1, 2, 3, 4)] == \
            [1, 1, 0, 1]
        assert "Traceback" not in server.log(20000)


# -- the batcher alone: abandoned futures, Expired from the compute, lanes -----------------------


def run_loop(coro_fn: Callable[[], Any]) -> list[dict]:
    """Run `coro_fn()` on a fresh loop; returns what reached the loop's exception handler."""
    contexts: list[dict] = []

    async def main() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: contexts.append(ctx))
        await coro_fn()
        gc.collect()  # free the jobs: an unretrieved exception is reported when its future is freed
        await asyncio.sleep(0)

    asyncio.run(main())
    return contexts


def test_abandoned_jobs_leave_no_unretrieved_future_exception():
    """Item 13 (part): a job whose caller timed out got its Expired (or its batch's error) set
    after the caller had gone; nobody retrieved it and asyncio logged "Future exception was never
    retrieved" when it was freed."""
    from service.batching import Batcher, Expired

    def slow_fail(seqs, specs):
        time.sleep(0.2)
        raise ValueError("boom")

    async def scenario() -> None:
        # expires while the batch is still collecting (a long batching window)
        window = Batcher("predict", lambda s, _: s, max_batch=8, max_wait_s=0.3, max_queue=8)
        with pytest.raises(Expired):
            await window.submit([1], None, 0.05)
        # the caller gives up while its batch computes, and the batch then fails
        failing = Batcher("explain", slow_fail, max_batch=8, max_wait_s=0, max_queue=8)
        with pytest.raises(Expired):
            await failing.submit([1], None, 0.05)
        for b in (window, failing):  # let the workers finish with them
            end = time.monotonic() + 10
            while (b.depth() or b._running) and time.monotonic() < end:
                await asyncio.sleep(0.01)
            await b.drain_and_stop()

    contexts = run_loop(scenario)
    assert not [c for c in contexts if "never retrieved" in str(c.get("message"))], contexts


def test_expired_from_the_compute_fails_the_batch_quietly(caplog):
    """The contract with runtime.explain: an `Expired` raised by the compute fails that batch's
    requests with Expired (504), logs one info line and no traceback, and the worker goes on."""
    from service.batching import Batcher, Expired

    calls: list[int] = []

    def run(seqs, specs):
        calls.append(len(seqs))
        if len(calls) == 1:
            raise Expired("explain")
        return [s * 10 for s in seqs]

    async def scenario() -> None:
        b = Batcher("explain", run, max_batch=8, max_wait_s=0, max_queue=8)
        with pytest.raises(Expired):
            await b.submit([1, 2], None, 5)
        assert await b.submit([3], None, 5) == [30]  # the worker moved on
        await b.drain_and_stop()

    with caplog.at_level(logging.DEBUG, logger="icaserve.batching"):
        contexts = run_loop(scenario)
    records = [r for r in caplog.records if r.name == "icaserve.batching"]
    assert not [r for r in records if r.exc_info or "batch failed" in r.getMessage()], records
    assert [r.levelno for r in records] == [logging.INFO], records
    assert calls == [2, 1] and not contexts


def test_lanes_share_one_bounded_queue_and_never_merge_versions():
    """The per-model bound seen from the batcher: two versions' lanes, one queue of 2; batches
    only ever hold one version's jobs."""
    from service.batching import Batcher, QueueFull

    release = threading.Event()
    batches: list[tuple[str, list[int]]] = []

    def make(tag: str):
        def run(seqs, specs):
            release.wait(10)
            batches.append((tag, list(seqs)))
            return [f"{tag}:{s}" for s in seqs]
        return run

    async def scenario() -> None:
        b = Batcher("predict", max_batch=8, max_wait_s=0, max_queue=2)
        old, new = b.lane(make("v1")), b.lane(make("v2"))
        first = asyncio.ensure_future(old.submit([0], None, 10))
        end = time.monotonic() + 10
        while not (b._running or b._direct) and time.monotonic() < end:  # the first job computes (idle lane)
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future((old if i % 2 else new).submit([i], None, 10)) for i in range(1, 10)]
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        refused = [r for r in results if isinstance(r, QueueFull)]
        answered = [r for r in results if isinstance(r, list)]
        assert len(refused) == 7 and len(answered) == 3, results
        assert answered[0] == ["v1:0"] and sorted(answered[1:]) == [["v1:1"], ["v2:2"]], results
        await b.drain_and_stop()

    assert not run_loop(scenario)
    assert batches == [("v1", [0]), ("v1", [1]), ("v2", [2])], batches


# -- several workers: POST /admin/reload reaches all of them -------------------------------------


def test_admin_reload_reaches_every_worker(copy_store, tmp_path):
    """With `icaserve serve --workers 2` and polling off, one POST /admin/reload used to reach only
    the worker that answered it: the other kept serving the old version."""
    store = copy_store()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ICASERVE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({"ICASERVE_STORE": str(store), "ICASERVE_DEVICE": "cpu", "ICASERVE_TORCH_THREADS": "1",
                "ICASERVE_POLL_INTERVAL_S": "0", "ICASERVE_LOG_LEVEL": "warning", "ICASERVE_ADMIN_KEY": ADMIN_KEY,
                "ICASERVE_DEFAULT_MODEL": "ica",
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)})
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "icaserve.cli", "serve", "--port", str(port), "--workers", "2"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    class Logged:
        def log(self) -> str:
            return log_path.read_text(errors="replace")[-4000:]

    def get(path: str) -> httpx.Response:  # a new connection each time, so either worker may answer
        return httpx.get(f"{url}{path}", headers={"Connection": "close"}, timeout=60)

    def ready() -> bool:
        assert proc.poll() is None, Logged().log()
        try:
            return get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, READY_TIMEOUT_S, "readiness", Logged())
        seen: dict[int, int] = {}  # worker pid -> lstm version it serves

        def both_workers(want: int) -> Callable[[], bool]:
            def check() -> bool:
                body = get("/models").json()
                lstm = next(m for m in body["models"] if m["name"] == "lstm")
                seen[body["worker_pid"]] = lstm["serving_version"]
                assert lstm["serving_version"] == want, (body["worker_pid"], lstm["serving_version"], want)
                return len(seen) == 2
            return check

        wait_for(both_workers(1), 90, "both workers to answer", Logged())
        copy_version_as(store, "lstm", 1, 2)
        r = httpx.post(f"{url}/admin/reload", headers={**ADMIN, "Connection": "close"}, timeout=60)
        assert r.status_code == 200 and r.json()["serving"]["lstm"] == 2, r.text
        seen.clear()
        versions = []
        for i in range(6):  # predictions, whichever worker answers: the new version
            r = httpx.post(f"{url}/models/lstm/predict", json={"inputs": [seq(6, i)]},
                           headers={"Connection": "close"}, timeout=60)
            assert r.status_code == 200, r.text
            versions.append(r.json()["version"])
        assert versions == [2] * 6, versions
        wait_for(both_workers(2), 90, "both workers to report version 2", Logged())
        print(f"\nworkers after one reload: {seen}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
