"""KServe V1 over the data plane, with httpx against a real server: ready state, `:predict`
equal to /predict, `:explain` equal to /explain, and bad requests in the one error format naming
`instances`.
"""

from __future__ import annotations

import pytest

from conftest import N_FEATURES, assert_error, metric, raw_sequence

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server(server_factory, model_store):
    s = server_factory(model_store, {"MAX_SEQUENCES": 4, "API_KEY": "k"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with server.client(headers={"Authorization": "Bearer k"}) as c:
        yield c


@pytest.fixture(autouse=True)
def _no_internal_errors(http):
    yield
    assert metric(http.get("/metrics").text, "icaserve_requests_total", status="500") == 0


SEQS = [raw_sequence(10, seed=1).tolist(), raw_sequence(7, seed=2).tolist()]  # lengths may differ


def test_ready(http, server):
    assert http.get("/v1/models/ica").json() == {"name": "ica", "ready": True}
    assert_error(http.get("/v1/models/nope"), 404, "not_found")
    with server.client() as anonymous:
        assert_error(anonymous.get("/v1/models/ica"), 401, "unauthorized")
        assert_error(anonymous.post("/v1/models/ica:predict", json={"instances": SEQS}), 401, "unauthorized")


@pytest.mark.parametrize("model", ["ica", "lstm"])
def test_predict_equals_predict(http, model):
    r = http.post(f"/v1/models/{model}:predict", json={"instances": SEQS})
    assert r.status_code == 200, r.text
    want = http.post(f"/models/{model}/predict", json={"inputs": SEQS}).json()
    assert r.json() == {"predictions": want["predictions"]}


def test_explain_equals_explain(http):
    options = {"method": "integrated_gradients", "parameters": {"steps": 6}, "target": "all", "normalize": "sum"}
    r = http.post("/v1/models/ica:explain", json={"instances": SEQS, **options})
    assert r.status_code == 200, r.text
    want = http.post("/models/ica/explain", json={"inputs": SEQS, **options}).json()
    assert r.json()["explanations"] == want["explanations"]
    assert len(r.json()["explanations"][0]["attributions"]) == 3


@pytest.mark.parametrize("verb, body, status, field", [
    ("predict", {}, 422, "instances"),
    ("predict", {"inputs": SEQS}, 422, "instances"),
    ("predict", {"instances": SEQS, "method": "gradient"}, 422, "method"),
    ("predict", {"instances": []}, 422, "instances"),
    ("predict", {"instances": [[[0.0] * (N_FEATURES - 1)]]}, 422, "instances[0]"),
    ("predict", {"instances": [[[0.0] * N_FEATURES, [0.0, "x"] + [0.0] * (N_FEATURES - 2)]]}, 422,
     "instances[0][1][1]"),
    ("predict", [1, 2], 422, "body"),
    ("explain", {"instances": SEQS, "method": "magic"}, 422, "method"),
    ("explain", {"instances": SEQS, "parameters": {"steps": 4}}, 422, "parameters.steps"),
    ("explain", {"instances": SEQS, "target": "sideways"}, 422, "target"),
    ("explain", {"instances": [[[1e30] * N_FEATURES]]}, 422, "instances[0][0][0]"),
])
def test_bad_requests(http, verb, body, status, field):
    assert_error(http.post(f"/v1/models/ica:{verb}", json=body), status, field=field)


def test_unknown_model_and_bad_json(http):
    assert_error(http.post("/v1/models/nope:predict", json={"instances": SEQS}), 404, "not_found")
    assert_error(http.post("/v1/models/ica:predict", content=b"{nope", headers={"content-type": "application/json"}),
                 400, "malformed_body", "body")
