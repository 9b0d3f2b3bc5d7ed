"""service/tensor_json.py: the JSON API's `inputs` read straight into float32, equal to the general
path (orjson, then numpy) bit for bit where it applies, and out of the way everywhere else."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from service import tensor_json
from service.inputs import parse_json

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not tensor_json.available(), reason="no C compiler: orjson reads every body")


def _general(body: bytes) -> list[np.ndarray]:
    return [np.asarray(s, dtype=np.float32) for s in orjson.loads(body)["inputs"]]


def _number(rng: random.Random) -> str:
    """A JSON number in one of many spellings (integers of at most 15 digits: longer ones are left
    to orjson, which keeps them as exact ints)."""
    v = rng.choice([rng.gauss(0, 1), rng.gauss(0, 1e6), rng.gauss(0, 1e-6), rng.uniform(-1e30, 1e30),
                    10 ** rng.uniform(-45, 38) * rng.choice([-1, 1])])
    form = rng.randrange(9)
    g17 = "%.17g" % v
    if g17.lstrip("-").isdigit():  # a big integral float prints as a long integer
        g17 += ".0"
    return [repr(v), "%.5f" % v, "%e" % v, g17, "%.25e" % v, str(rng.randint(-10**15 + 1, 10**15 - 1)),
            "%.3E" % v, "0.%s%d" % ("0" * rng.randint(0, 30), rng.randint(1, 10**9)), rng.choice(["-0", "0", "-0.0"])][form]


def test_numbers_equal_orjson_then_numpy_bit_for_bit():
    rng = random.Random(7)
    checked = 0
    for _ in range(2000):
        rows = [[_number(rng) for _ in range(8)] for _ in range(4)]
        body = ('{"inputs": [[' + ",".join("[" + ",".join(r) + "]" for r in rows) + "]]}").encode()
        want = _general(body)[0]
        got = tensor_json.parse(body, 64)
        if not np.isfinite(want).all():
            assert got is None  # the general path names the value
            continue
        assert got is not None, body
        assert got["inputs"][0].tobytes() == want.tobytes(), body
        checked += 1
    assert checked > 1900


def test_a_typical_body_and_its_other_members():
    x = np.random.default_rng(0).standard_normal((3, 20, 7)).round(5)
    body = orjson.dumps({"method": "integrated_gradients", "inputs": x.tolist(), "target": ["a", 1],
                         "parameters": {"steps": 8, "note": "a \"quoted\" ] , string"}})
    data = tensor_json.parse(body, 64)
    assert data is not None and set(data) == {"method", "inputs", "target", "parameters"}
    assert data["parameters"] == {"steps": 8, "note": "a \"quoted\" ] , string"} and data["target"] == ["a", 1]
    for got, want in zip(data["inputs"], _general(body)):
        assert got.dtype == np.float32 and got.shape == (20, 7) and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("body", [
    b'{"inputs": [[[1, 2], [3]]]}',  # ragged
    b'{"inputs": [[[01]]]}', b'{"inputs": [[[1.]]]}', b'{"inputs": [[[.5]]]}', b'{"inputs": [[[+1]]]}',  # not JSON numbers
    b'{"inputs": [[[1e400]]]}', b'{"inputs": [[[NaN]]]}',  # not finite
    b'{"inputs": [[[1234567890123456]]]}',  # an int orjson keeps exact
    b'{"inputs": [[[true]]]}', b'{"inputs": [[["1"]]]}', b'{"inputs": [[[null]]]}',
    b'{"inputs": []}', b'{"inputs": [[]]}', b'{"inputs": [[[]]]}', b'{"inputs": [[1, 2]]}', b'{"inputs": [[[[1]]]]}',
    b'{"inputs": [[[1]]], "inputs": [[[2]]]}', b'{"inp\\u0075ts": [[[1]]]}',  # two, or one behind an escape
    b'{"inputs": [[[1]]]} x', b'{"inputs": [[[1,]]]}', b'{"inputs": [[[1]]],}', b'[1]', b'{}', b'',
    b'{"inputs": [[[1]]], "x": [1,}',  # the rest is not JSON
])
def test_anything_else_is_left_to_the_general_path(body):
    assert tensor_json.parse(body, 64) is None


def test_more_sequences_than_allowed_is_left_to_the_general_path():
    body = orjson.dumps({"inputs": [[[1.0]]] * 5})
    assert tensor_json.parse(body, 4) is None
    assert len(tensor_json.parse(body, 5)["inputs"]) == 5


def test_parse_json_takes_it_only_when_asked():
    body = orjson.dumps({"inputs": [[[1.5, 2.5]]]})
    assert isinstance(parse_json(body, "application/json", inputs_as_arrays=64)["inputs"][0], np.ndarray)
    assert parse_json(body, "application/json")["inputs"] == [[[1.5, 2.5]]]


def test_switched_off_by_environment():
    code = "from service import tensor_json; print(tensor_json.available())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ICASERVE_FAST_JSON": "0"})
    assert out.stdout.split() == ["False"], out.stderr


def test_api_answers_equal_with_and_without_it(model_store, monkeypatch):
    """The same requests through the JSON API, with the scanner and with every body left to orjson:
    the same answers and errors (wrong features, too long, out of range, non-finite, ragged)."""
    from fastapi.testclient import TestClient

    from conftest import raw_sequence
    from service.app import create_app
    from service.settings import Settings

    bodies = [
        {"inputs": [raw_sequence(30).tolist(), raw_sequence(12, seed=3).tolist()]},
        {"inputs": [raw_sequence(30, seed=1).tolist()], "method": "integrated_gradients", "parameters": {"steps": 4}},
        {"inputs": [[[1.0] * 5] * 30]},  # wrong number of features
        {"inputs": [raw_sequence(30).tolist()], "extra": 1},  # an unknown member
        {"inputs": [(raw_sequence(30) * 1e30).tolist()]},  # out of the training range
        {"inputs": [raw_sequence(30).tolist()] * 100},  # more sequences than allowed
    ]
    texts = [b'{"inputs": [[[1e39, 1, 1, 1]]]}', b'{"inputs": [[[1, 2], [3]]]}']  # not finite in float32; ragged
    calls = []
    real = tensor_json.parse

    def counting(body, max_sequences):
        out = real(body, max_sequences)
        calls.append(out is not None)
        return out

    app = create_app(Settings(store=model_store, device="cpu", torch_threads=1, poll_interval_s=0, log_level="error"))
    with TestClient(app, raise_server_exceptions=False) as c:
        answers = []
        for general in (False, True):
            if general:
                monkeypatch.setattr(tensor_json, "parse", lambda body, max_sequences: None)
            else:
                monkeypatch.setattr(tensor_json, "parse", counting)
            got = []
            for body in bodies:
                path = "/explain" if "method" in body else "/predict"
                got.append(c.post(path, json=body))
            for text in texts:
                got.append(c.post("/predict", content=text, headers={"content-type": "application/json"}))
            answers.append(got)
    assert any(calls), "the scanner never took a body"
    for a, b in zip(*answers):
        assert a.status_code == b.status_code, (a.text, b.text)
        ja, jb = a.json(), b.json()
        ja.pop("request_id", None), jb.pop("request_id", None)
        assert ja == jb
    assert [r.status_code for r in answers[0]] == [200, 200, 422, 422, 422, 422, 422, 422]
