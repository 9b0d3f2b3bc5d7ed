"""Faults while serving (issue 6), each against a real server process on loopback:

- broken versions published while traffic flows (checksum mismatch, truncated file, garbage with a
  matching checksum, truncated manifest, missing file, NaN weights): each is refused, the current
  version keeps answering every request, `icaserve_model_load_failures_total` counts it by reason
  and a log line (plain text, captured from the server's stderr) says which version and why;
- the store folder moved away, replaced by a file, restored and finally deleted while serving:
  loaded models keep serving, /readyz stays ready and its `store_readable` follows the store;
- explanations too expensive for the limits: refused up front with 422 `too_expensive` (no model
  time is spent: the compute histogram does not move; pricing works out each quadrature rule
  once, however many sequences), and the server answers normally afterwards;
- SIGTERM under load (`icaserve serve`, the production entry point): requests already accepted
  finish with 200, new connections are refused meanwhile, the process exits 0 once drained (long
  before its drain would be cut short).

We run as root, where chmod 000 does not stop reads: an unreadable store is simulated by moving it
away or putting a file in its place.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import attribution
from conftest import MAX_LENGTH, N_FEATURES, READY_TIMEOUT_S, REPO, free_port, metric, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

POLL_S = 0.5


def seq(t: int, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(t, N_FEATURES)).round(4).tolist()




def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:300]}"
    body = r.json()
    assert set(body) == {"error", "code", "field", "request_id"}, body
    if code is not None:
        assert body["code"] == code, body
    return body




class Traffic:
    """Background clients (own connection each) looping over fixed requests until stopped;
    bounded in count and time."""

    def __init__(self, url: str, requests: list[tuple[str, dict]], max_each: int = 3000,
                 max_s: float = 120.0) -> None:
        self.url, self.max_each, self.max_s = url, max_each, max_s
        self.stop = threading.Event()
        self.records: list[tuple[str, Any, Any]] = []  # (path, status or "error: ...", version)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(p, b), daemon=True) for p, b in requests]

    def _run(self, path: str, body: dict) -> None:
        end = time.monotonic() + self.max_s
        with httpx.Client(base_url=self.url, timeout=60) as c:
            for _ in range(self.max_each):
                if self.stop.is_set() or time.monotonic() > end:
                    return
                try:
                    r = c.post(path, json=body)
                    rec = (path, r.status_code, r.json().get("version") if r.status_code == 200 else r.text[:200])
                except httpx.HTTPError as exc:
                    rec = (path, f"error: {exc!r}", None)
                with self.lock:
                    self.records.append(rec)
                time.sleep(0.02)

    def __enter__(self) -> "Traffic":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def count(self) -> int:
        with self.lock:
            return len(self.records)

    def more(self, n: int, timeout_s: float = 30) -> None:
        """Wait until `n` more requests were answered."""
        start = self.count()
        wait_for(lambda: self.count() >= start + n, timeout_s, f"{n} more requests")

    def check(self, versions: dict[str, set]) -> None:
        bad = [r for r in self.records if r[1] != 200]
        assert not bad, f"{len(bad)} of {len(self.records)} requests failed, e.g. {bad[:5]}"
        for path, allowed in versions.items():
            seen = {v for p, _, v in self.records if p == path}
            assert seen and seen <= allowed, (path, seen, allowed)


# -- one server with polling, for broken versions, the store going away and too-expensive requests --


@pytest.fixture(scope="module")
def fault_server(server_factory, copy_store):
    server = server_factory(copy_store(), {"POLL_INTERVAL_S": POLL_S})
    yield server
    server.stop()


def failures(c: httpx.Client, **labels: str) -> float:
    return metric(c.get("/metrics").text, "icaserve_model_load_failures_total", **labels)


def tamper_ts(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0xFF  # same size, other bytes
    return bytes(out)


def nan_weights(data: bytes) -> bytes:
    """The same TorchScript with every weight NaN: loads fine, answers NaN."""
    import io

    module = torch.jit.load(io.BytesIO(data))
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue()


def rewrite_checksum(manifest: dict, data: bytes) -> None:
    import hashlib

    manifest["files"]["torchscript"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


# name -> (how to break a copy of the serving version, expected reason label, words of the log line)
BROKEN = {
    "checksum_mismatch": ("ts", tamper_ts, False, "ChecksumMismatch", "does not match its manifest checksum"),
    "truncated_file": ("ts", lambda d: d[: len(d) // 2], False, "ChecksumMismatch", "does not match"),
    "truncated_with_matching_checksum": ("ts", lambda d: d[: len(d) // 2], True, None, "refused model version"),
    "garbage_with_matching_checksum": ("ts", lambda d: os.urandom(len(d)), True, None, "refused model version"),
    "nan_weights": ("ts", nan_weights, True, "ValueError", "non-finite"),
    "truncated_manifest": ("manifest", None, False, "ManifestError", "unreadable or invalid"),
    "missing_file": ("missing", None, False, "ChecksumMismatch", "cannot read"),
}


def publish_broken(store: Path, name: str, source: int, kind: str) -> int:
    """A copy of version `source` of `name` as the next version, broken as `kind` says, put in
    place whole with one rename (as the store publishes)."""
    what, change, fix_checksum, _, _ = BROKEN[kind]
    model_dir = store / name
    latest = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    new = latest + 1
    tmp = model_dir / f".incoming-{new}"
    shutil.copytree(model_dir / str(source), tmp)
    manifest_path = tmp / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = new
    ts = tmp / "model.ts"
    if what == "ts":
        data = change(ts.read_bytes())
        ts.write_bytes(data)
        if fix_checksum:
            rewrite_checksum(manifest, data)
    elif what == "missing":
        ts.unlink()
    manifest_text = json.dumps(manifest)
    if what == "manifest":
        manifest_text = manifest_text[: len(manifest_text) // 2]
    manifest_path.write_text(manifest_text)
    tmp.rename(model_dir / str(new))
    return new


def publish_copy(store: Path, name: str) -> int:
    """The serving (latest) version of `name`, copied whole as the next version (one rename)."""
    model_dir = store / name
    latest = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    tmp = model_dir / f".incoming-{latest + 1}"
    shutil.copytree(model_dir / str(latest), tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["version"] = latest + 1
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    tmp.rename(model_dir / str(latest + 1))
    return latest + 1


def test_broken_versions_are_refused_while_the_current_one_serves(fault_server):
    server, store = fault_server, fault_server.store
    with server.client() as c:
        serving = c.get("/models/lstm").json()["serving_version"]
        ica_versions = {c.get("/models/ica").json()["serving_version"]}
    log_before = len(server.log_path.read_text(errors="replace"))
    traffic = Traffic(server.url, [("/models/lstm/predict", {"inputs": [seq(12, 1)]}),
                                   ("/models/lstm/predict", {"inputs": [seq(7, 2), seq(12, 3)]}),
                                   ("/models/ica/explain", {"inputs": [seq(9, 4)], "method": "gradient"})])
    refused: dict[str, int] = {}
    with traffic, server.client() as c:
        traffic.more(6)
        for kind, (_, _, _, reason, words) in BROKEN.items():
            before = failures(c, model="lstm")
            version = publish_broken(store, "lstm", serving, kind)
            refused[kind] = version
            wait_for(lambda: failures(c, model="lstm") > before, 30, f"the refusal of {kind}", server)
            assert failures(c, model="lstm") == before + 1, kind  # refused once, not on every poll
            if reason is not None:
                assert failures(c, model="lstm", reason=reason) >= 1, (kind, c.get("/metrics").text[-2000:])
            traffic.more(3)
            one = c.get("/models/lstm").json()
            assert one["serving_version"] == serving and one["versions"][-1] == version, (kind, one)
            # the log line names the version and says why
            wait_for(lambda: f"lstm v{version}" in server.log_path.read_text(errors="replace")[log_before:], 10,
                     f"the log line of {kind}", server)
            line = next(line for line in server.log_path.read_text(errors="replace")[log_before:].splitlines()
                        if f"lstm v{version}" in line)
            assert "ERROR" in line and "refused model version" in line and words in line, (kind, line)
        traffic.more(6)
        assert c.get("/readyz").status_code == 200
        # more polls, each seen to happen (a good new version of the other model is picked up by
        # each): still no retry of a refused version
        for _ in range(2):
            ica_copy = publish_copy(store, "ica")
            ica_versions.add(ica_copy)
            wait_for(lambda: c.get("/models/ica").json()["serving_version"] == ica_copy, 30,
                     f"ica v{ica_copy} to be picked up by a poll", server)
        assert failures(c, model="lstm") == len(BROKEN)
        # asking for a refused version by number: unavailable, in the common format
        for version in refused.values():
            assert_error(c.post(f"/models/lstm/versions/{version}/predict", json={"inputs": [seq(4)]}), 503,
                         "not_ready")
    traffic.check({"/models/lstm/predict": {serving}, "/models/ica/explain": ica_versions})
    print(f"\nrefused while serving: {refused}; {traffic.count()} requests during, all 200")


def test_store_gone_while_serving(fault_server):
    server = fault_server
    store = server.store
    away = store.with_name(store.name + ".away")

    def readable() -> bool | None:
        r = httpx.get(f"{server.url}/readyz", timeout=30)
        assert r.status_code == 200, r.text  # ready throughout: the loaded models serve
        return r.json()["store_readable"]

    def check_serving(c: httpx.Client) -> None:
        assert c.post("/models/ica/predict", json={"inputs": [seq(5)]}).status_code == 200
        assert c.post("/explain", json={"inputs": [seq(5)], "method": "integrated_gradients",
                                        "parameters": {"steps": 4}}).status_code == 200
        r = c.get("/models")  # the listing still shows what is loaded
        assert r.status_code == 200 and {m["name"] for m in r.json()["models"]} >= {"ica", "lstm"}, r.text
        r = c.post("/models/ica/versions/1/predict", json={"inputs": [seq(5)]})  # not loaded, not on disk now
        assert r.status_code in (404, 503), r.text
        assert_error(r, r.status_code)

    traffic = Traffic(server.url, [("/models/ica/predict", {"inputs": [seq(10, 5)]}),
                                   ("/models/lstm/predict", {"inputs": [seq(10, 6)]}),
                                   ("/models/ica/explain", {"inputs": [seq(10, 7)]})])
    with server.client() as c:
        ica, lstm = (c.get(f"/models/{n}").json()["serving_version"] for n in ("ica", "lstm"))
    with traffic, server.client() as c:
        traffic.more(6)
        assert readable() is True
        # 1. moved away (as good as removed, and reversible)
        store.rename(away)
        wait_for(lambda: readable() is False, 15, "store_readable false after the store moved", server)
        traffic.more(6)
        check_serving(c)
        assert "model store unreadable" in server.log()
        store_back = away.rename(store)
        assert store_back == store
        wait_for(lambda: readable() is True, 15, "store_readable true again", server)
        # 2. a file where the folder was
        store.rename(away)
        store.write_text("not a folder")
        wait_for(lambda: readable() is False, 15, "store_readable false with a file in its place", server)
        traffic.more(6)
        check_serving(c)
        store.unlink()
        away.rename(store)
        wait_for(lambda: readable() is True, 15, "store_readable true after the folder is back", server)
        traffic.more(3)
        # 3. deleted for good
        shutil.copytree(store, away)  # keep a copy for whatever runs after us
        shutil.rmtree(store)
        wait_for(lambda: readable() is False, 15, "store_readable false after rm -r", server)
        traffic.more(6)
        check_serving(c)
        away.rename(store)
        wait_for(lambda: readable() is True, 15, "store_readable true after the restore", server)
    traffic.check({"/models/ica/predict": {ica}, "/models/lstm/predict": {lstm}, "/models/ica/explain": {ica}})
    assert server.running
    print(f"\nstore moved, replaced by a file and deleted under {traffic.count()} requests: all 200")


# -- explanations too expensive for the limits (the server's defaults) --------------------------------

def test_too_expensive_explanations_are_refused_up_front(fault_server):
    from service.settings import Settings

    limit = Settings().max_explain_cost
    long_seq = seq(MAX_LENGTH, 11)
    many = [seq(MAX_LENGTH, 20 + i) for i in range(64)]  # the default max_sequences
    mixed = [seq(MAX_LENGTH - i, 90 + i) for i in range(64)]
    cases = {
        # a long batch of long sequences, integrated gradients at the step limit, every class
        "ig_many_steps": ({"inputs": many, "method": "integrated_gradients", "target": "all",
                           "parameters": {"steps": 256}},
                          64 * MAX_LENGTH * attribution.estimate_cost("integrated_gradients", 1, MAX_LENGTH,
                                                                      N_FEATURES, 3, steps=256)),
        # TSR over integrated gradients on one long sequence: a small body, a huge bill
        "tsr_one_sequence": ({"inputs": [long_seq], "method": "tsr", "target": "all",
                              "parameters": {"base_method": "integrated_gradients", "steps": 256}},
                             MAX_LENGTH * attribution.tsr_cost("integrated_gradients", 1, MAX_LENGTH, N_FEATURES, 3,
                                                               steps=256)),
        # every sequence a different length: the price is worked out per sequence
        "ig_mixed_lengths": ({"inputs": mixed, "method": "integrated_gradients", "target": "all",
                              "parameters": {"steps": 255}},
                             sum(len(x) for x in mixed) * attribution.estimate_cost(
                                 "integrated_gradients", 1, MAX_LENGTH, N_FEATURES, 3, steps=255)),
        "tsr_large_input": ({"inputs": many, "method": "tsr"},
                            64 * MAX_LENGTH * attribution.tsr_cost("gradient", 1, MAX_LENGTH, N_FEATURES, 1)),
        "smoothgrad_many_samples": ({"inputs": many, "method": "smoothgrad", "target": "all",
                                     "parameters": {"samples": 128}},
                                    64 * MAX_LENGTH * attribution.estimate_cost("smoothgrad", 1, MAX_LENGTH,
                                                                                N_FEATURES, 3, samples=128)),
    }
    with fault_server.client() as c:
        text = c.get("/metrics").text
        computed_before = metric(text, "icaserve_model_compute_seconds_count", queue="explain")
        explained_before = metric(text, "icaserve_explanations_total")
        times = {}
        for name, (body, cost) in cases.items():
            assert cost > limit, (name, cost)
            t0 = time.perf_counter()
            r = c.post("/explain", json=body)
            times[name] = time.perf_counter() - t0
            err = assert_error(r, 422, "too_expensive")
            assert err["field"] == "inputs" and f"{cost:,}" in err["error"], (name, err)
            # that pricing stays cheap is checked by structure, not by a stopwatch:
            # test_pricing_computes_each_quadrature_rule_once
        # over the per-parameter caps: refused before the cost is even counted
        for params, field in (({"steps": 257}, "parameters.steps"),):
            r = c.post("/explain", json={"inputs": [seq(4)], "method": "integrated_gradients", "parameters": params})
            assert assert_error(r, 422, "too_expensive")["field"] == field
        r = c.post("/explain", json={"inputs": [seq(4)], "method": "smoothgrad", "parameters": {"samples": 129}})
        assert assert_error(r, 422, "too_expensive")["field"] == "parameters.samples"
        text = c.get("/metrics").text
        assert metric(text, "icaserve_model_compute_seconds_count", queue="explain") == computed_before
        assert metric(text, "icaserve_explanations_total") == explained_before
        # and the server answers normally right after
        t0 = time.perf_counter()
        r = c.post("/explain", json={"inputs": [long_seq], "method": "tsr"})
        assert r.status_code == 200, r.text
        assert np.asarray(r.json()["explanations"][0]["attributions"][0]["saliency"]).shape == (MAX_LENGTH, N_FEATURES)
        assert c.post("/predict", json={"inputs": [long_seq]}).status_code == 200
    print("\nrefused in " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in times.items())
          + f"; a TSR within the limits then took {(time.perf_counter() - t0) * 1000:.0f} ms")


def test_pricing_computes_each_quadrature_rule_once(monkeypatch):
    """Why refusing is cheap, checked without a stopwatch: the Gauss-Legendre rule (an eigenvalue
    problem, ~0.1 s at 256 steps; redone per sequence it made pricing 64 sequences take 4-30 s of
    event-loop time on a busy 2-core machine) is worked out at most once per step count, however
    many sequences of however many lengths are priced, directly or under TSR."""
    calls: list[int] = []
    real = np.polynomial.legendre.leggauss

    def counting(n):
        calls.append(int(n))
        return real(n)

    monkeypatch.setattr(np.polynomial.legendre, "leggauss", counting)
    steps_used = (241, 243)  # counts no other test asks for, so nothing is cached beforehand
    for steps in steps_used:
        for length in range(MAX_LENGTH, 0, -1):  # one price per sequence, as the server works it out
            for _ in range(2):
                attribution.estimate_cost("integrated_gradients", 1, length, N_FEATURES, 3, steps=steps)
                attribution.tsr_cost("integrated_gradients", 1, length, N_FEATURES, 3, steps=steps)
    assert all(calls.count(steps) <= 1 for steps in steps_used), calls[:10]
    assert set(calls) <= set(steps_used)


# -- SIGTERM under load, on `icaserve serve` ---------------------------------------------------------------


def http_request(path: str, body: bytes) -> tuple[bytes, bytes]:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head, body


def read_response(sock: socket.socket) -> tuple[int, dict]:
    raw = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        raw += chunk
        head, sep, payload = raw.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(payload) >= length:
                break
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else -1
    return status, (json.loads(payload) if payload else {})


# Generous bounds, not timings: on a busy 2-core machine both happen within seconds, and neither can
# be reached by the forced end of the drain (DRAIN_TIMEOUT_S + 5 s after the signal).
DRAIN_TIMEOUT_S = 300
REFUSE_BOUND_S = 60
EXIT_BOUND_S = 120


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_under_load_drains_accepted_requests_and_exits_0(model_store, tmp_path, workers):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICASERVE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({"ICASERVE_STORE": str(model_store), "ICASERVE_DEVICE": "cpu", "ICASERVE_TORCH_THREADS": "1",
                "ICASERVE_POLL_INTERVAL_S": "0", "ICASERVE_LOG_LEVEL": "warning",
                # with 2, the supervisor must stop listening at once (service.server.run_workers)
                "ICASERVE_WORKERS": str(workers),
                # a long batching window keeps accepted requests in flight while the signal arrives
                "ICASERVE_MAX_WAIT_MS": "1000", "ICASERVE_MAX_BATCH_SIZE": "64",
                # `serve` gives the drain request_timeout_s + 5 s: far longer than EXIT_BOUND_S, so an
                # exit within that bound means the server left once drained, not when forced to
                "ICASERVE_REQUEST_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)})
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "icaserve.cli", "serve", "--port", str(port)], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    socks: list[socket.socket] = []
    try:
        wait_for(lambda: _ready(url), READY_TIMEOUT_S, "readiness")
        # group A: accepted requests whose bodies are still on their way when SIGTERM comes
        bodies = [json.dumps({"inputs": [seq(8, 100 + i)]}).encode() for i in range(6)]
        for i, body in enumerate(bodies):
            head, rest = http_request("/models/ica/predict" if i % 2 else "/explain", body)
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(head + rest[: len(rest) // 2])
            socks.append(s)
        # group B: whole requests, waiting in the batching window
        results: list[Any] = []
        done_at: list[float] = []

        def client(i: int) -> None:
            try:
                r = httpx.post(f"{url}/predict", json={"inputs": [seq(10, 200 + i)]}, timeout=60)
                results.append(r.status_code)
            except httpx.HTTPError as exc:
                results.append(repr(exc))
            done_at.append(time.monotonic())

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        def all_accepted() -> bool:  # every request of both groups is in flight (or, for group B, done)
            done = len(results)  # first: a request finishing between the two reads is then not counted twice
            return done + metric(httpx.get(f"{url}/metrics", timeout=10).text,
                                 "icaserve_requests_in_flight") >= len(socks) + len(threads)

        wait_for(all_accepted, 60, "accepted requests in flight")
        in_flight = metric(httpx.get(f"{url}/metrics", timeout=10).text, "icaserve_requests_in_flight")
        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)

        # new connections are refused while the accepted requests are still being served
        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                return False
            except OSError:
                return True

        wait_for(refused, REFUSE_BOUND_S, "new connections to be refused")
        refused_after = time.monotonic() - sigterm_at
        assert proc.poll() is None, "exited before the accepted requests were answered"
        for s, body in zip(socks, bodies):
            s.sendall(body[len(body) // 2:])
        answers = [read_response(s) for s in socks]
        for t in threads:
            t.join(timeout=60)
        try:
            rc: int | None = proc.wait(timeout=EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            rc = None
        exit_after = time.monotonic() - sigterm_at
    finally:
        for s in socks:
            s.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    log = log_path.read_text(errors="replace")
    assert [status for status, _ in answers] == [200] * len(answers), (answers, log[-3000:])
    for status, body in answers:
        assert "predictions" in body or "explanations" in body, body
    assert results == [200] * len(threads), (results, log[-3000:])
    assert rc is not None, f"still running {EXIT_BOUND_S} s after SIGTERM with nothing left to answer"
    assert rc == 0, f"exit status {rc}; log:\n{log[-3000:]}"
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    print(f"\n{int(in_flight)} requests in flight at SIGTERM; new connections refused after {refused_after:.2f} s; "
          f"all {len(answers) + len(results)} accepted requests answered 200; exit 0 after {exit_after:.2f} s")


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
