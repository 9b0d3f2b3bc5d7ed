"""Pricing, compute and numerical safety of /explain, /predict and V2.

- the T x T attention counts in an explanation's cost and in the response-size bound
  (`max_response_bytes`), both checked before any compute (422 too_expensive naming
  `attention` or `inputs`);
- every parameter that changes the work reaches the pricing (TSR's `threshold_quantile` too:
  TSR is registered in `attribution.METHODS` like the other methods);
- the request deadline stops a long explanation between chunks, and the queue moves on;
- a non-finite model output or saliency is never a 200: inputs (and a given baseline) far
  outside the training range are refused up front (`max_input_sigma`), SmoothGrad's noise is
  bounded (`max_smoothgrad_noise`), and whatever still comes out non-finite is a 422
  out_of_range naming the field;
- V2 checks requested outputs before compute and honours the declared datatype.

Real servers on loopback (`server_factory`) for the HTTP behaviour, in-process checks for the
mechanisms underneath (the methods' `should_stop`, the runtime's deadline).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import attribution
from attribution import METHODS, Stopped, attribute, estimate_cost
from conftest import MAX_LENGTH, N_FEATURES, metric
from model_store import ModelStore
from service.api import _cost
from service.batching import Expired
from service.runtime import ExplainSpec, LoadedModel, attention_cost
from training.models import ModelConfig, build_model, inference_copy

T = MAX_LENGTH  # 64: the longest sequence the test models take
# TSR over gradient (one target) on one sequence of T steps, in sample-step evaluations
TSR_DEFAULT = T * estimate_cost("tsr", 1, T, N_FEATURES, 1)
TSR_Q0 = T * estimate_cost("tsr", 1, T, N_FEATURES, 1, threshold_quantile=0.0)
ATTENTION = T * attention_cost(T, N_FEATURES)
# The priced server's limits: TSR at its default quantile fits, with its attention it does not.
COST_LIMIT = TSR_DEFAULT + ATTENTION // 2
RESPONSE_LIMIT = 200_000  # bytes: 8 sequences of T x N fit, with their T x T attention they do not
TIMEOUT_S = 3.0  # the loose server's request deadline


def seq(length: int, seed: int = 0, value: float | None = None) -> list[list[float]]:
    if value is not None:
        return [[value] * N_FEATURES for _ in range(length)]
    rng = np.random.default_rng(seed)
    return np.round(rng.standard_normal((length, N_FEATURES)), 3).tolist()




def compute_counts(c: httpx.Client) -> tuple[float, float, float]:
    """Model calls of both queues and sequences explained: unchanged means nothing was computed."""
    text = c.get("/metrics").text
    return (metric(text, "icaserve_model_compute_seconds_count", queue="explain"),
            metric(text, "icaserve_model_compute_seconds_count", queue="predict"),
            metric(text, "icaserve_explanations_total"))


def assert_error(r: httpx.Response, status: int, code: str, field: str | None = None) -> dict:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:500]}"
    body = r.json()
    assert set(body) == {"error", "code", "field", "request_id"}, body
    assert body["code"] == code, body
    if field is not None:
        assert body["field"] == field, body
    return body


def v2_body(values: list, datatype: str = "FP32", b: int = 1, t: int = 2, outputs: list | None = None) -> dict:
    body: dict = {"inputs": [{"name": "x", "shape": [b, t, N_FEATURES], "datatype": datatype, "data": values}]}
    if outputs is not None:
        body["outputs"] = outputs
    return body


@pytest.fixture(scope="module")
def priced(server_factory, model_store):
    """Default input-range bounds; small cost and response-size limits."""
    server = server_factory(model_store, {"MAX_EXPLAIN_COST": COST_LIMIT, "MAX_RESPONSE_BYTES": RESPONSE_LIMIT})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def loose(server_factory, model_store):
    """No up-front range bounds (so what reaches the model is caught after compute), no cost
    limit to speak of, and a short deadline."""
    server = server_factory(model_store, {"MAX_EXPLAIN_COST": 10 ** 12, "MAX_INPUT_SIGMA": 1e39,
                                          "MAX_SMOOTHGRAD_NOISE": 1e39, "REQUEST_TIMEOUT_S": TIMEOUT_S})
    yield server
    server.stop()


# -- 1. attention is priced, the answer's size is bounded, both before compute -------------------


def test_attention_and_response_size_are_priced_before_compute(priced):
    eight = [seq(T, i) for i in range(8)]
    many = [seq(T, i) for i in range(64)]
    with priced.client() as c:
        before = compute_counts(c)
        # 8 x T x N saliency fits in the size limit, their 8 x T x T attention does not
        r = c.post("/models/ica/explain", json={"inputs": eight, "attention": True})
        err = assert_error(r, 422, "too_expensive", "attention")
        assert "bytes" in err["error"], err
        # 64 sequences' saliency alone is over the size limit: the inputs are to blame
        r = c.post("/models/ica/explain", json={"inputs": many})
        assert_error(r, 422, "too_expensive", "inputs")
        # TSR's work fits the cost limit; with its attention weights it does not
        r = c.post("/models/ica/explain", json={"inputs": [seq(T)], "method": "tsr", "attention": True})
        err = assert_error(r, 422, "too_expensive", "attention")
        assert f"{TSR_DEFAULT + ATTENTION:,}" in err["error"], err
        assert compute_counts(c) == before, "a refused request reached the model"
        # within the limits: answered
        r = c.post("/models/ica/explain", json={"inputs": eight})
        assert r.status_code == 200, r.text
        r = c.post("/models/ica/explain", json={"inputs": [seq(T)], "attention": True})
        assert r.status_code == 200, r.text
        assert np.asarray(r.json()["explanations"][0]["attention"]).shape == (T, T)
        # the estimate follows the answer's format: npz takes 4 bytes a number, so 64 fit
        r = c.post("/models/ica/explain", json={"inputs": many}, headers={"Accept": "application/x-npz"})
        assert r.status_code == 200, r.text[:300]


# -- 2. every parameter that changes the work reaches the pricing --------------------------------


def test_threshold_quantile_is_priced(priced):
    x = [np.zeros((T, N_FEATURES), np.float32)]
    q0 = _cost("tsr", {"threshold_quantile": 0.0}, x, N_FEATURES, 1)
    default = _cost("tsr", {}, x, N_FEATURES, 1)
    assert (q0, default) == (TSR_Q0, TSR_DEFAULT) and q0 > default
    assert _cost("tsr", {"threshold_quantile": 0.55}, x, N_FEATURES, 1) == default
    assert TSR_DEFAULT <= COST_LIMIT < TSR_Q0
    with priced.client() as c:
        before = compute_counts(c)
        r = c.post("/models/ica/explain", json={"inputs": [seq(T)], "method": "tsr",
                                                "parameters": {"threshold_quantile": 0.0}})
        err = assert_error(r, 422, "too_expensive", "inputs")
        assert f"{TSR_Q0:,}" in err["error"], err
        assert compute_counts(c) == before
        r = c.post("/models/ica/explain", json={"inputs": [seq(T)], "method": "tsr",
                                                "parameters": {"threshold_quantile": 0.55}})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("method,cheap,dear", [
    ("integrated_gradients", {"steps": 4}, {"steps": 8}),
    ("smoothgrad", {"samples": 2}, {"samples": 3}),
    ("occlusion", {"window": (4, 3)}, {"window": (2, 3)}),
    ("occlusion", {"window": (2, 3)}, {"window": (2, 3), "stride": (1, 1)}),
    ("tsr", {}, {"base_method": "integrated_gradients"}),
    ("tsr", {"base_method": "smoothgrad", "samples": 2}, {"base_method": "smoothgrad", "samples": 4}),
    ("tsr", {"threshold_quantile": 0.9}, {"threshold_quantile": 0.1}),
])
def test_every_work_parameter_reaches_the_price(method, cheap, dear):
    x = [np.zeros((16, N_FEATURES), np.float32)]
    assert _cost(method, dear, x, N_FEATURES, 1) > _cost(method, cheap, x, N_FEATURES, 1)
    # one estimate_cost for every method, TSR included
    assert attribution.resolve_method(method).cost is METHODS[method].cost


# -- 3. the deadline stops long work -------------------------------------------------------------


def _counting(model: torch.nn.Module, calls: list[int]):
    def forward(z: torch.Tensor) -> torch.Tensor:
        calls.append(z.shape[0])
        return model(z)
    return forward


@pytest.mark.parametrize("method,params", [
    ("gradient", {"internal_batch_size": 2}),
    ("input_x_gradient", {"internal_batch_size": 2}),
    ("integrated_gradients", {"steps": 8, "internal_batch_size": 4}),
    ("smoothgrad", {"samples": 8, "internal_batch_size": 4}),
    ("occlusion", {"window": (1, 1), "internal_batch_size": 8}),
    ("tsr", {"chunk_size": 4}),
    ("tsr", {"base_method": "integrated_gradients", "steps": 4, "chunk_size": 4}),
])
def test_methods_stop_between_chunks(method, params):
    torch.manual_seed(0)
    model = inference_copy(build_model(ModelConfig(n_features=N_FEATURES, n_classes=3, attention="ica",
                                                   hidden=4, r=2, d_a=4)))
    x = torch.randn(6, 10, N_FEATURES)
    targets = torch.zeros(6, 1, dtype=torch.long)
    everything: list[int] = []
    attribute(method, _counting(model, everything), x, targets, **params)
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 2  # two chunks, then stop

    some: list[int] = []
    with pytest.raises(Stopped):
        attribute(method, _counting(model, some), x, targets, should_stop=should_stop, **params)
    assert len(asked) == 3 and len(some) < len(everything), (len(some), len(everything))


@pytest.fixture(scope="module")
def loaded(model_store: Path) -> LoadedModel:
    return LoadedModel.load(ModelStore(model_store), "ica", "latest", torch.device("cpu"))


def test_runtime_raises_expired_once_every_row_is_past_its_deadline(loaded):
    x = [np.zeros((8, N_FEATURES), np.float32)] * 2
    now = time.perf_counter()
    past, future = now - 1.0, now + 3600.0
    for method in ("gradient", "tsr", "integrated_gradients"):
        with pytest.raises(Expired):
            loaded.explain(x, [ExplainSpec(method, {}, None, deadline=past)] * 2)
        # one row still wanted: the call is computed for it
        out = loaded.explain(x, [ExplainSpec(method, {}, None, deadline=past),
                                 ExplainSpec(method, {}, None, deadline=future)])
        assert len(out) == 2 and all(np.isfinite(e.saliency).all() for e in out)
        # no deadline (warm-up, offline use): never stopped
        assert len(loaded.explain(x, [ExplainSpec(method, {}, None)] * 2)) == 2


def test_deadline_stops_a_long_explanation_and_the_queue_moves_on(loose):
    # TSR over 256-step integrated gradients for every class of 8 long sequences: minutes of
    # compute (~35 s a sequence here), far past the deadline
    body = {"inputs": [seq(T, i) for i in range(8)], "method": "tsr", "target": "all",
            "parameters": {"base_method": "integrated_gradients", "steps": 256}}
    cheap = {"inputs": [seq(12)]}
    with loose.client() as c:
        assert_error(c.post("/explain", json=body), 504, "deadline_exceeded")
        # the explain worker gets free within a chunk of the deadline: a cheap explanation is
        # answered (its own deadline is TIMEOUT_S); before, every one timed out behind the TSR
        answered = None
        end = time.monotonic() + 60
        for _ in range(20):
            r = c.post("/explain", json=cheap)
            assert r.status_code in (200, 504), r.text
            if r.status_code == 200:
                answered = r
                break
            if time.monotonic() > end:
                break
        assert answered is not None, "the explain queue did not move on after the deadline"
        timing = dict(part.split(";dur=") for part in answered.headers["server-timing"].split(", ")
                      if ";dur=" in part)
        assert float(timing["queue"]) < TIMEOUT_S * 1000, timing


# -- 4. no null answers: out-of-range inputs are refused --------------------------------------------

BIG = 1e38  # finite in float32, far past what the model's arithmetic survives
BASELINE = 3e38

# name: (path, body) of each reproduction, all with finite JSON numbers
CASES = {
    "predict": ("/predict", {"inputs": [seq(10, value=BIG)]}),
    "v2": ("/v2/models/ica/infer", v2_body([BIG] * (10 * N_FEATURES), t=10)),
    "smoothgrad_noise": ("/explain", {"inputs": [seq(10)], "method": "smoothgrad", "parameters": {"noise": BIG}}),
    "ig_baseline": ("/explain", {"inputs": [seq(10)], "method": "integrated_gradients",
                                 "parameters": {"baseline": seq(10, value=BASELINE)}}),
    "occlusion_baseline": ("/explain", {"inputs": [seq(10)], "method": "occlusion",
                                        "parameters": {"baseline": seq(10, value=BASELINE)}}),
    "tsr_baseline": ("/explain", {"inputs": [seq(10)], "method": "tsr",
                                  "parameters": {"baseline": seq(10, value=BASELINE)}}),
}
UP_FRONT_FIELDS = {"predict": "inputs[0][0][0]", "v2": "inputs[0].data[0][0][0]",
                   "smoothgrad_noise": "parameters.noise", "ig_baseline": "parameters.baseline[0][0]",
                   "occlusion_baseline": "parameters.baseline[0][0]", "tsr_baseline": "parameters.baseline[0][0]"}
AFTER_COMPUTE_FIELDS = {"predict": "inputs[0]", "v2": "inputs[0].data[0]", "smoothgrad_noise": "parameters.noise",
                        "ig_baseline": "parameters.baseline", "occlusion_baseline": "parameters.baseline",
                        "tsr_baseline": "parameters.baseline"}


@pytest.mark.parametrize("case", list(CASES))
def test_out_of_range_refused_before_compute(priced, case):
    """With the default bounds (max_input_sigma, max_smoothgrad_noise): refused up front."""
    path, body = CASES[case]
    with priced.client() as c:
        before = compute_counts(c)
        err = assert_error(c.post(path, json=body), 422, "out_of_range", UP_FRONT_FIELDS[case])
        assert "range" in err["error"], err
        assert compute_counts(c) == before


@pytest.mark.parametrize("case", list(CASES))
def test_non_finite_answers_are_never_a_success(loose, case):
    """With the bounds off, the same requests reach the model and come out non-finite: 422."""
    path, body = CASES[case]
    with loose.client() as c:
        err = assert_error(c.post(path, json=body), 422, "out_of_range", AFTER_COMPUTE_FIELDS[case])
        assert "range the model can handle" in err["error"], err


# -- 13. V2: outputs checked before compute, datatype honoured ------------------------------------


def test_v2_unknown_output_refused_before_compute(priced):
    with priced.client() as c:
        before = compute_counts(c)
        r = c.post("/v2/models/ica/infer", json=v2_body([0.5] * (2 * N_FEATURES), outputs=[{"name": "nope"}]))
        assert_error(r, 422, "invalid_input", "outputs[0].name")
        r = c.post("/v2/models/ica/infer", json=v2_body([0.5] * (2 * N_FEATURES),
                                                        outputs=[{"name": "logits"}, {"name": "scores"}]))
        assert_error(r, 422, "invalid_input", "outputs[1].name")
        assert compute_counts(c) == before


def test_v2_datatype_is_honoured(priced):
    ints = list(range(-6, 6))  # 2 x 6 values

    def logits(r: httpx.Response) -> np.ndarray:
        assert r.status_code == 200, r.text
        return np.asarray(r.json()["outputs"][0]["data"])

    with priced.client() as c:
        infer = lambda body: c.post("/v2/models/ica/infer", json=body)  # noqa: E731
        fp32 = logits(infer(v2_body([float(v) for v in ints])))
        for dt in ("INT32", "INT64", "FP64", "FP16"):
            np.testing.assert_array_equal(logits(infer(v2_body(ints, dt))), fp32)
        # integer types take integers only, within their range
        floats = [v + 0.5 for v in ints]
        for dt in ("INT32", "INT64"):
            err = assert_error(infer(v2_body(floats, dt)), 422, "invalid_input", "inputs[0].data")
            assert dt in err["error"], err
        assert_error(infer(v2_body([2 ** 31] + ints[1:], "INT32")), 422, "invalid_input", "inputs[0].data")
        # a valid INT64, but 1.4e9 standard deviations from the training mean: out of the model's range
        assert_error(infer(v2_body([2 ** 31] + ints[1:], "INT64")), 422, "out_of_range", "inputs[0].data[0][0][0]")
        # FP16: rounded to half precision, refused beyond its range
        values = [0.1 * v + 0.01 for v in ints]
        half = [float(np.float16(v)) for v in values]
        np.testing.assert_array_equal(logits(infer(v2_body(values, "FP16"))), logits(infer(v2_body(half))))
        assert_error(infer(v2_body([70000.0] + values[1:], "FP16")), 422, "invalid_input", "inputs[0].data")
        # unknown datatypes are refused
        for dt in ("BOOL", "UINT8", "BYTES", "fp32"):
            assert_error(infer(v2_body(ints, dt)), 422, "invalid_input", "inputs[0].datatype")
