"""Open Inference Protocol (V2), complete: a real `tritonclient.http` client with its defaults
(binary tensors both ways) against a real server, the saliency output, the JSON path with raw
httpx, the model repository extension and the manifest's explanation quality in the metadata.

One server for the module (a store copy whose `ica` v2 manifest carries `explanation_quality`).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from conftest import CLASS_NAMES, N_FEATURES, assert_error, metric, raw_sequence

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

ADMIN = "admin-key-for-tests"
# as `icaserve evaluate` writes it (model_store.store.ExplanationQuality)
QUALITY = {"dataset": "middle_box", "n_samples": 30, "seed": 0, "accuracy": 0.9,
           "methods": {"gradient": {"roc_auc": 0.61, "top_k_jaccard": 0.2}, "tsr": {"roc_auc": 0.7,
                                                                                     "top_k_jaccard": None}}}


@pytest.fixture(scope="module")
def server(server_factory, copy_store):
    store = copy_store()
    path = store / "ica" / "2" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["explanation_quality"] = QUALITY  # the manifest is not checksummed; the files are
    path.write_text(json.dumps(manifest))
    s = server_factory(store, {"ADMIN_KEY": ADMIN, "MAX_SEQUENCES": 8})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


@pytest.fixture
def client(server):
    c = triton.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60.0)
    yield c
    c.close()


def batch(b: int = 3, t: int = 10, seed: int = 0) -> np.ndarray:
    return np.stack([raw_sequence(t, seed=seed + i) for i in range(b)])


@pytest.fixture(autouse=True)
def _no_internal_errors(http):
    yield
    text = http.get("/metrics").text
    assert metric(text, "icaserve_requests_total", status="500") == 0


def test_server_and_model_metadata(client, http):
    meta = client.get_server_metadata()
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    assert client.is_server_ready() and client.is_model_ready("ica")
    model = client.get_model_metadata("ica")
    assert {o["name"] for o in model["outputs"]} == {"probabilities", "logits", "saliency"}
    assert model["parameters"]["explanation_quality"] == QUALITY
    # absent in a manifest: omitted, no error
    assert "explanation_quality" not in client.get_model_metadata("lstm")["parameters"]
    listed = {m["name"]: m for m in http.get("/models").json()["models"]}
    assert listed["ica"]["manifest"]["explanation_quality"] == QUALITY
    assert "explanation_quality" not in listed["lstm"]["manifest"]
    assert http.get("/models/ica").json()["manifest"]["explanation_quality"] == QUALITY


@pytest.mark.parametrize("model", ["ica", "lstm"])
def test_tritonclient_defaults_infer_equals_predict(client, http, model):
    x = batch()
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary_data=True: the default that used to get 400
    result = client.infer(model, [inp])  # no outputs named: all of them, binary
    pred = http.post(f"/models/{model}/predict", json={"inputs": x.tolist()}).json()
    want = np.array([list(p["probabilities"].values()) for p in pred["predictions"]])
    probs, logits = result.as_numpy("probabilities"), result.as_numpy("logits")
    assert probs.dtype == np.float32 and probs.shape == (3, len(CLASS_NAMES))
    np.testing.assert_allclose(probs, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(logits, [p["logits"] for p in pred["predictions"]], rtol=1e-6, atol=1e-7)
    assert result.get_response()["model_version"] == str(pred["version"])


def test_tritonclient_json_outputs_and_fp64_input(client, http):
    x = batch(2, 7, seed=5).astype(np.float64)
    inp = triton.InferInput("x", list(x.shape), "FP64")
    inp.set_data_from_numpy(x)
    out = [triton.InferRequestedOutput("logits", binary_data=False)]
    result = client.infer("ica", [inp], outputs=out)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["logits"]
    pred = http.post("/predict", json={"inputs": x.tolist()}).json()
    np.testing.assert_allclose(result.as_numpy("logits"), [p["logits"] for p in pred["predictions"]], rtol=1e-6)


@pytest.mark.parametrize("method, params, target", [
    ("gradient", {}, "predicted"),
    ("integrated_gradients", {"steps": 8}, "all"),
    ("occlusion", {"window": [2, 2]}, "up"),
])
def test_tritonclient_saliency_equals_explain(client, http, method, params, target):
    x = batch(2, 9, seed=11)
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    outputs = [triton.InferRequestedOutput("saliency"), triton.InferRequestedOutput("probabilities")]
    wire = {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in params.items()}
    result = client.infer("ica", [inp], outputs=outputs,
                          parameters={"method": method, "target": target, **wire})
    sal = result.as_numpy("saliency")
    explained = http.post("/explain", json={"inputs": x.tolist(), "method": method, "parameters": params,
                                            "target": target})
    assert explained.status_code == 200, explained.text
    want = np.array([[a["saliency"] for a in e["attributions"]] for e in explained.json()["explanations"]],
                    dtype=np.float32)
    k = len(CLASS_NAMES) if target == "all" else 1
    assert sal.shape == (2, k, 9, N_FEATURES) == want.shape and sal.dtype == np.float32
    np.testing.assert_allclose(sal, want, rtol=1e-5, atol=1e-7)
    probs = [list(e["prediction"]["probabilities"].values()) for e in explained.json()["explanations"]]
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, rtol=1e-6, atol=1e-7)


def test_tritonclient_errors_are_clean(client):
    x = batch(1, 4)
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="parameters.steps"):
        client.infer("ica", [inp], outputs=[triton.InferRequestedOutput("saliency")],
                     parameters={"method": "integrated_gradients", "steps": 10_000})
    with pytest.raises(InferenceServerException, match="unknown output"):
        client.infer("ica", [inp], outputs=[triton.InferRequestedOutput("nope")])
    bad = triton.InferInput("x", [1, 4, N_FEATURES - 1], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 4, N_FEATURES - 1), np.float32))
    with pytest.raises(InferenceServerException, match="inputs\\[0\\].shape"):
        client.infer("ica", [bad])


# -- the wire, by hand -----------------------------------------------------------------------------

def binary_request(header: dict, *chunks: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), {"Inference-Header-Content-Length": str(len(head))}


def split_response(r) -> tuple[dict, bytes]:
    n = int(r.headers["inference-header-content-length"])
    return json.loads(r.content[:n]), r.content[n:]


def test_binary_wire_format(http):
    x = batch(2, 5, seed=3)
    body, headers = binary_request({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                                "parameters": {"binary_data_size": x.nbytes}}],
                                    "outputs": [{"name": "logits", "parameters": {"binary_data": True}},
                                                {"name": "probabilities"}]}, x.tobytes())
    r = http.post("/v2/models/ica/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/octet-stream")
    head, rest = split_response(r)
    logits_meta, probs_meta = head["outputs"]
    assert logits_meta["parameters"]["binary_data_size"] == len(rest) == 2 * len(CLASS_NAMES) * 4
    assert "data" not in logits_meta and len(probs_meta["data"]) == 2 * len(CLASS_NAMES)
    logits = np.frombuffer(rest, "<f4").reshape(2, -1)
    pred = http.post("/predict", json={"inputs": x.tolist()}).json()
    np.testing.assert_allclose(logits, [p["logits"] for p in pred["predictions"]], rtol=1e-6)
    # INT32 binary: the declared datatype is honoured
    xi = np.round(x).astype("<i4")
    body, headers = binary_request({"inputs": [{"name": "x", "shape": list(xi.shape), "datatype": "INT32",
                                                "parameters": {"binary_data_size": xi.nbytes}}]}, xi.tobytes())
    r = http.post("/v2/models/ica/infer", content=body, headers={**headers, "content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    want = http.post("/predict", json={"inputs": xi.tolist()}).json()["predictions"]
    got = np.array(r.json()["outputs"][1]["data"]).reshape(2, -1)
    np.testing.assert_allclose(got, [p["logits"] for p in want], rtol=1e-6)


def test_saliency_json_path(http):
    x = batch(1, 6, seed=21)
    r = http.post("/v2/models/ica/infer", json={
        "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}],
        "outputs": [{"name": "saliency"}],
        "parameters": {"method": "input_x_gradient", "target": "up,0", "absolute": False}})
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["name"] == "saliency" and out["shape"] == [1, 2, 6, N_FEATURES] and out["datatype"] == "FP32"
    e = http.post("/explain", json={"inputs": x.tolist(), "method": "input_x_gradient", "target": ["up", 0],
                                    "absolute": False}).json()
    want = [[a["saliency"] for a in e["explanations"][0]["attributions"]]]
    np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), want, rtol=1e-5, atol=1e-7)


def v2(shape, data=None, datatype="FP32", **extra) -> dict:
    tensor = {"name": "x", "shape": shape, "datatype": datatype, **extra}
    if data is not None:
        tensor["data"] = data
    return tensor


ROWS = [0.5] * (2 * N_FEATURES)


@pytest.mark.parametrize("case, body, headers, status, field", [
    ("size_mismatch", binary_request({"inputs": [v2([1, 2, N_FEATURES], parameters={"binary_data_size": 12})]},
                                     b"\0" * 12), {}, 422, "inputs[0].parameters.binary_data_size"),
    ("trailing_bytes", binary_request({"inputs": [v2([1, 2, N_FEATURES], ROWS)]}, b"\0" * 8), {}, 422, "body"),
    ("header_longer_than_body", (b"{}", {"Inference-Header-Content-Length": "99"}), {}, 400,
     "Inference-Header-Content-Length"),
    ("header_not_a_number", (b"{}", {"Inference-Header-Content-Length": "-1"}), {}, 400,
     "Inference-Header-Content-Length"),
    ("binary_wrong_media_type", binary_request({"inputs": [v2([1, 1, N_FEATURES],
                                                               parameters={"binary_data_size": 4 * N_FEATURES})]},
                                               b"\0" * 4 * N_FEATURES), {"content-type": "text/plain"}, 415, "body"),
    ("binary_nan", binary_request({"inputs": [v2([1, 1, N_FEATURES], parameters={"binary_data_size": 24})]},
                                  struct.pack("<6f", *([float("nan")] + [0.0] * 5))), {}, 422, "inputs[0].data[0][0][0]"),
    ("no_data", ({"inputs": [v2([1, 2, N_FEATURES])]}, {}), {}, 422, "inputs[0].data"),
    ("bad_method", ({"inputs": [v2([1, 2, N_FEATURES], ROWS)], "outputs": [{"name": "saliency"}],
                     "parameters": {"method": "magic"}}, {}), {}, 422, "parameters.method"),
    ("bad_target", ({"inputs": [v2([1, 2, N_FEATURES], ROWS)], "outputs": [{"name": "saliency"}],
                     "parameters": {"target": "sideways"}}, {}), {}, 422, "parameters.target"),
    ("foreign_parameter", ({"inputs": [v2([1, 2, N_FEATURES], ROWS)], "outputs": [{"name": "saliency"}],
                            "parameters": {"steps": 4}}, {}), {}, 422, "parameters.steps"),
    ("binary_flag_not_bool", ({"inputs": [v2([1, 2, N_FEATURES], ROWS)],
                               "outputs": [{"name": "logits", "parameters": {"binary_data": "yes"}}]}, {}), {}, 422,
     "outputs[0].parameters.binary_data"),
])
def test_v2_bad_requests(http, case, body, headers, status, field):
    content, extra = body
    kwargs = {"content": content} if isinstance(content, bytes) else {"json": content}
    r = http.post("/v2/models/ica/infer", headers={**extra, **headers}, **kwargs)
    assert_error(r, status, field=field)


# -- model repository extension --------------------------------------------------------------------

def test_model_repository(http):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert_error(http.post("/v2/repository/index"), 401, "unauthorized")
    index = http.post("/v2/repository/index", headers=admin)
    assert index.status_code == 200, index.text
    by_name = {m["name"]: m for m in index.json()}
    assert by_name["ica"] == {"name": "ica", "version": "2", "state": "READY", "reason": ""}
    x = {"inputs": [v2([1, 2, N_FEATURES], ROWS)]}
    try:
        assert http.post("/v2/repository/models/lstm/unload", headers=admin).status_code == 200
        assert_error(http.post("/v2/models/lstm/infer", json=x), 404, "not_found")
        assert_error(http.post("/models/lstm/predict", json={"inputs": [[ROWS[:N_FEATURES]] * 3]}), 404)
        assert http.get("/v2/models/lstm/ready").json() == {"name": "lstm", "ready": False}
        ready_only = http.post("/v2/repository/index", headers=admin, json={"ready": True}).json()
        assert "lstm" not in {m["name"] for m in ready_only}
        state = {m["name"]: m for m in http.post("/v2/repository/index", headers=admin).json()}["lstm"]
        assert state["state"] == "UNAVAILABLE" and state["reason"] == "unloaded"
        assert http.post("/v2/models/ica/infer", json=x).status_code == 200  # the others still serve
    finally:
        assert http.post("/v2/repository/models/lstm/load", headers=admin).status_code == 200
    assert http.get("/v2/models/lstm/ready").json() == {"name": "lstm", "ready": True}
    assert http.post("/v2/models/lstm/infer", json=x).status_code == 200
    assert_error(http.post("/v2/repository/models/nope/load", headers=admin), 404, "not_found")
    assert_error(http.post("/v2/repository/models/nope/unload", headers=admin), 404, "not_found")
