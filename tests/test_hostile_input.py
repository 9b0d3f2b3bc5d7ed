"""Hostile input (issue 6): whatever a client sends, the answer is a 200 or a 4xx in the one error
format naming a field, never a 500.

- hypothesis property tests of the validation functions (`service.inputs`) on arbitrary values,
  and of the whole app (in-process, FastAPI's TestClient over the tiny store) on arbitrary JSON
  for `inputs`, `method`, `target` and `parameters`, on near-valid tensors, and on arbitrary bytes;
- a list of hand-picked nasty requests: malformed JSON, NaN / Infinity literals (not JSON),
  numbers past float64, deep nesting, wrong types and nesting, empty and huge arrays, wrong
  feature counts, unknown models / versions / methods, oversize bodies (declared and chunked),
  odd content types, V2 tensors that lie about their shape;
- schemathesis over the service's own OpenAPI schema (`/openapi.json`, in-process ASGI), see
  `test_openapi_schema` for the checks enabled.

Small limits keep every accepted request cheap; examples are capped to keep the file around a minute.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import CLASS_NAMES, MAX_LENGTH, N_FEATURES
from model_store import ModelStore
from service import inputs
from service.app import create_app
from service.errors import InvalidInput, MalformedBody, UnsupportedMediaType
from service.schemas import ExplainRequest, PredictRequest
from service.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

MAX_BODY = 64 * 1024
MAX_SEQUENCES = 4
LIMITS = dict(max_body_bytes=MAX_BODY, max_sequences=MAX_SEQUENCES, max_ig_steps=8, max_smoothgrad_samples=4,
              max_explain_cost=20_000)
HYPOTHESIS = settings(deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                             HealthCheck.data_too_large, HealthCheck.filter_too_much])


def make_app(store):
    return create_app(Settings(store=store, device="cpu", torch_threads=1, poll_interval_s=0, log_level="error",
                               request_timeout_s=30, **LIMITS))


@pytest.fixture(scope="module")
def client(model_store):
    with TestClient(make_app(model_store), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def manifest(model_store):
    return ModelStore(model_store).manifest("ica")


def check_answer(r, allowed: tuple[int, ...] = (200,)) -> dict | None:
    """200 (or `allowed`), or a 4xx in the common format naming a field; never a 5xx."""
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    if currently_in_test_context():
        event(f"status {r.status_code}")  # --hypothesis-show-statistics shows the mix
    if r.status_code in allowed:
        return None
    assert 400 <= r.status_code < 500, r.text[:300]
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error", "code", "field", "request_id"}, body
    assert isinstance(body["error"], str) and body["error"] and isinstance(body["code"], str), body
    assert body["request_id"] == r.headers["x-request-id"], body
    if r.status_code in (400, 413, 415, 422):
        assert isinstance(body["field"], str) and body["field"], body  # names where the problem is
    return body


# -- strategies -------------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=6), c,
                                                                                      max_size=4), max_leaves=20)
# Python-side values JSON cannot carry (the validation functions get them from other callers too)
any_floats = st.floats() | st.sampled_from([math.nan, math.inf, -math.inf, 3.5e38, -3.5e38, 1e-45])
cells = (st.floats(-1e3, 1e3) | st.integers(-10, 10) | st.sampled_from([1e39, -1e39, 10 ** 40, 2 ** 63, True, False])
         | st.none() | st.text(max_size=3) | st.lists(st.floats(-1, 1), max_size=2) | st.dictionaries(st.text(
             max_size=2), st.integers(), max_size=1))


@st.composite
def near_matrices(draw, valid_cells: bool = False) -> list:
    """T x N' nested lists, mostly the right shape, with now and then a bad cell or a ragged row."""
    t = draw(st.sampled_from([0, 1, 2, 5, MAX_LENGTH, MAX_LENGTH + 1]) | st.integers(0, 12))
    n = draw(st.sampled_from([N_FEATURES, N_FEATURES, N_FEATURES, 0, 1, N_FEATURES - 1, N_FEATURES + 1]))
    good = st.floats(-5, 5, allow_nan=False, width=32)
    rows = [[draw(good) for _ in range(n)] for _ in range(t)]
    if not valid_cells and rows and draw(st.booleans()):
        i, j = draw(st.integers(0, t - 1)), draw(st.integers(0, max(n - 1, 0)))
        if n:
            rows[i][j] = draw(cells)
        if draw(st.booleans()):
            rows[i] = draw(st.sampled_from([rows[i][:-1], rows[i] + [0.0], 7, None, "row", {}]))
    return rows


@st.composite
def inputs_values(draw):
    return draw(st.one_of(
        json_values,
        st.lists(near_matrices(), min_size=0, max_size=MAX_SEQUENCES + 1),
        st.lists(near_matrices(valid_cells=True), min_size=1, max_size=2),
    ))


METHODS = ["gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "occlusion", "tsr"]
PARAMETER_NAMES = ["steps", "baseline", "samples", "noise", "seed", "window", "stride", "base_method",
                   "threshold_quantile", "feature_default", "internal_batch_size", "alpha"]
parameter_values = (st.integers(-3, 10) | st.sampled_from([0, 1, 2, 9, 2 ** 63, 2 ** 64, -(2 ** 63), "mean", "zeros"])
                    | st.lists(st.integers(-2, 70), max_size=3) | st.sampled_from(METHODS) | json_values
                    | st.floats(-2, 2) | near_matrices())


@st.composite
def explain_bodies(draw) -> Any:
    body: dict[str, Any] = {"inputs": draw(inputs_values())}
    if draw(st.booleans()):
        body["method"] = draw(st.sampled_from(METHODS) | json_values)
    if draw(st.booleans()):
        body["target"] = draw(st.sampled_from(["predicted", "all", *CLASS_NAMES, 0, 2, 3, -1, [], ["up", 0]])
                              | json_values)
    if draw(st.booleans()):
        body["parameters"] = draw(st.dictionaries(st.sampled_from(PARAMETER_NAMES), parameter_values, max_size=3)
                                  | json_values)
    for key in ("absolute", "normalize", "attention"):
        if draw(st.integers(0, 5)) == 0:
            body[key] = draw(st.sampled_from([True, False, "none", "minmax", "sum", "max"]) | json_values)
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(max_size=5))] = draw(json_values)  # unknown fields
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)  # not even an object
    return body


@st.composite
def plausible_explain_bodies(draw) -> dict[str, Any]:
    """Mostly valid requests, so the compute paths (every method, target mode and option) run too."""
    t = draw(st.integers(1, 12))
    seqs = draw(st.lists(st.lists(st.lists(st.floats(-5, 5, width=32), min_size=N_FEATURES, max_size=N_FEATURES),
                                  min_size=t, max_size=t), min_size=1, max_size=2))
    method = draw(st.sampled_from(METHODS))
    params: dict[str, Any] = {}
    if method in ("integrated_gradients", "tsr") and draw(st.booleans()):
        params["steps"] = draw(st.integers(1, 9))
        if method == "tsr":
            params["base_method"] = "integrated_gradients"
    if method == "smoothgrad":
        params.update(draw(st.fixed_dictionaries({}, optional={
            "samples": st.integers(1, 5), "noise": st.floats(0, 3), "seed": st.integers(0, 2 ** 63)})))
    if method == "occlusion":
        params.update(draw(st.fixed_dictionaries({}, optional={
            "window": st.tuples(st.integers(0, 13), st.integers(0, 7)),
            "stride": st.tuples(st.integers(0, 4), st.integers(0, 4))})))
    if method in ("integrated_gradients", "occlusion", "tsr") and draw(st.booleans()):
        params["baseline"] = draw(st.sampled_from(["mean", "zeros"]) | st.just([[0.0] * N_FEATURES] * t))
    if method == "tsr" and draw(st.booleans()):
        params["threshold_quantile"] = draw(st.floats(0, 1))
        params["feature_default"] = draw(st.floats(0, 1))
    return {"inputs": seqs, "method": method, "parameters": params,
            "target": draw(st.sampled_from(["predicted", "all", *CLASS_NAMES, 0, 2, ["up", 0], [1, "flat"]])),
            "absolute": draw(st.booleans()), "normalize": draw(st.sampled_from(["none", "minmax", "sum"])),
            "attention": draw(st.booleans())}


@st.composite
def v2_bodies(draw) -> Any:
    shape = draw(st.lists(st.integers(-1, 8), max_size=4) | st.just([1, 3, N_FEATURES]) | json_values)
    size = int(np.prod(shape)) if isinstance(shape, list) and all(type(s) is int for s in shape) and shape else 3
    data = draw(st.lists(st.floats(-3, 3), min_size=max(min(size, 40), 0), max_size=max(min(size, 40), 0))
                | json_values | near_matrices())
    tensor: dict[str, Any] = {"name": draw(st.sampled_from(["x", ""]) | st.text(max_size=3)), "shape": shape,
                              "datatype": draw(st.sampled_from(["FP32", "FP64", "INT64", "BYTES"]) | json_values),
                              "data": data}
    if draw(st.integers(0, 4)) == 0:
        tensor.pop(draw(st.sampled_from(sorted(tensor))))
    body: dict[str, Any] = {"inputs": draw(st.sampled_from([[tensor], [tensor, tensor], [], tensor]))}
    if draw(st.booleans()):
        body["outputs"] = draw(st.sampled_from([[{"name": "logits"}], [{"name": "nope"}], [{}], "x"]) | json_values)
    if draw(st.integers(0, 4)) == 0:
        body["id"] = draw(json_values)
    return body


# -- the validation functions ------------------------------------------------------------------------


@HYPOTHESIS
@given(value=json_values | st.lists(near_matrices(), max_size=3) | st.lists(st.lists(st.lists(any_floats, max_size=7),
                                                                                   max_size=3), max_size=2))
def test_sequences_accept_or_name_the_field(manifest, value):
    try:
        out = inputs.sequences(value, manifest, MAX_SEQUENCES)
    except InvalidInput as exc:
        assert exc.field and exc.field.startswith("inputs") and exc.status == 422, exc.field
        return
    assert isinstance(value, list) and 1 <= len(out) <= MAX_SEQUENCES
    for x, raw in zip(out, value):
        assert x.dtype == np.float32 and x.ndim == 2 and x.shape == (len(raw), N_FEATURES)
        assert np.isfinite(x).all()
        assert manifest.input.min_length <= len(x) <= manifest.input.max_length


@HYPOTHESIS
@given(value=json_values | near_matrices() | st.lists(st.lists(any_floats, max_size=7), max_size=4))
def test_matrix_accepts_or_names_the_cell(value):
    try:
        out = inputs.matrix(value, "parameters.baseline", N_FEATURES, 1, MAX_LENGTH)
    except InvalidInput as exc:
        assert exc.field.startswith("parameters.baseline"), exc.field
        return
    assert out.shape == (len(value), N_FEATURES) and np.isfinite(out).all()
    expected = np.asarray([[float(v) for v in row] for row in value], dtype=np.float64)
    assert np.allclose(out, expected.astype(np.float32))
    assert not any(isinstance(v, bool) for row in value for v in row)


@HYPOTHESIS
@given(target=json_values | st.sampled_from(["predicted", "all", *CLASS_NAMES]) | st.lists(
    st.sampled_from(CLASS_NAMES) | st.integers(-2, 4) | st.booleans(), max_size=4))
def test_targets_resolve_or_name_the_field(target):
    try:
        idx, everything = inputs.resolve_targets(target, CLASS_NAMES)
    except InvalidInput as exc:
        assert exc.field.startswith("target"), exc.field
        return
    if idx is not None:
        assert idx and all(type(i) is int and 0 <= i < len(CLASS_NAMES) for i in idx)
        assert len(set(idx)) == len(idx)
    else:
        assert target in ("predicted", "all") and everything == (target == "all")


@HYPOTHESIS
@given(body=st.binary(max_size=200) | st.text(max_size=100).map(str.encode)
       | json_values.map(json.dumps).map(str.encode),
       content_type=st.sampled_from([None, "application/json", "application/json; charset=utf-8", "text/plain",
                                     "application/x-www-form-urlencoded", "", "application/vnd.api+json",
                                     "multipart/form-data; boundary=x", ";;;", "JSON"]))
def test_parse_json_parses_or_refuses(body, content_type):
    try:
        inputs.parse_json(body, content_type)
    except (MalformedBody, UnsupportedMediaType) as exc:
        assert exc.field == "body" and exc.status in (400, 415)


@HYPOTHESIS
@given(data=json_values | explain_bodies())
def test_validate_models_accepts_or_names_the_field(data):
    for model in (PredictRequest, ExplainRequest):
        try:
            obj, raw = inputs.validate(model, data)
        except InvalidInput as exc:
            assert isinstance(exc.field, str) and exc.field, exc.field
            continue
        assert isinstance(obj, model) and set(raw) <= {"inputs"}


# -- the whole app, in-process ------------------------------------------------------------------------


@settings(HYPOTHESIS, max_examples=120)
@given(body=explain_bodies() | plausible_explain_bodies(),
       path=st.sampled_from(["/explain", "/models/ica/explain", "/models/lstm/explain",
                             "/models/ica/versions/1/explain"]))
def test_explain_never_500(client, body, path):
    r = client.post(path, json=body)
    if check_answer(r) is None:
        out = r.json()["explanations"]
        assert len(out) == len(body["inputs"])
        for e, x in zip(out, body["inputs"]):
            for a in e["attributions"]:
                assert np.asarray(a["saliency"], dtype=float).shape == (len(x), N_FEATURES)


@settings(HYPOTHESIS, max_examples=80)
@given(body=explain_bodies(),
       path=st.sampled_from(["/predict", "/models/lstm/predict", "/models/ica/versions/2/predict"]))
def test_predict_never_500(client, body, path):
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k == "inputs" or len(body) % 3 == 0}  # extras now and then
    r = client.post(path, json=body)
    if check_answer(r) is None:
        assert len(r.json()["predictions"]) == len(body["inputs"])


@settings(HYPOTHESIS, max_examples=80)
@given(body=v2_bodies(), path=st.sampled_from(["/v2/models/ica/infer", "/v2/models/lstm/versions/1/infer"]))
def test_v2_infer_never_500(client, body, path):
    check_answer(client.post(path, json=body))


@settings(HYPOTHESIS, max_examples=60)
@given(raw=st.binary(max_size=300) | st.text(alphabet='{}[]":,0123456789.eE+-naNIfityrulsef \\u', max_size=80)
       .map(str.encode), path=st.sampled_from(["/predict", "/explain", "/v2/models/ica/infer"]))
def test_arbitrary_bytes_never_500(client, raw, path):
    check_answer(client.post(path, content=raw, headers={"content-type": "application/json"}))


@settings(HYPOTHESIS, max_examples=60)
@given(name=st.text(min_size=1, max_size=80) | st.sampled_from(["..", ".", "ica/../lstm", "%2e%2e", "ICA", "ica\n",
                                                                "ica ", "a" * 65, "-ica", "_", "ica\x00"]),
       version=st.text(max_size=12) | st.sampled_from(["-1", "0", "1e3", "1.0", "+1", " 1", "²", "١", "0x1",
                                                       "9" * 10, "latest", "LATEST", "01"]))
def test_arbitrary_model_names_and_versions_never_500(client, name, version):
    from urllib.parse import quote

    n, v = quote(name, safe=""), quote(version, safe="")
    for method, path in (("POST", f"/models/{n}/predict"), ("POST", f"/models/{n}/versions/{v}/explain"),
                         ("GET", f"/models/{n}"), ("GET", f"/v2/models/{n}/versions/{v}"),
                         ("POST", f"/v2/models/{n}/versions/{v}/infer")):
        r = client.request(method, path, json={"inputs": [[[0.5] * N_FEATURES] * 3]})
        assert r.status_code < 500, (path, r.text)
        if r.request.url.raw_path.decode() != path:
            continue  # the client removed dot segments ("/models/../predict" is "/predict"): see test_security
        if r.status_code == 200:  # only real models and versions are found
            assert name in ("ica", "lstm"), path
            assert "versions" not in path or version == "latest" or (
                version.isascii() and version.isdigit() and 1 <= int(version) <= 2), path
        else:
            assert r.status_code in (404, 405, 422, 503), (path, r.status_code, r.text)
            check_answer(r)


# -- hand-picked nasty requests -------------------------------------------------------------------------

ROW = [0.5] * N_FEATURES
NASTY: dict[str, tuple[str, dict[str, Any], int, str]] = {
    # name: (path, request kwargs, status, code)
    "nan_literal": ("/predict", {"content": b'{"inputs": [[[NaN, 1, 1, 1, 1, 1]]]}'}, 400, "malformed_body"),
    "infinity_literal": ("/explain", {"content": b'{"inputs": [[[1, Infinity, 1, 1, 1, 1]]]}'}, 400,
                         "malformed_body"),
    "minus_infinity_literal": ("/predict", {"content": b'{"inputs": [[[1, 1, -Infinity, 1, 1, 1]]]}'}, 400,
                               "malformed_body"),
    "nan_as_parameter": ("/explain", {"content": b'{"inputs": [[[1, 1, 1, 1, 1, 1]]], "method": "smoothgrad", '
                                                b'"parameters": {"noise": NaN}}'}, 400, "malformed_body"),
    "number_past_float64": ("/predict", {"content": b'{"inputs": [[[1e400, 1, 1, 1, 1, 1]]]}'}, 400,
                            "malformed_body"),
    "five_thousand_digit_int": ("/predict", {"content": b'{"inputs": [[[' + b"9" * 5000 + b', 1, 1, 1, 1, 1]]]}'},
                                400, "malformed_body"),
    "float32_overflow": ("/predict", {"json": {"inputs": [[ROW, [1e39] + ROW[1:]]]}}, 422, "invalid_input"),
    # deeper than the parser's limit (1024) but with fewer lists than the model's limits allow (more: 422)
    "deep_nesting": ("/predict", {"content": b'{"inputs": ' + b"[" * 1100 + b"]" * 1100 + b"}"}, 400,
                     "malformed_body"),
    "nested_one_level_too_deep": ("/predict", {"json": {"inputs": [[[ROW]]]}}, 422, "invalid_input"),
    "one_level_too_shallow": ("/predict", {"json": {"inputs": [ROW]}}, 422, "invalid_input"),
    "flat_numbers": ("/predict", {"json": {"inputs": ROW}}, 422, "invalid_input"),
    "truncated_json": ("/explain", {"content": b'{"inputs": [[[1, 2, 3'}, 400, "malformed_body"),
    "trailing_garbage": ("/predict", {"content": b'{"inputs": [[[1, 1, 1, 1, 1, 1]]]} xyz'}, 400,
                         "malformed_body"),
    "single_quotes": ("/predict", {"content": b"{'inputs': [[[1, 1, 1, 1, 1, 1]]]}"}, 400, "malformed_body"),
    "byte_order_mark": ("/predict", {"content": b'\xef\xbb\xbf{"inputs": [[[1, 1, 1, 1, 1, 1]]]}'}, 400,
                        "malformed_body"),
    "invalid_utf8": ("/predict", {"content": b'{"inputs": "\xc3\x28"}'}, 400, "malformed_body"),
    "lone_surrogate_escape": ("/explain", {"content": b'{"inputs": [[[1, 1, 1, 1, 1, 1]]], "method": "\\ud800"}'},
                              400, "malformed_body"),
    "nul_in_method": ("/explain", {"json": {"inputs": [[ROW]], "method": "gradient\x00"}}, 422, "invalid_input"),
    "duplicate_keys_last_wins_invalid": ("/predict", {"content": b'{"inputs": [[[1, 1, 1, 1, 1, 1]]], '
                                                                b'"inputs": "x"}'}, 422, "invalid_input"),
    "top_level_null": ("/predict", {"content": b"null"}, 422, "invalid_input"),
    "top_level_number": ("/explain", {"content": b"42"}, 422, "invalid_input"),
    "inputs_object": ("/predict", {"json": {"inputs": {"0": [ROW]}}}, 422, "invalid_input"),
    "inputs_string_matrix": ("/predict", {"json": {"inputs": ["abcdef"]}}, 422, "invalid_input"),
    "cells_are_strings": ("/predict", {"json": {"inputs": [[["1"] * N_FEATURES]]}}, 422, "invalid_input"),
    "cells_are_objects": ("/predict", {"json": {"inputs": [[[{"v": 1}] * N_FEATURES]]}}, 422, "invalid_input"),
    "empty_inputs": ("/explain", {"json": {"inputs": []}}, 422, "invalid_input"),
    "empty_sequence": ("/explain", {"json": {"inputs": [[]]}}, 422, "invalid_input"),
    "empty_rows": ("/predict", {"json": {"inputs": [[[], []]]}}, 422, "invalid_input"),
    "too_many_sequences": ("/predict", {"json": {"inputs": [[ROW]] * (MAX_SEQUENCES + 1)}}, 422, "invalid_input"),
    "too_many_time_steps": ("/predict", {"json": {"inputs": [[ROW] * (MAX_LENGTH + 1)]}}, 422, "invalid_input"),
    "huge_flat_array": ("/predict", {"json": {"inputs": [[0] * 20_000]}}, 422, "invalid_input"),
    "huge_row": ("/predict", {"json": {"inputs": [[[0] * 20_000]]}}, 422, "invalid_input"),
    "feature_count_short": ("/predict", {"json": {"inputs": [[ROW[:-1]] * 3]}}, 422, "invalid_input"),
    "feature_count_long": ("/explain", {"json": {"inputs": [[ROW + [0.5]] * 3]}}, 422, "invalid_input"),
    "ragged_sequences_ok_but_one_bad": ("/predict", {"json": {"inputs": [[ROW] * 3, [ROW, ROW[:2]]]}}, 422,
                                        "invalid_input"),
    "unknown_method": ("/explain", {"json": {"inputs": [[ROW]], "method": "shap"}}, 422, "invalid_input"),
    "method_wrong_type": ("/explain", {"json": {"inputs": [[ROW]], "method": ["gradient"]}}, 422, "invalid_input"),
    "parameters_wrong_type": ("/explain", {"json": {"inputs": [[ROW]], "parameters": "steps=5"}}, 422,
                              "invalid_input"),
    "steps_as_float": ("/explain", {"json": {"inputs": [[ROW]], "method": "integrated_gradients",
                                             "parameters": {"steps": 2.5}}}, 422, "invalid_input"),
    "steps_past_int64": ("/explain", {"json": {"inputs": [[ROW]], "method": "integrated_gradients",
                                               "parameters": {"steps": 2 ** 64}}}, 422, "invalid_input"),
    "seed_past_uint64": ("/explain", {"json": {"inputs": [[ROW]], "method": "smoothgrad",
                                               "parameters": {"seed": 2 ** 64}}}, 422, "invalid_input"),
    "window_past_int64": ("/explain", {"json": {"inputs": [[ROW] * 3], "method": "occlusion",
                                                "parameters": {"window": [2 ** 64, 1]}}}, 422, "invalid_input"),
    "window_three_numbers": ("/explain", {"json": {"inputs": [[ROW] * 3], "method": "occlusion",
                                                   "parameters": {"window": [1, 1, 1]}}}, 422, "invalid_input"),
    "baseline_wrong_shape": ("/explain", {"json": {"inputs": [[ROW] * 3], "method": "integrated_gradients",
                                                   "parameters": {"baseline": [ROW[:3]] * 3}}}, 422,
                             "invalid_input"),
    "target_object": ("/explain", {"json": {"inputs": [[ROW]], "target": {"class": "up"}}}, 422, "invalid_input"),
    "target_float": ("/explain", {"json": {"inputs": [[ROW]], "target": 1.0}}, 422, "invalid_input"),
    "target_huge_int": ("/explain", {"json": {"inputs": [[ROW]], "target": 2 ** 62}}, 422, "invalid_input"),
    "unknown_model": ("/models/nope/predict", {"json": {"inputs": [[ROW]]}}, 404, "not_found"),
    "unknown_model_v2": ("/v2/models/nope/infer", {"json": {"inputs": []}}, 404, "not_found"),
    "unknown_version": ("/models/ica/versions/7/explain", {"json": {"inputs": [[ROW]]}}, 404, "not_found"),
    "version_superscript_two": ("/models/ica/versions/%C2%B2/predict", {"json": {"inputs": [[ROW]]}}, 404,
                                "not_found"),
    "version_arabic_one": ("/models/ica/versions/%D9%A1/predict", {"json": {"inputs": [[ROW]]}}, 404, "not_found"),
    "version_exponent": ("/models/ica/versions/1e3/predict", {"json": {"inputs": [[ROW]]}}, 404, "not_found"),
    "oversize_declared": ("/predict", {"content": b"[" + b"0," * MAX_BODY + b"0]"}, 413, "payload_too_large"),
    "oversize_chunked": ("/explain", {"content": iter([b'{"inputs": ['] + [b"0," * 4096] * (MAX_BODY // 8192 + 2)
                                                      + [b"0]}"])}, 413, "payload_too_large"),
    "text_plain": ("/predict", {"content": b'{"inputs": [[[1, 1, 1, 1, 1, 1]]]}', "headers": {
        "content-type": "text/plain"}}, 415, "unsupported_media_type"),
    "v2_shape_lies": ("/v2/models/ica/infer", {"json": {"inputs": [{"name": "x", "shape": [1, 2, N_FEATURES],
                                                                     "datatype": "FP32", "data": [0.0] * 5}]}}, 422,
                      "invalid_input"),
    "v2_huge_shape": ("/v2/models/ica/infer", {"json": {"inputs": [{"name": "x", "shape": [2 ** 40, 2 ** 40,
                                                                                          N_FEATURES],
                                                                     "datatype": "FP32", "data": [0.0] * 6}]}}, 422,
                      "invalid_input"),
    "v2_negative_shape": ("/v2/models/ica/infer", {"json": {"inputs": [{"name": "x", "shape": [-1, 1, N_FEATURES],
                                                                         "datatype": "FP32", "data": ROW}]}}, 422,
                          "invalid_input"),
    "v2_strings_as_data": ("/v2/models/ica/infer", {"json": {"inputs": [{"name": "x", "shape": [1, 1, N_FEATURES],
                                                                          "datatype": "FP32",
                                                                          "data": ["1"] * N_FEATURES}]}}, 422,
                           "invalid_input"),
    "v2_ragged_data": ("/v2/models/ica/infer", {"json": {"inputs": [{"name": "x", "shape": [1, 2, N_FEATURES],
                                                                      "datatype": "FP32", "data": [ROW, ROW[:2]]}]}},
                       422, "invalid_input"),
}


FIELDS = {  # where the error says the problem is, for cases where a union is involved
    "target_object": "target", "target_float": "target", "target_huge_int": "target",
    "baseline_wrong_shape": "parameters.baseline", "steps_as_float": "parameters.steps",
    "window_three_numbers": "parameters.window", "inputs_object": "inputs", "cells_are_strings": "inputs[0][0][0]",
}


@pytest.mark.parametrize("case", list(NASTY))
def test_nasty_request(client, case):
    path, kwargs, status, code = NASTY[case]
    kwargs = dict(kwargs)
    if "content" in kwargs:
        kwargs.setdefault("headers", {"content-type": "application/json"})
    r = client.post(path, **kwargs)
    assert r.status_code == status, f"{case}: {r.status_code} {r.text[:300]}"
    body = check_answer(r)
    assert body is not None and body["code"] == code, body
    if case in FIELDS:
        assert body["field"] == FIELDS[case], body


def test_still_serving_after_all_that(client):
    r = client.post("/explain", json={"inputs": [[ROW] * 4], "method": "integrated_gradients",
                                      "parameters": {"steps": 4}})
    assert r.status_code == 200, r.text
    assert client.get("/readyz").status_code == 200


# -- schemathesis over /openapi.json ------------------------------------------------------------------


def test_openapi_refs_resolve(client):
    """Every $ref of the document points at a component (a dangling one left schemathesis, and
    any client generator, without a schema for explain's `parameters` and V2's tensors)."""
    import re

    doc = client.get("/openapi.json").json()
    refs = set(re.findall(r'"\$ref":\s*"([^"]+)"', json.dumps(doc)))
    components = doc["components"]["schemas"]
    assert refs and all(r.startswith("#/components/schemas/") and r.rsplit("/", 1)[1] in components for r in refs), refs
    body = doc["paths"]["/explain"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["parameters"]["properties"]["steps"], body["properties"]["parameters"]


@pytest.fixture(scope="module")
def openapi_schema(model_store):
    return schemathesis.openapi.from_asgi("/openapi.json", make_app(model_store))


schema = schemathesis.pytest.from_fixture("openapi_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_openapi_schema(case):
    """Generated requests (valid and invalid per the schema) for every documented operation.

    Checks: `not_a_server_error` (no 5xx), `status_code_conformance` (only documented status
    codes), `content_type_conformance` (documented media types), `response_schema_conformance`
    (bodies match their schemas: 200s and the error format), `negative_data_rejection` (requests
    that break the schema are refused with a 4xx). Not `positive_data_acceptance`: the schema
    cannot say that a sequence needs exactly the model's N features, so many schema-valid
    requests are rightly refused."""
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                   response_schema_conformance, negative_data_rejection])
