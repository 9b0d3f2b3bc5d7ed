"""POST /predict and /explain past FastAPI's router (service/fast_path.py): both routes qualify,
and every answer (results, errors, auth, headers, metrics) is the one the router gives."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import assert_error, metric, raw_sequence

KEY = "k" * 24
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextmanager
def client(store, fast: bool, **settings) -> Iterator[TestClient]:
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(store=store, device="cpu", torch_threads=1, poll_interval_s=0, log_level="error",
                              fast_path=fast, api_key=KEY, **settings))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_both_busiest_routes_qualify():
    from fastapi import FastAPI

    from service import api
    from service.fast_path import FAST_PATHS, FastPath

    fast = FastPath(FastAPI(), api.router.routes)
    assert set(fast.routes) == set(FAST_PATHS) == {"/predict", "/explain"}
    for route in fast.routes.values():  # the route's own dependency (the API key check) is run too
        assert [d.__name__ for d in route.dependencies] == ["require_api_key"]
    assert fast.match({"method": "POST", "path": "/predict"}).endpoint is api.predict_default
    assert fast.match({"method": "POST", "path": "/api/explain", "root_path": "/api"}).endpoint is api.explain_default
    for scope in ({"method": "GET", "path": "/predict"}, {"method": "POST", "path": "/predict/"},
                  {"method": "POST", "path": "/models/ica/predict"}):
        assert fast.match(scope) is None


def _same(a, b) -> None:
    assert a.status_code == b.status_code, (a.text, b.text)
    assert a.headers["content-type"] == b.headers["content-type"]
    assert {k for k in a.headers if k not in ("content-length", "date")} == \
        {k for k in b.headers if k not in ("content-length", "date")}
    ja, jb = a.json(), b.json()
    ja.pop("request_id", None), jb.pop("request_id", None)
    assert ja == jb


REQUESTS = [
    ("/predict", {"inputs": [raw_sequence(30).tolist()]}, AUTH),
    ("/explain", {"inputs": [raw_sequence(30, seed=1).tolist()], "method": "integrated_gradients",
                  "parameters": {"steps": 4}, "target": "all"}, AUTH),
    ("/predict", {"inputs": [raw_sequence(30).tolist()]}, {}),  # no key: 401
    ("/predict", {"inputs": [[["1.5"] * 4] * 30]}, AUTH),  # a string: 422 naming the field
    ("/predict", {"inputs": [raw_sequence(30).tolist()], "extra": 1}, AUTH),
    ("/explain", {"inputs": [raw_sequence(30).tolist()], "method": "nope"}, AUTH),
    ("/models/ica/predict", {"inputs": [raw_sequence(30).tolist()]}, AUTH),  # not a fast route
]


def test_answers_equal_with_and_without_the_fast_path(model_store):
    with client(model_store, True) as fast, client(model_store, False) as slow:
        for path, body, headers in REQUESTS:
            a, b = fast.post(path, json=body, headers=headers), slow.post(path, json=body, headers=headers)
            _same(a, b)
        # a body that is not JSON, and one with the wrong media type
        for content, ctype in ((b"{nope", "application/json"), (b"{}", "text/plain")):
            a = fast.post("/predict", content=content, headers={**AUTH, "content-type": ctype})
            b = slow.post("/predict", content=content, headers={**AUTH, "content-type": ctype})
            _same(a, b)
            assert a.status_code in (400, 415)
        assert_error(fast.post("/predict", json=REQUESTS[2][1]), 401, "unauthorized")
        assert fast.post(REQUESTS[0][0], json=REQUESTS[0][1], headers=AUTH).headers["server-timing"].count("dur=") >= 4
        # requests are counted under the route's path either way (one registry per process: deltas)
        for c in (fast, slow):
            for path, body, headers in REQUESTS[:2]:
                before = metric(c.get("/metrics").text, "icaserve_requests_total", endpoint=path, status="200")
                assert c.post(path, json=body, headers=headers).status_code == 200
                after = metric(c.get("/metrics").text, "icaserve_requests_total", endpoint=path, status="200")
                assert after == before + 1, (path, before, after)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "router"])
def test_an_unexpected_error_is_a_500_in_the_error_format(model_store, monkeypatch, fast):
    """A bug answers 500 in the error format with the request id in body and header (either path),
    without its message, and the server goes on answering."""
    from service import dataplane

    def broken(*_a, **_k):
        raise RuntimeError("boom")

    monkeypatch.setattr(dataplane.DataPlane, "sequences", broken)
    with client(model_store, fast) as c:
        r = c.post("/predict", json=REQUESTS[0][1], headers=AUTH)
        body = assert_error(r, 500, "internal")
        assert "boom" not in r.text and "Traceback" not in r.text
        assert body["request_id"] == r.headers["x-request-id"]
        assert c.post("/predict", json={"inputs": [raw_sequence(30).tolist()]}, headers=AUTH).status_code == 500
        monkeypatch.undo()
        assert c.post("/predict", json={"inputs": [raw_sequence(30).tolist()]}, headers=AUTH).status_code == 200


@pytest.mark.parametrize("fast", [True, False])
def test_fast_path_setting_reaches_the_app(model_store, fast):
    with client(model_store, fast) as c:
        r = c.post("/predict", json={"inputs": [raw_sequence(30).tolist()]}, headers=AUTH)
        assert r.status_code == 200 and np.isclose(sum(r.json()["predictions"][0]["probabilities"].values()), 1.0)
        from service.app import RequestContext

        stack = c.app.middleware_stack
        while stack is not None and not isinstance(stack, RequestContext):
            stack = getattr(stack, "app", None)
        assert stack is not None and (stack.fast_path is not None) is fast


# -- the numbers-only shortcut of service/inputs.py (float32 straight from the parsed lists) ----------

ROW = ", ".join(["0.5"] * 4)


@pytest.mark.parametrize("text, plain", [
    (f'{{"inputs": [[[{ROW}], [{ROW}]]]}}', True),
    (f'{{"inputs": [[[{ROW}], [{ROW}]]], "target": ["b", "a"]}}', True),
    (f'{{"inputs": [[["1.5", 0.5, 0.5, 0.5], [{ROW}]]]}}', False),  # a string inside
    (f'{{"inputs": [[[null, 0.5, 0.5, 0.5], [{ROW}]]]}}', False),
    (f'{{"inputs": [[[true, 0.5, 0.5, 0.5], [{ROW}]]]}}', False),
    # a key whose quote is escaped hides no string from the count: backslashes turn the shortcut off
    (f'{{"inputs": [[["1.5", 0.5, 0.5, 0.5], [{ROW}]]], "t\\u0022": 1}}', False),
    (f'{{"inputs": [[["1.5", 0.5, 0.5, 0.5], [{ROW}]]], "a\\"": 1}}', False),
    # a duplicate key: the parsed object has fewer strings than the text
    (f'{{"inputs": [[["x", 0.5, 0.5, 0.5], [{ROW}]]], "inputs": [[[{ROW}], [{ROW}]]]}}', False),
])
def test_numbers_only_shortcut_is_taken_only_when_the_text_proves_it(text, plain):
    from pydantic import BaseModel, ConfigDict

    from service import inputs
    from service.errors import InvalidInput

    class Body(BaseModel):
        model_config = ConfigDict(extra="allow")
        inputs: list
        target: list | None = None

    data = inputs.parse_json(text.encode(), "application/json")
    _, raw = inputs.validate(Body, data)
    assert inputs._TENSORS_PLAIN.get() is plain
    seq = raw["inputs"][0]
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) for row in seq for v in row):
        with pytest.raises(InvalidInput, match=r"inputs\[0\]\[0\]\[0\]: must be a number"):
            inputs.matrix(seq, "inputs[0]", 4, 1, 10)
    else:
        np.testing.assert_array_equal(inputs.matrix(seq, "inputs[0]", 4, 1, 10), np.full((2, 4), 0.5, np.float32))
