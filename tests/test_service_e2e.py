"""End to end: real uvicorn servers on loopback, real HTTP (httpx), the tiny store of conftest.py.

Four servers, each alive only while its test class runs:

- TestAPI: the JSON API and the V2 protocol, open (no keys), small limits; answers checked
  against the models run in-process (logits; saliency against captum on the same TorchScript
  with the manifest's normalisation composed in front), and every kind of bad input.
- TestBatchingAndOverload: long batching window, small explain queue: merged batches, 503.
- TestDeadline: a request timeout shorter than the batching window: 504.
- TestKeysAndHotSwap: API and admin keys, polling for new versions every 0.5 s: 401/403,
  /admin/reload, a new version swapped in under traffic, a corrupted version refused.

No test depends on the order the tests of its class run in: each checks against the state it finds
(serving versions, counters before and after), and the "no 500" check runs after every test.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, Occlusion, Saliency

from attribution.smoothgrad import noise_draws
from conftest import (
    CLASS_NAMES,
    LSTM_ARCH,
    MAX_LENGTH,
    NORMALIZATION,
    N_FEATURES,
    assert_error,
    metric,
    publish,
    wait_for,
)
from model_store import ModelStore

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NPZ = "application/x-npz"
MEAN = np.asarray(NORMALIZATION["mean"], dtype=np.float32)
STD = np.asarray(NORMALIZATION["std"], dtype=np.float32)

# TestAPI's limits.
MAX_SEQUENCES = 8
MAX_BODY = 200_000
MAX_IG_STEPS = 64
MAX_SG_SAMPLES = 32
MAX_COST = 200_000
LSTM_MIN_LENGTH = 3  # patched into the lstm manifest of TestAPI's store copy


# -- helpers ---------------------------------------------------------------------------------------


def seq(length: int, seed: int = 0) -> np.ndarray:
    """A raw-valued T x N sequence around the training distribution, rounded for short bodies."""
    rng = np.random.default_rng(seed)
    x = MEAN + STD * rng.normal(size=(length, N_FEATURES))
    return np.round(x, 4).astype(np.float32)


def as_json(*seqs: np.ndarray) -> list:
    return [s.tolist() for s in seqs]


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def assert_rel_close(actual: Any, expected: Any, rtol: float = 1e-5, what: str = "") -> None:
    """max |a - e| <= rtol * max |e| (relative to the scale of the whole matrix), plus a hair."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    err = float(np.abs(a - e).max())
    scale = float(np.abs(e).max())
    assert err <= rtol * scale + 1e-9, f"{what}: max abs error {err:.3g} vs scale {scale:.3g}"


class Reference:
    """A published version run in-process: its TorchScript with the manifest's normalisation."""

    def __init__(self, store: Path, name: str, version: int) -> None:
        manifest, data = ModelStore(store).read_file(name, version, "torchscript")
        self.module = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
        self.mean = torch.tensor(manifest.normalization.mean, dtype=torch.float32)
        self.std = torch.tensor(manifest.normalization.std, dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module((x - self.mean) / self.std)

    def logits(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self(torch.from_numpy(x)[None]).numpy()[0]

    def attention(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = (torch.from_numpy(x)[None] - self.mean) / self.std
            return self.module.attention_weights(z).numpy()[0]


_REFERENCES: dict[tuple[str, str, int], Reference] = {}


def reference(store: Path, name: str, version: int) -> Reference:
    key = (str(store), name, version)
    if key not in _REFERENCES:
        _REFERENCES[key] = Reference(store, name, version)
    return _REFERENCES[key]


def check_prediction(pred: dict, expected_logits: np.ndarray | None = None) -> None:
    assert set(pred) == {"label", "class_index", "probabilities", "logits"}
    assert list(pred["probabilities"]) == CLASS_NAMES
    probs = np.array(list(pred["probabilities"].values()))
    assert abs(probs.sum() - 1.0) < 1e-9 and (probs >= 0).all()
    logits = np.array(pred["logits"])
    assert logits.shape == (len(CLASS_NAMES),)
    np.testing.assert_allclose(probs, softmax(logits), rtol=1e-6, atol=1e-9)
    assert pred["class_index"] == int(np.argmax(logits))
    assert pred["label"] == CLASS_NAMES[pred["class_index"]]
    if expected_logits is not None:
        assert_rel_close(logits, expected_logits, 1e-5, "logits")


# -- TestAPI: the open server ----------------------------------------------------------------------


@pytest.fixture(scope="class")
def api_server(server_factory, copy_store):
    store = copy_store()
    manifest_path = store / "lstm" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["input"]["min_length"] = LSTM_MIN_LENGTH  # the manifest is not checksummed; the files are
    manifest_path.write_text(json.dumps(manifest))
    server = server_factory(store, {
        "MAX_SEQUENCES": MAX_SEQUENCES, "MAX_BODY_BYTES": MAX_BODY, "MAX_IG_STEPS": MAX_IG_STEPS,
        "MAX_SMOOTHGRAD_SAMPLES": MAX_SG_SAMPLES, "MAX_EXPLAIN_COST": MAX_COST,
    })
    yield server
    server.stop()


@pytest.fixture(scope="class")
def api(api_server):
    with api_server.client() as client:
        yield client


TARGET_MODES = {
    "predicted": None,  # resolved from the prediction
    "up": [2],
    1: [1],
    ("up", 0): [2, 0],
    "all": [0, 1, 2],
}
METHOD_CASES = [
    ("gradient", {}),
    ("input_x_gradient", {}),
    ("integrated_gradients", {"steps": 8}),
    ("smoothgrad", {"samples": 4}),
    ("occlusion", {"window": [3, 2]}),
    ("tsr", {}),
    ("tsr", {"base_method": "input_x_gradient"}),
    ("tsr", {"base_method": "integrated_gradients", "steps": 4, "baseline": "zeros"}),
    ("tsr", {"base_method": "smoothgrad", "samples": 2}),
]


class TestAPI:
    @pytest.fixture(autouse=True)
    def _no_internal_errors(self, api):
        """After every test of this class, whatever order they run in: no request so far has
        produced a 500 (the server counts them; a bad input must be a 4xx)."""
        yield
        text = api.get("/metrics").text
        assert metric(text, "icaserve_errors_total", kind="internal") == 0
        assert metric(text, "icaserve_requests_total", status="500") == 0

    # -- health, listing --------------------------------------------------------------------------
    def test_health(self, api):
        r = api.get("/healthz")
        assert r.status_code == 200 and r.json() == {"status": "alive"}
        r = api.get("/readyz")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["ready"] is True and body["default_model"] == "ica" and body["store_readable"] is True
        assert {"ica/2", "lstm/1"} <= set(body["loaded"])

    def test_models_listing(self, api):
        r = api.get("/models")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["default"] == "ica"
        by_name = {m["name"]: m for m in body["models"]}
        assert sorted(by_name) == ["ica", "lstm"]
        assert by_name["ica"]["versions"] == [1, 2] and by_name["ica"]["serving_version"] == 2
        assert by_name["ica"]["default"] is True and by_name["lstm"]["default"] is False
        man = by_name["ica"]["manifest"]
        assert man["name"] == "ica" and man["version"] == 2
        assert man["input"]["n_features"] == N_FEATURES and man["input"]["class_names"] == CLASS_NAMES
        assert man["input"]["max_length"] == MAX_LENGTH and man["normalization"] == NORMALIZATION
        assert man["architecture"]["attention"] == "ica" and "torchscript" in man["files"]
        assert set(by_name["lstm"]["manifest"]["files"]) == {"torchscript", "onnx"}

        r = api.get("/models/lstm")
        assert r.status_code == 200, r.text
        one = r.json()
        assert one["name"] == "lstm" and one["versions"] == [1] and one["serving_version"] == 1
        assert one["manifest"]["input"]["min_length"] == LSTM_MIN_LENGTH
        assert_error(api.get("/models/nope"), 404, "not_found")
        assert_error(api.get("/models/Bad.Name"), 404, "not_found")

    # -- predict ----------------------------------------------------------------------------------
    @pytest.mark.parametrize("path, name, version", [
        ("/predict", "ica", 2),
        ("/models/ica/predict", "ica", 2),
        ("/models/ica/versions/2/predict", "ica", 2),
        ("/models/ica/versions/latest/predict", "ica", 2),
        ("/models/ica/versions/1/predict", "ica", 1),
        ("/models/lstm/predict", "lstm", 1),
        ("/models/lstm/versions/1/predict", "lstm", 1),
    ])
    def test_predict(self, api, api_server, path, name, version):
        lengths = [3, 5, 12, 30, MAX_LENGTH]  # different lengths in one request
        seqs = [seq(t, seed=t) for t in lengths]
        r = api.post(path, json={"inputs": as_json(*seqs)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == name and body["version"] == version
        assert len(body["predictions"]) == len(seqs)
        ref = reference(api_server.store, name, version)
        for pred, x in zip(body["predictions"], seqs):
            check_prediction(pred, ref.logits(x))

    def test_versions_differ(self, api):
        x = seq(12)
        v1 = api.post("/models/ica/versions/1/predict", json={"inputs": as_json(x)}).json()
        v2 = api.post("/models/ica/versions/2/predict", json={"inputs": as_json(x)}).json()
        assert (v1["version"], v2["version"]) == (1, 2)
        assert not np.allclose(v1["predictions"][0]["logits"], v2["predictions"][0]["logits"])

    # -- explain: shapes for every method and target mode -----------------------------------------
    @pytest.mark.parametrize("method, params", METHOD_CASES,
                             ids=[f"{m}-{p.get('base_method', '')}" for m, p in METHOD_CASES])
    @pytest.mark.parametrize("target", list(TARGET_MODES), ids=str)
    def test_explain_shapes(self, api, api_server, method, params, target):
        seqs = [seq(12, seed=1), seq(7, seed=2)]
        wire_target = list(target) if isinstance(target, tuple) else target
        r = api.post("/explain", json={"inputs": as_json(*seqs), "method": method, "parameters": params,
                                       "target": wire_target})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["model"], body["version"], body["method"]) == ("ica", 2, method)
        assert len(body["explanations"]) == 2
        ref = reference(api_server.store, "ica", 2)
        for e, x in zip(body["explanations"], seqs):
            check_prediction(e["prediction"], ref.logits(x))
            expected = TARGET_MODES[target] or [e["prediction"]["class_index"]]
            assert [a["target_index"] for a in e["attributions"]] == expected
            assert [a["target"] for a in e["attributions"]] == [CLASS_NAMES[k] for k in expected]
            assert e["attention"] is None
            for a in e["attributions"]:
                sal = np.array(a["saliency"])
                assert sal.shape == x.shape
                assert np.isfinite(sal).all() and (sal >= 0).all()  # absolute by default
                np.testing.assert_allclose(a["time_profile"], sal.sum(axis=1), rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(a["feature_profile"], sal.sum(axis=0), rtol=1e-5, atol=1e-6)
                assert len(a["time_profile"]) == len(x) and len(a["feature_profile"]) == N_FEATURES
                if method == "tsr":
                    assert sal.max() <= 1.0 + 1e-6

    # -- explain: the numbers, against captum -----------------------------------------------------
    @pytest.mark.parametrize("method, params", [
        ("gradient", {}),
        ("input_x_gradient", {}),
        ("integrated_gradients", {"steps": 16}),  # baseline: the training mean (default)
        ("integrated_gradients", {"steps": 16, "baseline": "mean"}),
        ("integrated_gradients", {"steps": 20, "baseline": "zeros"}),
        ("occlusion", {"window": [3, 2], "stride": [2, 2]}),  # baseline: the training mean
        ("occlusion", {"window": [1, N_FEATURES], "baseline": "zeros"}),
        ("occlusion", {"window": [2, 1], "stride": [1, 1], "baseline": "mean"}),
        ("smoothgrad", {"samples": 6, "noise": 0.3, "seed": 5}),
    ])
    def test_saliency_matches_captum(self, api, api_server, method, params):
        seqs = [seq(12, seed=3), seq(9, seed=4)]
        r = api.post("/models/ica/explain", json={"inputs": as_json(*seqs), "method": method,
                                                  "parameters": params, "target": "all", "absolute": False})
        assert r.status_code == 200, r.text
        ref = reference(api_server.store, "ica", 2)
        baseline = params.get("baseline", "mean")
        for e, x_np in zip(r.json()["explanations"], seqs):
            x = torch.from_numpy(x_np)[None]
            base = torch.zeros_like(x) if baseline == "zeros" else torch.from_numpy(MEAN).expand_as(x).clone()
            for a in e["attributions"]:
                k = a["target_index"]
                if method == "gradient":
                    want = Saliency(ref).attribute(x.clone(), target=k, abs=False)
                elif method == "input_x_gradient":
                    want = InputXGradient(ref).attribute(x.clone(), target=k)
                elif method == "integrated_gradients":
                    want = IntegratedGradients(ref).attribute(x.clone(), baselines=base, target=k,
                                                              n_steps=params["steps"], method="gausslegendre")
                elif method == "occlusion":
                    window = tuple(params["window"])
                    want = Occlusion(ref).attribute(x.clone(), sliding_window_shapes=window,
                                                    strides=tuple(params.get("stride", window)),
                                                    baselines=base, target=k, perturbations_per_eval=64)
                else:  # smoothgrad: noise in standardised units, the server's documented draws
                    eps = noise_draws(params["samples"], len(x_np), N_FEATURES, noise=params["noise"],
                                      seed=params["seed"]) * torch.from_numpy(STD)
                    want = sum(Saliency(ref).attribute(x + eps[s], target=k, abs=False)
                               for s in range(params["samples"])) / params["samples"]
                assert_rel_close(a["saliency"], want.detach().numpy()[0], 1e-5, f"{method} target {k}")

    def test_absolute_and_normalize(self, api):
        x = seq(10, seed=6)
        common = {"inputs": as_json(x), "method": "input_x_gradient", "target": "all"}
        signed = np.array([a["saliency"] for a in
                           api.post("/explain", json={**common, "absolute": False}).json()
                           ["explanations"][0]["attributions"]])
        assert (signed < 0).any()
        absolute = np.array([a["saliency"] for a in
                             api.post("/explain", json=common).json()["explanations"][0]["attributions"]])
        np.testing.assert_allclose(absolute, np.abs(signed), rtol=1e-6)
        r = api.post("/explain", json={**common, "normalize": "minmax"})
        for a in r.json()["explanations"][0]["attributions"]:
            sal = np.array(a["saliency"])
            assert abs(sal.min()) < 1e-7 and abs(sal.max() - 1) < 1e-6
        r = api.post("/explain", json={**common, "normalize": "sum", "absolute": False})
        for a in r.json()["explanations"][0]["attributions"]:
            assert abs(np.abs(np.array(a["saliency"])).sum() - 1) < 1e-5

    def test_explicit_baseline_matrix(self, api, api_server):
        x, b = seq(12, seed=7), seq(12, seed=8)
        r = api.post("/explain", json={"inputs": as_json(x), "method": "integrated_gradients", "target": 0,
                                       "absolute": False, "parameters": {"steps": 12, "baseline": b.tolist()}})
        assert r.status_code == 200, r.text
        ref = reference(api_server.store, "ica", 2)
        want = IntegratedGradients(ref).attribute(torch.from_numpy(x)[None], baselines=torch.from_numpy(b)[None],
                                                  target=0, n_steps=12)
        assert_rel_close(r.json()["explanations"][0]["attributions"][0]["saliency"],
                         want.detach().numpy()[0], 1e-5, "integrated_gradients, matrix baseline")

    def test_attention(self, api, api_server):
        seqs = [seq(12, seed=9), seq(5, seed=10)]
        r = api.post("/explain", json={"inputs": as_json(*seqs), "attention": True})
        assert r.status_code == 200, r.text
        ref = reference(api_server.store, "ica", 2)
        for e, x in zip(r.json()["explanations"], seqs):
            att = np.array(e["attention"])
            assert att.shape == (len(x), len(x))
            assert (att >= 0).all()
            np.testing.assert_allclose(att.sum(axis=1), 1.0, atol=1e-5)
            np.testing.assert_allclose(att, ref.attention(x), rtol=1e-5, atol=1e-6)

    def test_npz_equals_json(self, api):
        body = {"inputs": as_json(seq(12, seed=11), seq(8, seed=12)), "method": "integrated_gradients",
                "parameters": {"steps": 8}, "target": ["flat", "down"], "attention": True, "absolute": False}
        as_j = api.post("/explain", json=body)
        as_npz = api.post("/explain", json=body, headers={"Accept": NPZ})
        assert as_j.status_code == 200 and as_npz.status_code == 200, as_npz.text
        assert as_npz.headers["content-type"].startswith(NPZ)
        arrays = np.load(io.BytesIO(as_npz.content))
        meta = json.loads(bytes(arrays["meta"]))
        assert meta == {"model": "ica", "version": 2, "method": "integrated_gradients",
                        "class_names": CLASS_NAMES, "sequences": 2}
        for i, e in enumerate(as_j.json()["explanations"]):
            sal = np.array([a["saliency"] for a in e["attributions"]], dtype=np.float32)
            assert arrays[f"saliency_{i}"].dtype == np.float32
            np.testing.assert_allclose(arrays[f"saliency_{i}"], sal, rtol=1e-6, atol=1e-9)
            np.testing.assert_array_equal(arrays[f"targets_{i}"], [1, 0])
            np.testing.assert_allclose(arrays[f"logits_{i}"], e["prediction"]["logits"], rtol=1e-6)
            np.testing.assert_allclose(arrays[f"attention_{i}"], e["attention"], rtol=1e-6, atol=1e-9)

    # -- V2 (Open Inference Protocol) -------------------------------------------------------------
    def test_v2_metadata_and_health(self, api):
        r = api.get("/v2")
        assert r.status_code == 200 and r.json()["name"] == "icaserve" and "version" in r.json()
        assert api.get("/v2/health/live").json() == {"live": True}
        assert api.get("/v2/health/ready").json() == {"ready": True}
        meta = api.get("/v2/models/ica").json()
        assert meta["name"] == "ica" and meta["versions"] == ["1", "2"]
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, -1, N_FEATURES]}]
        assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
            "probabilities": [-1, len(CLASS_NAMES)], "logits": [-1, len(CLASS_NAMES)],
            "saliency": [-1, -1, -1, N_FEATURES]}
        assert meta["parameters"]["class_names"] == CLASS_NAMES
        assert "explanation_quality" not in meta["parameters"]  # the test manifests have none
        one = api.get("/v2/models/ica/versions/1")
        assert one.status_code == 200 and one.json()["versions"] == ["1"]
        assert api.get("/v2/models/ica/ready").json() == {"name": "ica", "ready": True}
        assert api.get("/v2/models/ica/versions/1/ready").json() == {"name": "ica", "version": "1", "ready": True}

    @pytest.mark.parametrize("path, predict_path", [
        ("/v2/models/ica/infer", "/models/ica/predict"),
        ("/v2/models/ica/versions/1/infer", "/models/ica/versions/1/predict"),
        ("/v2/models/lstm/infer", "/models/lstm/predict"),
    ])
    def test_v2_infer_equals_predict(self, api, path, predict_path):
        x = np.stack([seq(10, seed=s) for s in (13, 14, 15)])
        r = api.post(path, json={"id": "req-1", "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                                            "data": x.reshape(-1).tolist()}],
                                 "outputs": [{"name": "probabilities"}, {"name": "logits"}]})
        assert r.status_code == 200, r.text
        body = r.json()
        pred = api.post(predict_path, json={"inputs": as_json(*x)}).json()
        assert body["model_name"] == pred["model"] and body["model_version"] == str(pred["version"])
        assert body["id"] == "req-1"
        out = {o["name"]: o for o in body["outputs"]}
        assert out["probabilities"]["shape"] == [3, len(CLASS_NAMES)] and out["probabilities"]["datatype"] == "FP32"
        probs = np.array(out["probabilities"]["data"]).reshape(3, -1)
        want = np.array([list(p["probabilities"].values()) for p in pred["predictions"]])
        np.testing.assert_allclose(probs, want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
        logits = np.array(out["logits"]["data"]).reshape(3, -1)
        np.testing.assert_allclose(logits, [p["logits"] for p in pred["predictions"]], rtol=1e-6, atol=1e-7)
        # nested data, no outputs named: all of the prediction's (the protocol's "all outputs")
        r = api.post(path, json={"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                             "data": x.tolist()}]})
        assert r.status_code == 200, r.text
        assert [o["name"] for o in r.json()["outputs"]] == ["probabilities", "logits"]
        np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(3, -1), want, rtol=1e-6)

    @pytest.mark.parametrize("path, body, status", [
        ("/v2/models/nope/infer", {"inputs": [{"name": "x", "shape": [1, 1, 6], "datatype": "FP32",
                                               "data": [0] * 6}]}, 404),
        ("/v2/models/ica/versions/x/infer", {"inputs": [{"name": "x", "shape": [1, 1, 6], "datatype": "FP32",
                                                         "data": [0] * 6}]}, 404),
        ("/v2/models/ica/infer", {"inputs": [{"name": "x", "shape": [1, 2, 5], "datatype": "FP32",
                                              "data": [0] * 10}]}, 422),
        ("/v2/models/ica/infer", {"inputs": [{"name": "x", "shape": [1, 2, 6], "datatype": "FP32",
                                              "data": [0] * 11}]}, 422),
        ("/v2/models/ica/infer", {"inputs": [{"name": "x", "shape": [1, 1, 6], "datatype": "FP32",
                                              "data": ["1.5"] * 6}]}, 422),
        ("/v2/models/ica/infer", {"inputs": [{"name": "x", "shape": [1, 1, 6], "datatype": "FP32",
                                              "data": [True] + [0.5] * 5}]}, 422),
        ("/v2/models/ica/infer", {"inputs": [{"name": "x", "shape": [1, 1, 6], "datatype": "FP32",
                                              "data": [None] * 6}]}, 422),
        ("/v2/models/ica/infer", {"inputs": [{"name": "x", "shape": [1, 1, 6], "datatype": "FP32",
                                              "data": [1e39] * 6}]}, 422),
        ("/v2/models/ica/infer", {"inputs": [{"name": "x", "shape": [1, 1, 6], "datatype": "FP32",
                                              "data": [0] * 6}], "outputs": [{"name": "nope"}]}, 422),
        ("/v2/models/ica/infer", {"inputs": []}, 422),
        ("/v2/models/ica/infer", b"{not json", 400),
        ("/v2/models/nope", None, 404),
        ("/v2/models/ica/versions/9", None, 404),
        ("/v2/models/ica/versions/9/ready", None, 404),
    ])
    def test_v2_errors(self, api, path, body, status):
        if body is None:
            r = api.get(path)
        elif isinstance(body, bytes):
            r = api.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = api.post(path, json=body)
        err = assert_error(r, status)
        assert isinstance(err["error"], str)  # what KServe/Triton clients read

    # -- bad input: 4xx in the one format, never a 500 -------------------------------------------
    BAD = {
        # name: (path, request kwargs, status, code, field)
        "malformed_json": ("/predict", {"content": b'{"inputs": [[[1, 2'}, 400, "malformed_body", "body"),
        "nan_literal": ("/predict", {"content": b'{"inputs": [[[NaN, 1, 1, 1, 1, 1]]]}'}, 400, "malformed_body",
                        "body"),
        "empty_body": ("/predict", {"content": b""}, 400, "malformed_body", "body"),
        "not_an_object": ("/predict", {"json": [[1, 2, 3]]}, 422, "invalid_input", "body"),
        "string_body": ("/explain", {"json": "inputs"}, 422, "invalid_input", "body"),
        "missing_inputs": ("/predict", {"json": {}}, 422, "invalid_input", "inputs"),
        "unknown_field": ("/predict", {"json": {"inputs": [[[0] * 6]], "extra": 1}}, 422, "invalid_input", "extra"),
        "inputs_not_a_list": ("/predict", {"json": {"inputs": "abc"}}, 422, "invalid_input", "inputs"),
        "empty_inputs": ("/predict", {"json": {"inputs": []}}, 422, "invalid_input", "inputs"),
        "empty_sequence": ("/predict", {"json": {"inputs": [[]]}}, 422, "invalid_input", "inputs[0]"),
        "too_short": ("/models/lstm/predict", {"json": {"inputs": [[[0] * 6] * (LSTM_MIN_LENGTH - 1)]}}, 422,
                      "invalid_input", "inputs[0]"),
        "too_long": ("/predict", {"json": {"inputs": [[[0] * 6] * (MAX_LENGTH + 1)]}}, 422, "invalid_input",
                     "inputs[0]"),
        "too_long_second": ("/predict", {"json": {"inputs": [[[0] * 6], [[0] * 6] * (MAX_LENGTH + 1)]}}, 422,
                            "invalid_input", "inputs[1]"),
        "wrong_feature_count": ("/predict", {"json": {"inputs": [[[0] * 5] * 4]}}, 422, "invalid_input",
                                "inputs[0]"),
        "ragged_rows": ("/predict", {"json": {"inputs": [[[0] * 6, [0] * 5, [0] * 6]]}}, 422, "invalid_input",
                        "inputs[0][1]"),
        "row_not_a_list": ("/predict", {"json": {"inputs": [[[0] * 6, 3]]}}, 422, "invalid_input", "inputs[0][1]"),
        "too_deep": ("/predict", {"json": {"inputs": [[[[0]] * 6]]}}, 422, "invalid_input", "inputs[0][0][0]"),
        "string_value": ("/predict", {"json": {"inputs": [[[0] * 6, [0, 0, "NaN", 0, 0, 0]]]}}, 422,
                         "invalid_input", "inputs[0][1][2]"),
        "numeric_string": ("/predict", {"json": {"inputs": [[[0, 0, "1.5", 0, 0, 0]]]}}, 422, "invalid_input",
                           "inputs[0][0][2]"),
        "null_value": ("/predict", {"json": {"inputs": [[[0] * 6, [0, 0, 0, None, 0, 0]]]}}, 422,
                       "invalid_input", "inputs[0][1][3]"),
        "bool_value": ("/predict", {"json": {"inputs": [[[0.5] * 6, [0.5, True, 0.5, 0.5, 0.5, 0.5]]]}}, 422,
                       "invalid_input", "inputs[0][1][1]"),
        "all_bools": ("/predict", {"json": {"inputs": [[[True] * 6]]}}, 422, "invalid_input", "inputs[0][0][0]"),
        "float32_overflow": ("/predict", {"json": {"inputs": [[[0] * 6, [0, 0, 0, 0, 1e39, 0]]]}}, 422,
                             "invalid_input", "inputs[0][1][4]"),
        "negative_overflow": ("/predict", {"json": {"inputs": [[[-1e39] + [0] * 5]]}}, 422, "invalid_input",
                              "inputs[0][0][0]"),
        "huge_int": ("/predict", {"json": {"inputs": [[[10 ** 40] + [0] * 5]]}}, 422, "invalid_input",
                     "inputs[0][0][0]"),
        "too_many_sequences": ("/predict", {"json": {"inputs": [[[0] * 6]] * (MAX_SEQUENCES + 1)}}, 422,
                               "invalid_input", "inputs"),
        "explain_bad_inputs": ("/explain", {"json": {"inputs": [[[0] * 6, [0, 0, None, 0, 0, 0]]]}}, 422,
                               "invalid_input", "inputs[0][1][2]"),
        "unknown_method": ("/explain", {"json": {"inputs": [[[0] * 6]], "method": "lime"}}, 422, "invalid_input",
                           "method"),
        "param_of_other_method": ("/explain", {"json": {"inputs": [[[0] * 6]], "method": "gradient",
                                                        "parameters": {"steps": 10}}}, 422, "invalid_input",
                                  "parameters.steps"),
        "param_of_other_method_ig": ("/explain", {"json": {"inputs": [[[0] * 6]], "method": "integrated_gradients",
                                                           "parameters": {"samples": 3}}}, 422, "invalid_input",
                                     "parameters.samples"),
        "param_of_other_tsr_base": ("/explain", {"json": {"inputs": [[[0] * 6]], "method": "tsr",
                                                          "parameters": {"samples": 3}}}, 422, "invalid_input",
                                    "parameters.samples"),
        "unknown_parameter": ("/explain", {"json": {"inputs": [[[0] * 6]], "parameters": {"alpha": 1}}}, 422,
                              "invalid_input", "parameters.alpha"),
        "steps_zero": ("/explain", {"json": {"inputs": [[[0] * 6]], "method": "integrated_gradients",
                                             "parameters": {"steps": 0}}}, 422, "invalid_input", "parameters.steps"),
        "steps_over_limit": ("/explain", {"json": {"inputs": [[[0] * 6]], "method": "integrated_gradients",
                                                   "parameters": {"steps": MAX_IG_STEPS + 1}}}, 422, "too_expensive",
                             "parameters.steps"),
        "samples_over_limit": ("/explain", {"json": {"inputs": [[[0] * 6]], "method": "smoothgrad",
                                                     "parameters": {"samples": MAX_SG_SAMPLES + 1}}}, 422,
                               "too_expensive", "parameters.samples"),
        "ig_too_expensive": ("/explain", {"json": {"inputs": [[[0.5] * 6] * MAX_LENGTH] * MAX_SEQUENCES,
                                                   "method": "integrated_gradients", "target": "all",
                                                   "parameters": {"steps": MAX_IG_STEPS}}}, 422, "too_expensive",
                             "inputs"),
        "tsr_too_expensive": ("/explain", {"json": {"inputs": [[[0.5] * 6] * MAX_LENGTH], "method": "tsr",
                                                    "target": "all"}}, 422, "too_expensive", "inputs"),
        "unknown_target_class": ("/explain", {"json": {"inputs": [[[0] * 6]], "target": "sideways"}}, 422,
                                 "invalid_input", "target"),
        "target_index_out_of_range": ("/explain", {"json": {"inputs": [[[0] * 6]], "target": 3}}, 422,
                                      "invalid_input", "target"),
        "negative_target": ("/explain", {"json": {"inputs": [[[0] * 6]], "target": -1}}, 422, "invalid_input",
                            "target"),
        "bad_target_in_list": ("/explain", {"json": {"inputs": [[[0] * 6]], "target": ["up", 7]}}, 422,
                               "invalid_input", "target[1]"),
        "empty_target_list": ("/explain", {"json": {"inputs": [[[0] * 6]], "target": []}}, 422, "invalid_input",
                              "target"),
        "bool_target": ("/explain", {"json": {"inputs": [[[0] * 6]], "target": True}}, 422, "invalid_input", ...),
        "occlusion_window_too_big": ("/explain", {"json": {"inputs": [[[0] * 6] * 4], "method": "occlusion",
                                                           "parameters": {"window": [5, 2]}}}, 422, "invalid_input",
                                     "parameters"),
        "occlusion_window_zero": ("/explain", {"json": {"inputs": [[[0] * 6] * 4], "method": "occlusion",
                                                        "parameters": {"window": [0, 2]}}}, 422, "invalid_input",
                                  "parameters"),
        "occlusion_stride_over_window": ("/explain", {"json": {"inputs": [[[0] * 6] * 8], "method": "occlusion",
                                                               "parameters": {"window": [2, 2], "stride": [3, 1]}}},
                                         422, "invalid_input", "parameters"),
        "baseline_wrong_length": ("/explain", {"json": {"inputs": [[[0] * 6] * 4], "method": "integrated_gradients",
                                                        "parameters": {"baseline": [[0] * 6] * 3}}}, 422,
                                  "invalid_input", "parameters.baseline"),
        "baseline_bad_value": ("/explain", {"json": {"inputs": [[[0] * 6] * 2], "method": "occlusion",
                                                     "parameters": {"baseline": [[0] * 6, [0, 0, 1e39, 0, 0, 0]]}}},
                               422, "invalid_input", "parameters.baseline[1][2]"),
        "baseline_with_mixed_lengths": ("/explain", {"json": {"inputs": [[[0] * 6] * 2, [[0] * 6] * 3],
                                                              "method": "integrated_gradients",
                                                              "parameters": {"baseline": [[0] * 6] * 2}}}, 422,
                                        "invalid_input", "parameters.baseline"),
        "bad_normalize": ("/explain", {"json": {"inputs": [[[0] * 6]], "normalize": "max"}}, 422, "invalid_input",
                          "normalize"),
        "attention_without_ica": ("/models/lstm/explain", {"json": {"inputs": [[[0] * 6] * 4], "attention": True}},
                                  422, "invalid_input", "attention"),
        "unknown_model": ("/models/nope/predict", {"json": {"inputs": [[[0] * 6]]}}, 404, "not_found", "model"),
        "unknown_model_explain": ("/models/nope/explain", {"json": {"inputs": [[[0] * 6]]}}, 404, "not_found",
                                  "model"),
        "invalid_model_name": ("/models/Bad.Name/predict", {"json": {"inputs": [[[0] * 6]]}}, 404, "not_found",
                               "model"),
        "bad_version_string": ("/models/ica/versions/abc/predict", {"json": {"inputs": [[[0] * 6]]}}, 404,
                               "not_found", "model"),
        "version_zero": ("/models/ica/versions/0/predict", {"json": {"inputs": [[[0] * 6]]}}, 404, "not_found",
                         "model"),
        "negative_version": ("/models/ica/versions/-1/explain", {"json": {"inputs": [[[0] * 6]]}}, 404,
                             "not_found", "model"),
        "missing_version": ("/models/ica/versions/9/predict", {"json": {"inputs": [[[0] * 6]]}}, 404, "not_found",
                            "model"),
        "text_content_type": ("/predict", {"content": b'{"inputs": [[[0, 0, 0, 0, 0, 0]]]}',
                                           "headers": {"content-type": "text/plain"}}, 415,
                              "unsupported_media_type", "body"),
        "form_content_type": ("/explain", {"data": {"inputs": "1"}}, 415, "unsupported_media_type", "body"),
    }

    @pytest.mark.parametrize("case", list(BAD))
    def test_bad_input(self, api, case):
        path, kwargs, status, code, field = self.BAD[case]
        kwargs = dict(kwargs)
        if "content" in kwargs:
            kwargs.setdefault("headers", {"content-type": "application/json"})
        r = api.post(path, **kwargs)
        assert_error(r, status, code, field)

    def test_method_not_allowed_and_unknown_route(self, api):
        assert_error(api.get("/predict"), 405, "method_not_allowed")
        assert_error(api.get("/no/such/route"), 404, "not_found", None)

    def test_request_id_is_echoed(self, api):
        r = api.post("/predict", json={}, headers={"X-Request-ID": "client-id-42"})
        assert assert_error(r, 422)["request_id"] == "client-id-42"
        r = api.post("/predict", json={"inputs": as_json(seq(3))}, headers={"X-Request-ID": "ok-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "ok-1"

    def test_oversize_body(self, api):
        big = b'{"inputs": [' + b"0" * MAX_BODY + b"]}"
        r = api.post("/predict", content=big, headers={"content-type": "application/json"})
        assert_error(r, 413, "payload_too_large", "body")

        def chunked():  # no Content-Length: the limit holds as the body streams in
            yield b'{"inputs": ['
            for _ in range(MAX_BODY // 8192 + 2):
                yield b"0" * 8192
            yield b"]}"

        r = api.post("/explain", content=chunked(), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
        assert_error(r, 413, "payload_too_large", "body")
        # the server is fine afterwards
        assert api.post("/predict", json={"inputs": as_json(seq(4))}).status_code == 200

    def test_admin_disabled_without_admin_key(self, api):
        assert_error(api.post("/admin/reload"), 403, "forbidden")
        assert_error(api.post("/admin/reload", headers={"Authorization": "Bearer anything"}), 403, "forbidden")

    def test_metrics(self, api):
        assert api.post("/predict", json={"inputs": as_json(seq(4))}).status_code == 200
        r = api.get("/metrics")
        assert r.status_code == 200
        text = r.text
        assert metric(text, "icaserve_requests_total", status="200") > 0
        assert metric(text, "icaserve_model_loaded", model="ica", version="2") == 1


# -- batching and overload --------------------------------------------------------------------------


@pytest.fixture(scope="class")
def batching_server(server_factory, model_store):
    server = server_factory(model_store, {"MAX_WAIT_MS": 50, "MAX_BATCH_SIZE": 8, "EXPLAIN_QUEUE_SIZE": 1,
                                          "RETRY_AFTER_S": 2})
    yield server
    server.stop()


def concurrently(url: str, requests: list[tuple[str, dict]], headers: dict | None = None) -> list[httpx.Response]:
    """Send all requests at once: one thread and one client each, released together."""
    clients = [httpx.Client(base_url=url, timeout=120, headers=headers) for _ in requests]
    barrier = threading.Barrier(len(requests))

    def send(i: int) -> httpx.Response:
        path, body = requests[i]
        barrier.wait()
        return clients[i].post(path, json=body)

    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(send, range(len(requests))))
    finally:
        for c in clients:
            c.close()


class TestBatchingAndOverload:
    def test_concurrent_requests_merge(self, batching_server):
        seqs = [seq(12, seed=100 + i) for i in range(16)]
        with batching_server.client() as c:
            alone = []
            for x in seqs:  # one at a time: batches of one
                r = c.post("/models/ica/predict", json={"inputs": as_json(x)})
                assert r.status_code == 200, r.text
                alone.append(r.json()["predictions"][0])
            before = c.get("/metrics").text
        responses = concurrently(batching_server.url, [("/models/ica/predict", {"inputs": as_json(x)})
                                                       for x in seqs])
        with batching_server.client() as c:
            after = c.get("/metrics").text
        for r, a in zip(responses, alone):
            assert r.status_code == 200, r.text
            p = r.json()["predictions"][0]
            assert p["label"] == a["label"]
            np.testing.assert_allclose(p["logits"], a["logits"], rtol=1e-5, atol=1e-6)

        def delta(sample: str, **labels: str) -> float:
            return metric(after, sample, queue="predict", **labels) - metric(before, sample, queue="predict", **labels)

        batches = delta("icaserve_batch_size_count")
        singles = delta("icaserve_batch_size_bucket", le="1.0")
        assert delta("icaserve_batch_size_sum") == 16
        assert batches < 16, "no two requests were merged"
        assert batches - singles >= 1, "no batch of more than one sequence"

    def test_full_queue_answers_503(self, batching_server):
        # each request fills a whole batch (8 sequences) with slow integrated gradients
        body = {"inputs": as_json(*[seq(MAX_LENGTH, seed=200 + i) for i in range(8)]),
                "method": "integrated_gradients", "parameters": {"steps": 64}}
        with batching_server.client() as c:
            overloaded_before = metric(c.get("/metrics").text, "icaserve_errors_total", kind="overloaded")
        responses = concurrently(batching_server.url, [("/explain", body)] * 10)
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
        for r in responses:
            if r.status_code == 503:
                assert_error(r, 503, "overloaded")
                assert r.headers["retry-after"] == "2"
            else:
                assert len(r.json()["explanations"]) == 8
        with batching_server.client() as c:  # and it recovers
            assert c.post("/explain", json={"inputs": as_json(seq(12))}).status_code == 200
            overloaded = metric(c.get("/metrics").text, "icaserve_errors_total", kind="overloaded")
            assert overloaded - overloaded_before == statuses.count(503)


# -- deadline ---------------------------------------------------------------------------------------


@pytest.fixture(scope="class")
def deadline_server(server_factory, model_store):
    # a batching window far longer than the deadline: every request expires while queued
    server = server_factory(model_store, {"REQUEST_TIMEOUT_S": 0.05, "MAX_WAIT_MS": 500})
    yield server
    server.stop()


class TestDeadline:
    def test_deadline_gives_504(self, deadline_server):
        with deadline_server.client() as c:
            r = c.post("/predict", json={"inputs": as_json(seq(12))})
            assert_error(r, 504, "deadline_exceeded")
            r = c.post("/explain", json={"inputs": as_json(seq(12)), "method": "integrated_gradients"})
            assert_error(r, 504, "deadline_exceeded")
            x = seq(2)
            r = c.post("/v2/models/ica/infer", json={"inputs": [{"name": "x", "shape": [1, 2, N_FEATURES],
                                                                 "datatype": "FP32", "data": x.reshape(-1).tolist()}]})
            assert_error(r, 504, "deadline_exceeded")
            assert c.get("/readyz").status_code == 200  # still alive and ready


# -- keys, admin reload, hot swap -----------------------------------------------------------------------

API_KEY = "inference-key-123"
ADMIN_KEY = "admin-key-456"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="class")
def keyed_server(server_factory, copy_store):
    server = server_factory(copy_store(), {"API_KEY": API_KEY, "ADMIN_KEY": ADMIN_KEY, "POLL_INTERVAL_S": 0.5})
    yield server
    server.stop()


class Traffic:
    """Threads posting the same /predict request in a loop, recording what comes back."""

    def __init__(self, url: str, path: str, x: np.ndarray, threads: int = 3) -> None:
        self.url, self.path, self.body = url, path, {"inputs": as_json(x)}
        self.stop = threading.Event()
        self.records: list[list[tuple]] = [[] for _ in range(threads)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        end = time.monotonic() + 180  # bounded in time and count even if nobody stops it
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=60) as c:
            for _ in range(5000):
                if self.stop.is_set() or time.monotonic() > end:
                    return
                try:
                    r = c.post(self.path, json=self.body)
                    if r.status_code == 200:
                        body = r.json()
                        self.records[i].append((200, body["version"], body["predictions"][0]["logits"]))
                    else:
                        self.records[i].append((r.status_code, None, r.text))
                except httpx.HTTPError as exc:
                    self.records[i].append(("error", None, repr(exc)))
                time.sleep(0.01)

    def __enter__(self) -> "Traffic":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)

    def all(self) -> list[tuple]:
        return [rec for recs in self.records for rec in recs]

    def count(self) -> int:
        return sum(len(r) for r in self.records)

    def check(self, versions: set[int]) -> None:
        failures = [rec for rec in self.all() if rec[0] != 200]
        assert not failures, failures[:5]
        for recs in self.records:  # one client's requests are sequential: never back to an older version
            seen = [v for _, v, _ in recs]
            assert seen == sorted(seen), seen
        assert {v for _, v, _ in self.all()} <= versions


def load_failures(client: httpx.Client, model: str) -> float:
    return metric(client.get("/metrics").text, "icaserve_model_load_failures_total", model=model)


class TestKeysAndHotSwap:
    def test_api_key_required(self, keyed_server):
        body = {"inputs": as_json(seq(4))}
        with keyed_server.client() as c:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                            {"Authorization": f"Basic {API_KEY}"}):
                r = c.post("/predict", json=body, headers=headers)
                assert_error(r, 401, "unauthorized")
                assert r.headers["www-authenticate"] == "Bearer"
            assert_error(c.post("/explain", json=body), 401, "unauthorized")
            assert_error(c.post("/models/lstm/versions/1/predict", json=body), 401, "unauthorized")
            assert_error(c.get("/models"), 401, "unauthorized")
            assert_error(c.get("/models/ica"), 401, "unauthorized")
            err = assert_error(c.post("/v2/models/ica/infer", json={}), 401, "unauthorized")
            assert isinstance(err["error"], str)
            assert_error(c.get("/v2/models/ica"), 401, "unauthorized")
            # the key is checked before the body is looked at
            assert_error(c.post("/predict", content=b"{oops", headers={"content-type": "application/json"}), 401)
            assert c.post("/predict", json=body, headers=AUTH).status_code == 200
            assert c.post("/predict", json=body, headers=ADMIN).status_code == 200  # the admin key also reads
            assert c.get("/models", headers=AUTH).status_code == 200
            for open_path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
                assert c.get(open_path).status_code == 200, open_path

    def test_admin_reload(self, keyed_server):
        with keyed_server.client() as c:
            assert_error(c.post("/admin/reload"), 401, "unauthorized")
            assert_error(c.post("/admin/reload", headers=AUTH), 401, "unauthorized")  # the inference key cannot
            serving = {m["name"]: m["serving_version"] for m in c.get("/models", headers=AUTH).json()["models"]}
            r = c.post("/admin/reload", headers=ADMIN)
            assert r.status_code == 200, r.text
            assert r.json()["serving"] == serving  # nothing new published: the same versions serve
            assert set(serving) == {"ica", "lstm"}

    def test_hot_swap_under_traffic(self, keyed_server):
        store = keyed_server.store
        x = seq(12, seed=300)
        with keyed_server.client(headers=AUTH) as c:
            old = c.get("/models/lstm").json()["serving_version"]
        with Traffic(keyed_server.url, "/models/lstm/predict", x) as traffic:
            wait_for(lambda: traffic.count() >= 6, 30, "traffic to start")
            new = publish(store, "lstm", seed=7, arch=LSTM_ARCH)
            assert new > old
            wait_for(lambda: any(v == new for _, v, _ in traffic.all()), 60, f"version {new} to serve")
            n = traffic.count()
            wait_for(lambda: traffic.count() >= n + 6, 30, "more traffic after the swap")
        traffic.check({old, new})
        versions = [v for _, v, _ in traffic.all()]
        assert versions[0] == old and new in versions
        for v in (old, new):
            want = reference(store, "lstm", v).logits(x)
            for _, got_v, logits in traffic.all():
                if got_v == v:
                    assert_rel_close(logits, want, 1e-5, f"lstm v{v}")
        with keyed_server.client(headers=AUTH) as c:
            one = c.get("/models/lstm").json()
            assert one["versions"][-1] == new and old in one["versions"] and one["serving_version"] == new
            # the old version is still reachable by number
            r = c.post(f"/models/lstm/versions/{old}/predict", json={"inputs": as_json(x)})
            assert r.status_code == 200 and r.json()["version"] == old

    def test_request_routed_before_a_swap_finishes_on_its_version(self, keyed_server):
        """A request whose body is still arriving when a new version is swapped in was already routed
        to the old version: the old version answers it, whatever became of it after the swap."""
        store = keyed_server.store
        x = seq(12, seed=302)
        body = json.dumps({"inputs": as_json(x)}).encode()
        with keyed_server.client(headers=AUTH) as c:
            old = c.get("/models/lstm").json()["serving_version"]
            r = c.post("/models/lstm/predict", json={"inputs": as_json(x)})  # its batcher is running
            assert r.status_code == 200 and r.json()["version"] == old
            port = int(keyed_server.url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall((f"POST /models/lstm/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode())
                # routed to `old`, waiting for the body: the request is in flight (the handler routes
                # before it reads the body) and the server has since answered another request whole
                wait_for(lambda: metric(c.get("/metrics").text, "icaserve_requests_in_flight") >= 1, 30,
                           "the headers-only request to be in flight")
                r = c.post("/models/lstm/predict", json={"inputs": as_json(x)})
                assert r.status_code == 200 and r.json()["version"] == old
                new = publish(store, "lstm", seed=9, arch=LSTM_ARCH)
                wait_for(lambda: c.get("/models/lstm").json()["serving_version"] == new, 60,
                           f"version {new} to serve")
                # the swap is done as requests see it; and whatever the old version does next (its
                # retirement) has had a whole request's worth of event-loop turns to happen
                r = c.post("/models/lstm/predict", json={"inputs": as_json(x)})
                assert r.status_code == 200 and r.json()["version"] == new
                sock.sendall(body)
                raw = b""
                while chunk := sock.recv(65536):
                    raw += chunk
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), raw[:600]
        answer = json.loads(payload)
        assert answer["version"] == old
        assert_rel_close(answer["predictions"][0]["logits"], reference(store, "lstm", old).logits(x), 1e-5)

    def test_corrupted_version_is_refused(self, keyed_server):
        store = keyed_server.store
        x = seq(12, seed=301)
        with keyed_server.client(headers=AUTH) as c:
            serving = c.get("/models/lstm").json()["serving_version"]
            failures_before = load_failures(c, "lstm")
        bad = serving + 1
        # publish a version by hand, whole (one rename), whose model.ts no longer matches its checksum
        model_dir = store / "lstm"
        tmp = model_dir / ".incoming"
        shutil.copytree(model_dir / str(serving), tmp)
        manifest = json.loads((tmp / "manifest.json").read_text())
        manifest["version"] = bad
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        data = bytearray((tmp / "model.ts").read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, different bytes
        (tmp / "model.ts").write_bytes(bytes(data))
        with Traffic(keyed_server.url, "/models/lstm/predict", x) as traffic, keyed_server.client(headers=AUTH) as c:
            wait_for(lambda: traffic.count() >= 3, 30, "traffic to start")
            tmp.rename(model_dir / str(bad))
            wait_for(lambda: load_failures(c, "lstm") > failures_before, 30, "the corrupted version's refusal")
            n = traffic.count()
            wait_for(lambda: traffic.count() >= n + 6, 30, "more traffic after the refusal")
        traffic.check({serving})
        with keyed_server.client(headers=AUTH) as c:
            assert load_failures(c, "lstm") == failures_before + 1  # refused once, not on every poll
            text = c.get("/metrics").text
            assert metric(text, "icaserve_model_load_failures_total", model="lstm", reason="ChecksumMismatch") >= 1
            one = c.get("/models/lstm").json()
            assert one["versions"][-1] == bad and one["serving_version"] == serving
            r = c.post("/admin/reload", headers=ADMIN)
            assert r.status_code == 200 and r.json()["serving"]["lstm"] == serving
            assert "checksum" in r.json()["refused"][f"lstm/{bad}"].lower()
            # asking for the refused version by number: unavailable, in the common format, not a 500
            r = c.post(f"/models/lstm/versions/{bad}/predict", json={"inputs": as_json(x)})
            assert_error(r, 503, "not_ready", "model")
            r = c.post("/models/lstm/predict", json={"inputs": as_json(x)})
            assert r.status_code == 200 and r.json()["version"] == serving
            # the next good version is still picked up
            good = publish(store, "lstm", seed=8, arch=LSTM_ARCH)
            assert good == bad + 1
            end = time.monotonic() + 60
            while time.monotonic() < end:
                r = c.post("/models/lstm/predict", json={"inputs": as_json(x)})
                assert r.status_code == 200, r.text
                if r.json()["version"] == good:
                    break
                time.sleep(0.2)
            assert r.json()["version"] == good
            assert_rel_close(r.json()["predictions"][0]["logits"], reference(store, "lstm", good).logits(x), 1e-5)
