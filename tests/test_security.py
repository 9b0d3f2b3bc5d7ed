"""Security (issue 6): keys, the admin API, paths that try to leave the store, what loads, CORS.

- Bearer keys: the inference key opens inference and listing, the admin key also opens
  /admin/*; the inference key never opens admin (401), and with no admin key configured the admin
  API is off (403) whatever is sent. Keys are compared with `hmac.compare_digest` (checked by
  structure: every decision goes through it, and a compare_digest answering the opposite turns
  every decision around, so no `==` beside it decides) and never written to the log: a real
  server with JSON logs at info level gets right, wrong and near-miss keys, and its whole stderr
  is searched.
- Model names and versions cannot reach outside the store: encoded and literal dot segments,
  encoded slashes and backslashes, NUL, absolute paths, odd versions (-1, 1e3, ², ...), very long
  names, sent as raw bytes over a socket (an HTTP client would tidy the path) -> 404 / 422 in the
  common format, never a file.
- Only checksum-verified files inside the version folder load: a tampered model.ts, a manifest
  pointing at a file in another folder (with the right checksum), an absolute path, and a
  symlink to a file outside the folder (same bytes, right checksum) are all refused.
- CORS is off by default (no Access-Control-Allow-Origin, preflight or not) and on for exactly
  the origins in ICASERVE_CORS_ORIGINS.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import N_FEATURES, metric

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

# Fresh per run, and distinctive, so a hit in the log cannot be a coincidence.
API_KEY = "sec-api-" + secrets.token_hex(12)
ADMIN_KEY = "sec-admin-" + secrets.token_hex(12)
WRONG_KEYS = [API_KEY[:-1], API_KEY + "x", API_KEY.upper(), ADMIN_KEY[:-1], "sec-wrong-" + secrets.token_hex(8)]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ROW = [0.5] * N_FEATURES
BODY = {"inputs": [[ROW] * 4]}




def assert_error(status: int, body: dict, expected: int | tuple[int, ...], code: str | None = None) -> None:
    expected = (expected,) if isinstance(expected, int) else expected
    assert status in expected, (status, body)
    assert set(body) == {"error", "code", "field", "request_id"}, body
    if code is not None:
        assert body["code"] == code, body


@pytest.fixture(scope="module")
def secure_server(server_factory, copy_store):
    server = server_factory(copy_store(), {"API_KEY": API_KEY, "ADMIN_KEY": ADMIN_KEY, "LOG_JSON": "true",
                                           "LOG_LEVEL": "info"})
    yield server
    server.stop()


def raw_request(url: str, method: str, target: bytes, headers: dict[str, str] | None = None,
                body: bytes = b"", extra_header_bytes: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request with the request target sent exactly as given (no client-side tidying)."""
    host, port = url.removeprefix("http://").split(":")
    head = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: " + host.encode(), b"Connection: close",
            b"Content-Length: " + str(len(body)).encode()]
    head += [f"{k}: {v}".encode("latin-1") for k, v in (headers or {}).items()]
    if extra_header_bytes:
        head.append(extra_header_bytes)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    top, _, payload = raw.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, hdrs, payload


# -- keys -------------------------------------------------------------------------------------------------


def test_keys_open_what_they_should_and_never_reach_the_log(secure_server):
    calls = 0
    with secure_server.client() as c:
        for key in [*WRONG_KEYS, None]:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            for method, path in (("POST", "/predict"), ("POST", "/explain"), ("GET", "/models"),
                                 ("POST", "/v2/models/ica/infer"), ("POST", "/admin/reload")):
                r = c.request(method, path, json=BODY, headers=headers)
                calls += 1
                assert r.status_code == 401, (key, path, r.text)
                assert r.json()["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
                assert not key or key not in r.text  # never echoed back
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert c.post("/predict", json=BODY, headers={"Authorization": f"{scheme} {API_KEY}"}).status_code == 200
        for header in (API_KEY, f"Basic {API_KEY}", f"Token {API_KEY}", f"Bearer{API_KEY}", f"Bearer {API_KEY} x"):
            assert c.post("/predict", json=BODY, headers={"Authorization": header}).status_code == 401, header
        assert c.post("/explain", json=BODY, headers=AUTH).status_code == 200
        assert c.get("/models", headers=AUTH).status_code == 200
        assert c.post("/predict", json=BODY, headers=ADMIN).status_code == 200  # the admin key also reads
        # admin: only the admin key; the inference key is refused
        r = c.post("/admin/reload", headers=AUTH)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text
        r = c.post("/admin/reload", headers=ADMIN)
        assert r.status_code == 200 and r.json()["serving"] == {"ica": 2, "lstm": 1}, r.text
        # keys in other places still do not count, and are not logged either
        assert c.post("/predict", json=BODY, headers={"X-Api-Key": API_KEY}).status_code == 401
        assert c.post(f"/predict?api_key={API_KEY}", json=BODY).status_code == 401
        assert c.post("/predict", json={**BODY, "api_key": API_KEY}, headers={"Authorization": "Bearer no"}
                      ).status_code == 401
        text = c.get("/metrics").text
        assert API_KEY not in text and ADMIN_KEY not in text
        assert metric(text, "icaserve_errors_total", kind="unauthorized") >= calls
    # bytes no client library would send: not latin-1 text, a NUL, a key 8 KiB long
    raw_ids = [f"sec-raw-{i}-{secrets.token_hex(4)}" for i in range(3)]
    for rid, extra in zip(raw_ids, (b"Authorization: Bearer \xff\xfe" + API_KEY.encode(),
                                    b"Authorization: Bearer " + b"k" * 8192,
                                    b"Authorization: Bearer " + API_KEY.encode() + b"\xc3\xa9")):
        status, _, payload = raw_request(secure_server.url, "POST", b"/predict",
                                         {"Content-Type": "application/json", "X-Request-ID": rid},
                                         json.dumps(BODY).encode(), extra)
        assert_error(status, json.loads(payload), 401, "unauthorized")

    # the access line is written after the response is sent: wait (bounded) until the last
    # requests' lines are in the file, so the search below covers them
    def logged() -> bool:
        text = secure_server.log_path.read_text(errors="replace")
        return all(f'"request_id": "{rid}"' in text for rid in raw_ids)

    deadline = time.monotonic() + 30
    while not logged() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert logged(), "the last requests never reached the access log"
    log = secure_server.log_path.read_text(errors="replace")
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    access = [r for r in lines if r.get("name") == "icaserve.access"]
    assert len(access) >= calls, "the requests should be in the access log (info level)"
    for secret in (API_KEY, ADMIN_KEY, *WRONG_KEYS, API_KEY[:16], ADMIN_KEY[:16]):
        assert secret not in log, f"{secret!r} is in the server log"
    assert "Bearer" not in log and "authorization" not in log.lower()


def test_admin_api_is_off_without_an_admin_key(model_store):
    """Only an inference key configured: the admin API refuses everyone with 403, the inference
    key included; inference still works with its key."""
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(store=model_store, device="cpu", torch_threads=1, poll_interval_s=0,
                              log_level="error", api_key=API_KEY))
    with TestClient(app) as c:
        for headers in ({}, AUTH, {"Authorization": f"Bearer {ADMIN_KEY}"}, {"Authorization": "Bearer "}):
            r = c.post("/admin/reload", headers=headers)
            assert_error(r.status_code, r.json(), 403, "forbidden")
        assert c.post("/predict", json=BODY, headers=AUTH).status_code == 200
        assert c.post("/predict", json=BODY).status_code == 401


def test_keys_are_compared_in_constant_time(model_store, monkeypatch):
    """Constant time, checked by structure rather than by a stopwatch (which a busy machine makes
    meaningless): every key decision is hmac.compare_digest's answer on the whole keys' bytes, and
    nothing beside it (an early-exit `==`) decides: a compare_digest that answers the opposite of
    the truth turns the server's decisions around."""
    import hmac

    from service import security

    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest
    mode = {"contrary": False}

    def spy(a, b):
        seen.append((a, b))
        return real(a, b) != mode["contrary"]

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(store=model_store, device="cpu", torch_threads=1, poll_interval_s=0,
                              log_level="error", api_key=API_KEY, admin_key=ADMIN_KEY))
    wrong = {"Authorization": "Bearer nope"}
    with TestClient(app) as c:
        # 1. every decision goes through hmac.compare_digest, on the keys themselves
        for headers, status in ((AUTH, 200), (wrong, 401), (ADMIN, 200)):
            seen.clear()
            assert c.get("/models", headers=headers).status_code == status
            assert seen and all(API_KEY.encode() in pair or ADMIN_KEY.encode() in pair for pair in seen), seen
        seen.clear()
        assert c.post("/admin/reload", headers=AUTH).status_code == 401
        assert (AUTH["Authorization"][7:].encode(), ADMIN_KEY.encode()) in seen
        # 2. ... and only it decides: with its answers reversed, the right keys are refused and a
        #    wrong one is let in (no key at all compares nothing and stays refused)
        mode["contrary"] = True
        assert c.post("/admin/reload", headers=ADMIN).status_code == 401
        assert c.post("/admin/reload", headers=wrong).status_code == 200
        assert c.get("/models", headers=wrong).status_code == 200
        assert c.get("/models").status_code == 401
        mode["contrary"] = False
    for given, expected in ((API_KEY, API_KEY), (API_KEY[:-1], API_KEY), ("x" + API_KEY[1:], API_KEY),
                            ("", API_KEY), ("clé-é", "clé-é")):
        seen.clear()
        mode["contrary"] = True
        assert security._matches(given, expected) is (given != expected), (given, expected)
        mode["contrary"] = False
        assert seen == [(given.encode(), expected.encode())]  # one comparison, of the whole keys' bytes
    monkeypatch.undo()

    # 3. correctness, including non-ASCII and empty input
    assert security._matches(API_KEY, API_KEY)
    for given in (None, "", API_KEY[:-1], API_KEY + "\x00", "é" + API_KEY[1:], API_KEY.upper()):
        assert not security._matches(given, API_KEY), given
    assert security._matches("clé-é", "clé-é") and not security._matches("cle-e", "clé-é")


# -- names and versions stay inside the store -----------------------------------------------------------------

ESCAPES = [
    b"/models/..%2F..%2Fetc/predict",
    b"/models/..%2f..%2f..%2f..%2fetc%2fpasswd/predict",
    b"/models/%2E%2E/predict",
    b"/models/%2e%2e%2f%2e%2e%2fetc%2fpasswd/predict",
    b"/models/../../etc/passwd/predict",
    b"/models/ica/../../../../etc/passwd",
    b"/models/..%5C..%5Cetc/predict",
    b"/models/%2Fetc%2Fpasswd/predict",
    b"/models/ica%00/predict",
    b"/models/ica%2F..%2Flstm/versions/1/predict",
    b"/models/.staging/predict",
    b"/models/.%2Fica/predict",
    b"/models/ica/versions/-1/predict",
    b"/models/ica/versions/1e3/predict",
    b"/models/ica/versions/0/predict",
    b"/models/ica/versions/%C2%B2/predict",
    b"/models/ica/versions/%D9%A1/explain",
    b"/models/ica/versions/..%2F2/predict",
    b"/models/ica/versions/1%2F..%2F..%2F..%2Fetc/predict",
    b"/models/ica/versions/+1/predict",
    b"/models/ica/versions/1.0/predict",
    b"/models/ica/versions/0x1/predict",
    b"/models/ica/versions/9999999999/predict",
    b"/models/ica/versions/manifest.json/predict",
    b"/models/" + b"a" * 5000 + b"/predict",
    b"/models/ica/versions/" + b"9" * 5000 + b"/predict",
    b"/models/..%2F..%2Fetc",
    b"/v2/models/..%2F..%2Fetc",
    b"/v2/models/%2E%2E/versions/1",
    b"/v2/models/ica/versions/-1",
    b"/v2/models/ica/versions/..%2F1/infer",
    b"/v2/models/ica/versions/%C2%B2/ready",
]


@pytest.mark.parametrize("target", ESCAPES, ids=[t.decode()[:60] for t in ESCAPES])
def test_names_and_versions_cannot_leave_the_store(secure_server, target):
    method = "GET" if not target.endswith((b"predict", b"explain", b"infer")) else "POST"
    status, headers, payload = raw_request(secure_server.url, method, target,
                                           {**AUTH, "Content-Type": "application/json"}, json.dumps(BODY).encode())
    assert status in (404, 405, 422), (target, status, payload[:300])
    body = json.loads(payload)
    assert_error(status, body, (404, 405, 422))
    assert b"root:" not in payload and "manifest" not in json.dumps(body).lower().replace("manifest.json", "")


def test_a_real_path_still_works_and_nothing_failed_inside(secure_server):
    status, _, payload = raw_request(secure_server.url, "POST", b"/models/ica/versions/1/predict",
                                     {**AUTH, "Content-Type": "application/json"}, json.dumps(BODY).encode())
    assert status == 200 and json.loads(payload)["version"] == 1
    text = httpx.get(f"{secure_server.url}/metrics").text
    assert metric(text, "icaserve_errors_total", kind="internal") == 0
    assert "Traceback" not in secure_server.log(100_000)


def test_the_store_refuses_names_and_file_paths_that_leave_it(tmp_path):
    from model_store import ModelStore
    from model_store.store import InvalidName, VersionNotFound

    store = ModelStore(tmp_path)
    for name in ("..", ".", "../x", "a/b", "/etc", "A", "a" * 65, "ica\x00", "ica\n", "", ".staging", "\\x"):
        with pytest.raises(InvalidName):
            store.resolve(name)
    for version in ("-1", "0", "1e3", "²", "١", "1.0", " 1", "+1", "9" * 10, "../1", -1, 0, True):
        with pytest.raises(VersionNotFound):
            from model_store import check_version

            check_version(version)


# -- only checksum-verified files inside the version folder load ------------------------------------------------


def _publish(model_dir: Path, source: int, change) -> int:
    new = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit()) + 1
    tmp = model_dir / f".incoming-{new}"
    shutil.copytree(model_dir / str(source), tmp, symlinks=True)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["version"] = new
    change(tmp, manifest)
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    tmp.rename(model_dir / str(new))
    return new


def test_only_checksum_verified_files_in_the_version_folder_load(secure_server, tmp_path):
    model_dir = secure_server.store / "lstm"
    good = model_dir / "1" / "model.ts"
    data = good.read_bytes()
    outside = tmp_path / "elsewhere.ts"
    outside.write_bytes(data)  # the same bytes, so the checksum matches

    def tampered(tmp: Path, manifest: dict) -> None:
        b = bytearray((tmp / "model.ts").read_bytes())
        b[len(b) // 3] ^= 0x01
        (tmp / "model.ts").write_bytes(bytes(b))

    def sibling_folder(tmp: Path, manifest: dict) -> None:
        (tmp / "model.ts").unlink()
        manifest["files"]["torchscript"]["path"] = "../1/model.ts"

    def absolute_path(tmp: Path, manifest: dict) -> None:
        manifest["files"]["torchscript"]["path"] = str(outside)

    def symlink_out(tmp: Path, manifest: dict) -> None:
        (tmp / "model.ts").unlink()
        (tmp / "model.ts").symlink_to(outside)

    def appended_bytes(tmp: Path, manifest: dict) -> None:  # a trailing payload: size check
        (tmp / "model.ts").write_bytes(data + b"\x00" * 16)

    cases = {"tampered": (tampered, "checksum"), "sibling_folder": (sibling_folder, "leaves the version folder"),
             "absolute_path": (absolute_path, "leaves the version folder"),
             "symlink_out": (symlink_out, "leaves the version folder"), "appended_bytes": (appended_bytes, "checksum")}
    assert hashlib.sha256(outside.read_bytes()).hexdigest() == json.loads(
        (model_dir / "1" / "manifest.json").read_text())["files"]["torchscript"]["sha256"]
    with secure_server.client() as c:
        for name, (change, words) in cases.items():
            version = _publish(model_dir, 1, change)
            r = c.post("/admin/reload", headers=ADMIN)
            assert r.status_code == 200, r.text
            assert r.json()["serving"]["lstm"] == 1, (name, r.json())
            reason = r.json()["refused"].get(f"lstm/{version}", "")
            assert words in reason.lower(), (name, reason)
            r = c.post(f"/models/lstm/versions/{version}/predict", json=BODY, headers=AUTH)
            assert_error(r.status_code, r.json(), 503, "not_ready")
        r = c.post("/models/lstm/predict", json=BODY, headers=AUTH)
        assert r.status_code == 200 and r.json()["version"] == 1
        text = c.get("/metrics").text
        assert metric(text, "icaserve_model_load_failures_total", model="lstm") == len(cases)
        assert metric(text, "icaserve_model_loaded", model="lstm", version="1") == 1


# -- CORS ---------------------------------------------------------------------------------------------------


def _cors_app(store: Path, monkeypatch, origins: str | None):
    from service.app import create_app
    from service.settings import Settings

    monkeypatch.delenv("ICASERVE_CORS_ORIGINS", raising=False)
    if origins is not None:
        monkeypatch.setenv("ICASERVE_CORS_ORIGINS", origins)
    return create_app(Settings(store=store, device="cpu", poll_interval_s=0, log_level="error"))


def _preflight(c: TestClient, origin: str) -> Any:
    return c.options("/predict", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_is_off_by_default(model_store, monkeypatch):
    c = TestClient(_cors_app(model_store, monkeypatch, None))  # no lifespan needed: nothing is loaded
    for r in (_preflight(c, "http://x"), c.get("/healthz", headers={"Origin": "http://x"}),
              c.post("/predict", json={}, headers={"Origin": "http://x"})):
        assert not any(h.startswith("access-control-") for h in r.headers), dict(r.headers)
    assert _preflight(c, "http://x").status_code == 405  # no CORS layer answers it


def test_cors_on_for_configured_origins_only(model_store, monkeypatch):
    c = TestClient(_cors_app(model_store, monkeypatch, '["http://x"]'))
    r = _preflight(c, "http://x")
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "http://x"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert {"authorization", "content-type"} <= {h.strip().lower() for h in
                                                 r.headers["access-control-allow-headers"].split(",")}
    assert "access-control-allow-credentials" not in r.headers
    r = c.get("/healthz", headers={"Origin": "http://x"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://x"
    for origin in ("http://evil", "http://x.evil", "https://x", "null"):
        r = _preflight(c, origin)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers, (origin, dict(r.headers))
        r = c.get("/healthz", headers={"Origin": origin})
        assert "access-control-allow-origin" not in r.headers, origin
