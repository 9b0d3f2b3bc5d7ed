"""The HTTP transport under hostile or broken clients, on real servers (`icaserve serve` through
conftest's `server_factory`) over raw sockets and httpx: request head size and time limits, body
time limit, connection cap, clients that leave mid-body, JSON parsing off the event loop with
bounded memory, Content-Type and Accept parsing, HEAD.

Every wait polls for a condition within a generous bound; no assertion is about elapsed time.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import select
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import numpy as np
import pytest

from conftest import MAX_LENGTH, N_FEATURES, Server, metric, wait_for
from model_store import ModelStore
from service import inputs
from service.errors import InvalidInput, UnsupportedMediaType
from service.media import negotiate, parse_media_type
from service.settings import Settings

HEADER_LIMIT = 8192
CAP = 8  # connections per worker on `server`; its other tests use at most 6 at once
STRICT_TIMEOUT_S = 1.0  # head and body timeouts of `strict`
BOUND_S = 20.0  # generous bound for anything that should happen within a second or two
ROW = [0.5] * N_FEATURES
SMALL = json.dumps({"inputs": [[ROW] * 3]}).encode()
JSON_HEADERS = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(server_factory, model_store) -> Iterator[Server]:
    """Long timeouts (nothing here is cut by accident), a small header limit and connection cap;
    log level info for the access log."""
    s = server_factory(model_store, {"MAX_HEADER_BYTES": HEADER_LIMIT, "MAX_CONNECTIONS": CAP,
                                     "HEADER_TIMEOUT_S": 60, "BODY_TIMEOUT_S": 60, "LOG_LEVEL": "info"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def strict(server_factory, model_store) -> Iterator[Server]:
    """Short head and body timeouts."""
    s = server_factory(model_store, {"HEADER_TIMEOUT_S": STRICT_TIMEOUT_S, "BODY_TIMEOUT_S": STRICT_TIMEOUT_S,
                                     "LOG_LEVEL": "info"})
    yield s
    s.stop()


# -- helpers ----------------------------------------------------------------------------------------


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port_of(server)), timeout=BOUND_S)


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """Send; False once the server has closed the connection."""
    try:
        sock.sendall(data)
        return True
    except OSError:  # broken pipe or reset: the server has answered and closed
        return False


def read_response(sock: socket.socket, bound_s: float = BOUND_S) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one response; the connection must end or the body be complete
    within `bound_s`."""
    sock.settimeout(bound_s)
    deadline = time.monotonic() + bound_s
    raw = b""
    while time.monotonic() < deadline:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if sep:
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if length and len(rest) >= int(length.group(1)):
                break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), raw[:300]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket, bound_s: float = BOUND_S) -> bool:
    """True when the server ends the connection (EOF or reset) within `bound_s`, nothing read."""
    sock.settimeout(bound_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def assert_error(status: int, headers: dict[str, str], body: bytes, code: int, kind: str) -> dict[str, Any]:
    assert status == code, (status, body[:300])
    assert headers["content-type"].startswith("application/json"), headers
    err = json.loads(body)
    assert set(err) == {"error", "code", "field", "request_id"} and err["code"] == kind, err
    assert err["request_id"] == headers["x-request-id"], (err, headers)
    return err




def metrics(server: Server) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=BOUND_S).text




def post_head(path: str, length: int, content_type: str = "application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def peak_rss_reset(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def proc_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


# -- request head: size and time ---------------------------------------------------------------------


def test_oversize_header_gets_431_without_buffering_and_others_are_served(server):
    healthy = httpx.get(f"{server.url}/healthz", timeout=BOUND_S)
    assert healthy.status_code == 200
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: ")
        sent = 0
        while sent < 4 * 1024 * 1024 and send_quietly(sock, b"a" * 65536):  # a 4 MiB header, never ended
            sent += 65536
            if sent == 8 * 65536:  # meanwhile, another client is served
                assert httpx.get(f"{server.url}/healthz", timeout=BOUND_S).status_code == 200
        status, headers, body = read_response(sock)
    err = assert_error(status, headers, body, 431, "headers_too_large")
    assert str(HEADER_LIMIT) in err["error"], err
    assert headers.get("connection") == "close"
    # a header just under the limit is fine
    r = httpx.get(f"{server.url}/healthz", headers={"X-Big": "a" * (HEADER_LIMIT - 200)}, timeout=BOUND_S)
    assert r.status_code == 200, r.text
    text = metrics(server)
    assert metric(text, "icaserve_errors_total", kind="headers_too_large") >= 1
    assert metric(text, "icaserve_requests_total", status="500") == 0


def test_header_trickle_and_silent_connection_are_cut_off(strict):
    with connect(strict) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        answered = False
        for i in range(int(BOUND_S / 0.25)):  # one header line every 0.25 s, forever
            if not send_quietly(sock, f"X-Trickle-{i}: x\r\n".encode()):
                answered = True
                break
            if select.select([sock], [], [], 0.25)[0]:  # the server speaks (or closes)
                answered = True
                break
        assert answered, "a client trickling its headers was never cut off"
        status, headers, body = read_response(sock)
    assert_error(status, headers, body, 408, "request_timeout")
    with connect(strict) as silent:  # connects, sends nothing
        assert closed_by_server(silent), "a silent connection stayed open"
    assert httpx.get(f"{strict.url}/healthz", timeout=BOUND_S).status_code == 200


# -- request body: time -----------------------------------------------------------------------------


def test_stalled_and_trickled_bodies_get_408_and_leave_no_request_in_flight(strict):
    with connect(strict) as stalled, connect(strict) as trickled:
        stalled.sendall(post_head("/predict", 10_000_000) + b'{"inputs": ')
        trickled.sendall(post_head("/models/ica/predict", 10_000_000) + b"{")
        for _ in range(int(BOUND_S / 0.25)):  # one byte every 0.25 s, forever
            if not send_quietly(trickled, b" ") or select.select([trickled], [], [], 0.25)[0]:
                break
        answers = [read_response(s) for s in (stalled, trickled)]
        for s in (stalled, trickled):
            assert closed_by_server(s), "the connection stayed open after the 408"
    for status, headers, body in answers:
        err = assert_error(status, headers, body, 408, "request_timeout")
        assert err["field"] == "body", err
        assert headers.get("connection") == "close", headers
    wait_for(lambda: metric(metrics(strict), "icaserve_requests_in_flight") == 0, BOUND_S, "no request in flight")
    text = metrics(strict)
    assert metric(text, "icaserve_requests_total", status="408") >= 2
    assert metric(text, "icaserve_errors_total", kind="request_timeout") >= 2


def test_a_body_nobody_reads_cannot_hold_the_connection(strict):
    """Answered early (404: no such model) while the body still trickles in: cut off, not kept."""
    with connect(strict) as sock:
        sock.sendall(post_head("/models/nope/predict", 10_000_000) + b"{")
        status, headers, body = read_response(sock)
        assert status == 404, body[:300]
        closed = False
        for _ in range(int(BOUND_S / 0.25)):
            if not send_quietly(sock, b" ") or (select.select([sock], [], [], 0.25)[0] and closed_by_server(sock, 1)):
                closed = True
                break
        assert closed, "the server kept the connection for a body it had already answered"


# -- connections ------------------------------------------------------------------------------------


def test_connections_beyond_the_cap_get_503_with_retry_after(server):
    holders = [connect(server) for _ in range(CAP)]
    try:
        for h in holders:  # each holds a connection with a request head on its way
            h.sendall(b"GET /healthz HTTP/1.1\r\n")
        with connect(server) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = read_response(extra)
        assert_error(status, headers, body, 503, "too_many_connections")
        assert int(headers["retry-after"]) >= 1, headers
    finally:
        for h in holders:
            h.close()
    # with the holders gone, a new connection is served again
    wait_for(lambda: httpx.get(f"{server.url}/healthz", timeout=BOUND_S).status_code == 200, BOUND_S,
             "a free connection")


# -- a client that leaves mid-body --------------------------------------------------------------------


def test_client_closing_mid_body_is_499_client_closed_not_a_server_error(server):
    before = metrics(server)
    with connect(server) as sock:
        sock.sendall(post_head("/predict", 100) + b'{"in')
    wait_for(lambda: metric(metrics(server), "icaserve_requests_total", status="499") >
             metric(before, "icaserve_requests_total", status="499"), BOUND_S, "the 499 to be counted")
    text = metrics(server)
    assert metric(text, "icaserve_requests_total", endpoint="/predict", status="499") == \
        metric(before, "icaserve_requests_total", endpoint="/predict", status="499") + 1
    assert metric(text, "icaserve_errors_total", kind="client_closed") == \
        metric(before, "icaserve_errors_total", kind="client_closed") + 1
    assert metric(text, "icaserve_requests_total", status="500") == 0
    assert metric(text, "icaserve_errors_total", kind="http_error") == 0
    assert metric(text, "icaserve_requests_in_flight") == 0
    wait_for(lambda: re.search(r"POST /predict 499 ", server.log(200_000)) is not None, BOUND_S,
             "the access log line")
    log = server.log(200_000)
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


# -- JSON bodies --------------------------------------------------------------------------------------


def empty_lists_body(size: int) -> bytes:
    head = b'{"inputs": ['
    n = (size - len(head) - 2) // 3
    return head + b"[]," * (n - 1) + b"[]]}"


def test_a_body_of_empty_lists_is_refused_before_parsing_in_bounded_memory(server):
    body = empty_lists_body(4 * 1024 * 1024)
    pid = server.proc.pid  # one worker: the serving process itself
    measured = peak_rss_reset(pid)
    base = proc_kib(pid, "VmRSS") if measured else 0
    r = httpx.post(f"{server.url}/predict", content=body, headers=JSON_HEADERS, timeout=BOUND_S * 3)
    assert r.status_code == 422, r.text[:300]
    err = r.json()
    assert err["field"] == "inputs" and "lists or objects" in err["error"], err
    if measured:
        grown = (proc_kib(pid, "VmHWM") - base) * 1024
        # The body itself is held a few times over on its way in (socket buffer, uvicorn, Starlette);
        # building its 1.4 million lists first took ~30 bytes per byte of body.
        assert grown < 8 * len(body), f"peak RSS grew by {grown / 2**20:.0f} MiB for a {len(body) / 2**20:.0f} MiB body"


def test_a_small_predict_completes_while_big_bodies_are_refused(server):
    """Four big bodies arrive whole at once; a small /predict sent right after them is answered
    (before their answers are read), and each big one gets its 422."""
    body = empty_lists_body(4 * 1024 * 1024)
    bigs = [connect(server) for _ in range(4)]
    try:
        for sock in bigs:  # in flight, all but the last byte
            sock.sendall(post_head("/predict", len(body)) + body[:-1])
        for sock in bigs:
            sock.sendall(body[-1:])
        small = httpx.post(f"{server.url}/predict", content=SMALL, headers=JSON_HEADERS, timeout=BOUND_S * 3)
        assert small.status_code == 200, small.text[:300]
        for sock in bigs:
            err = assert_error(*read_response(sock, BOUND_S * 3), 422, "invalid_input")
            assert err["field"] == "inputs", err
    finally:
        for sock in bigs:
            sock.close()


def test_large_bodies_parse_in_a_worker_thread_with_bounded_concurrency_small_ones_inline(model_store, monkeypatch):
    """Past INLINE_PARSE_BYTES a body is parsed in a worker thread, one at a time; a small one on
    the event loop (orjson holds the GIL either way; the thread hops would cost more than the parse)."""
    manifest = ModelStore(model_store).manifest("ica")
    settings = Settings(store=model_store, json_parse_concurrency=1)
    # a valid body just over the inline bound: sequences of zeros, padded with spaces
    LARGE = json.dumps({"inputs": [[[0.0] * N_FEATURES] * 3]}).encode() + b" " * inputs.INLINE_PARSE_BYTES
    seen: list[bool] = []
    active = [0, 0]  # now, most at once
    real = inputs.parse_json

    def recording(*args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            seen.append(True)  # on the event loop
        except RuntimeError:
            seen.append(False)
        active[0] += 1
        active[1] = max(active)
        try:
            time.sleep(0.02)  # widens the window in which a second parse could overlap
            return real(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(inputs, "parse_json", recording)

    class FakeRequest:
        app = SimpleNamespace(state=SimpleNamespace(settings=settings))
        headers = JSON_HEADERS

        body_bytes = LARGE

        async def body(self) -> bytes:
            return self.body_bytes

    async def main() -> list[Any]:
        async with anyio.create_task_group() as tg:
            out: list[Any] = []

            async def one() -> None:
                out.append(await inputs.read_json(FakeRequest(), manifest))

            for _ in range(4):
                tg.start_soon(one)
        return out

    out = anyio.run(main)
    assert out == [json.loads(LARGE)] * 4
    assert seen == [False] * 4, "parsed on the event loop"
    assert active[1] == 1
    seen.clear()
    FakeRequest.body_bytes = SMALL
    assert anyio.run(main) == [json.loads(SMALL)] * 4
    assert seen == [True] * 4, "a small body went through a worker thread"


def test_json_limits_refuse_by_counting_and_pass_the_largest_valid_body(model_store):
    manifest = ModelStore(model_store).manifest("ica")
    limits = inputs.JsonLimits.for_model(manifest, max_sequences=4)
    largest = json.dumps({"inputs": [[[123.456] * N_FEATURES] * MAX_LENGTH] * 4,
                          "parameters": {"baseline": [[0.0] * N_FEATURES] * MAX_LENGTH, "window": [2, 2]},
                          "target": ["up", "down"]}).encode()
    assert inputs.parse_json(largest, "application/json", limits)["inputs"][3][MAX_LENGTH - 1][0] == 123.456
    for bad in (empty_lists_body(256 * 1024), b'{"inputs": [' + b"0," * 200_000 + b"0]}",
                b'{"inputs": [' + b"{}," * 50_000 + b"{}]}"):
        with pytest.raises(InvalidInput) as info:
            inputs.parse_json(bad, "application/json", limits)
        assert info.value.field == "inputs"


# -- Content-Type and Accept ---------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON;charset=\"UTF-8\"", "application/vnd.icaserve+json"])
def test_json_media_types_are_accepted(content_type):
    inputs.check_json_media_type(content_type)


@pytest.mark.parametrize("content_type", [None, "", "text/json-evil", "application/jsonx", "text/plain",
                                          "json", "application/json-patch", "application/+json", "/json",
                                          "application/json; charset=latin-1", "multipart/form-data; boundary=x"])
def test_other_media_types_are_refused(content_type):
    with pytest.raises(UnsupportedMediaType) as info:
        inputs.check_json_media_type(content_type)
    assert info.value.field == "body"
    inputs.check_json_media_type(None, required=False)  # V2 accepts a missing one


def test_content_type_on_the_wire(server):
    with server.client() as c:
        missing = c.post("/predict", content=SMALL)
        assert missing.status_code == 415 and "missing Content-Type" in missing.json()["error"], missing.text
        evil = c.post("/predict", content=SMALL, headers={"content-type": "text/json-evil"})
        assert evil.status_code == 415 and evil.json()["code"] == "unsupported_media_type", evil.text
        suffixed = c.post("/predict", content=SMALL, headers={"content-type": "application/vnd.x+json"})
        assert suffixed.status_code == 200, suffixed.text
        v2 = {"inputs": [{"name": "x", "shape": [1, 2, N_FEATURES], "datatype": "FP32", "data": ROW * 2}]}
        bare = c.post("/v2/models/ica/infer", content=json.dumps(v2).encode())  # Triton/KServe style
        assert bare.status_code == 200, bare.text
        evil_v2 = c.post("/v2/models/ica/infer", content=json.dumps(v2).encode(), headers={"content-type": "text/x"})
        assert evil_v2.status_code == 415, evil_v2.text


@pytest.mark.parametrize("accept, expected", [
    (None, "application/json"), ("", "application/json"), ("*/*", "application/json"),
    ("application/x-npz", "application/x-npz"), ("application/x-npz;q=0", None),
    ("application/x-npz;q=0, */*", "application/json"), ("application/x-npz, application/json", "application/json"),
    ("application/json;q=0.5, application/x-npz", "application/x-npz"),
    ("application/*;q=0.2, application/x-npz;q=0.9", "application/x-npz"), ("text/html", None),
    ("application/x-npz;q=2", None), ("application/x-npz;q=abc, application/json", "application/json"),
    ("APPLICATION/X-NPZ ; Q=0.8", "application/x-npz"), ("application/json;q=0, application/*", "application/x-npz"),
])
def test_accept_is_negotiated_with_q_values(accept, expected):
    assert negotiate(accept, ("application/json", "application/x-npz")) == expected


def test_media_type_parser():
    assert parse_media_type("Application/Vnd.A+JSON; Charset=\"utf-8\"; q=1") == (
        "application", "vnd.a+json", {"charset": "utf-8", "q": "1"})
    for bad in ("", "json", "a/", "/b", "a/b/c", "a b/c", "a/b; =x", "a/b; x"):
        assert parse_media_type(bad) is None, bad


def test_accept_on_the_wire(server):
    body = {"inputs": [[ROW] * 4]}
    with server.client() as c:
        refused = c.post("/explain", json=body, headers={"accept": "application/x-npz;q=0"})
        assert refused.status_code == 200 and refused.headers["content-type"].startswith("application/json")
        assert "explanations" in refused.json()
        npz = c.post("/explain", json=body, headers={"accept": "application/json;q=0.1, application/x-npz"})
        assert npz.status_code == 200 and npz.headers["content-type"].startswith("application/x-npz"), npz.headers
        assert "saliency_0" in np.load(io.BytesIO(npz.content))


# -- HEAD -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/models", "/readyz", "/v2/health/live"])
def test_head_is_get_without_a_body(server, path):
    with server.client() as c:
        get = c.get(path)
        head = c.head(path)
    assert get.status_code == 200, get.text
    assert head.status_code == 200 and head.content == b"", (head.status_code, head.content[:200])
    assert head.headers["content-type"] == get.headers["content-type"]
    assert head.headers["content-length"] == str(len(get.content))
    assert "x-request-id" in head.headers


def test_head_on_a_post_route_is_405(server):
    with server.client() as c:
        r = c.head("/predict")
    assert r.status_code == 405 and r.content == b""
