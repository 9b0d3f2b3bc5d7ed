"""The Open Inference Protocol over gRPC (issue 12, part 3), against a real server (`icaserve
serve`) with gRPC on a free loopback port, through clients nobody here wrote: `tritonclient.grpc`
(raw tensors) and Triton's own generated stubs (typed `contents`, which tritonclient never sends).

Covered: health, server and model metadata (equal to V2 over HTTP), inference equal to V2 over
HTTP and to /predict, the `saliency` output equal to /explain, raw and typed contents both ways,
errors mapped to gRPC status codes with the JSON error body as details (bad shape, bad values,
unknown output, unknown model, missing or wrong key), the message-size limit, and the calls counted
in /metrics. The proto itself is compared with the official one as tritonclient ships it.

The service's own stubs (service.proto) are not imported here: they define the same protobuf
names as tritonclient's, and one process can register a name only once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import CLASS_NAMES, N_FEATURES, REPO, Server, metric, raw_sequence

KEY = "grpc-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_BODY = 65536  # small, so the size-limit test needs no large message
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server(server_factory: Any, model_store: Path) -> Iterator[Server]:
    s = server_factory(model_store, {"API_KEY": KEY, "MAX_BODY_BYTES": MAX_BODY}, grpc=True)
    yield s
    assert "Traceback" not in s.log(100_000), s.log()  # every refusal above was an answer, not a crash
    s.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.grpc_target)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[Any]:
    with server.client(headers=AUTH) as c:
        yield c


def _batch(b: int = 2, t: int = 10, seed: int = 0) -> np.ndarray:
    return np.stack([raw_sequence(t, seed + i) for i in range(b)])


def _input(x: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # raw_input_contents
    return inp


def _http_v2(http: Any, x: np.ndarray, outputs: list[str] | None = None, parameters: dict | None = None) -> dict:
    body: dict[str, Any] = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                        "data": x.reshape(-1).tolist()}]}
    if outputs:
        body["outputs"] = [{"name": o} for o in outputs]
    if parameters:
        body["parameters"] = parameters
    r = http.post("/v2/models/ica/infer", json=body)
    assert r.status_code == 200, r.text
    return {o["name"]: np.asarray(o["data"], dtype=np.float32).reshape(o["shape"]) for o in r.json()["outputs"]}


def _error(exc: pytest.ExceptionInfo[InferenceServerException], code: str) -> dict:
    """The status is `code` and the details are the one JSON error body."""
    assert exc.value.status() == f"StatusCode.{code}", (exc.value.status(), exc.value.message())
    body = json.loads(exc.value.message())
    assert set(body) == {"error", "code", "field", "request_id"}, body
    assert body["error"] and body["request_id"], body
    return body


# -- health and metadata ---------------------------------------------------------------------------

def test_health_and_metadata_equal_http(client: grpcclient.InferenceServerClient, http: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()  # open, as /v2/health/* are
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "icaserve"
    assert meta["extensions"] == http.get("/v2").json()["extensions"]
    assert client.is_model_ready("ica", headers=AUTH)
    assert client.is_model_ready("ica", "1", headers=AUTH)
    for version in ("", "1"):
        got = client.get_model_metadata("ica", version, headers=AUTH, as_json=True)
        want = http.get("/v2/models/ica" + (f"/versions/{version}" if version else "")).json()
        assert got["name"] == want["name"] and got["platform"] == want["platform"]
        assert got["versions"] == want["versions"]
        for kind in ("inputs", "outputs"):
            assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in got[kind]] == \
                [(t["name"], t["datatype"], t["shape"]) for t in want[kind]], kind
    assert client.get_model_metadata("ica", headers=AUTH, as_json=True)["versions"] == ["1", "2"]


# -- inference -------------------------------------------------------------------------------------

def test_infer_equals_http_and_predict(client: grpcclient.InferenceServerClient, http: Any) -> None:
    x = _batch()
    result = client.infer("ica", [_input(x)], headers=AUTH, request_id="req-1")  # no outputs named: all
    names = [o.name for o in result.get_response().outputs]
    assert names == ["probabilities", "logits"]
    assert result.get_response().id == "req-1" and result.get_response().model_version == "2"
    want = _http_v2(http, x)
    for name in names:
        got = result.as_numpy(name)
        assert got.dtype == np.float32 and got.shape == (2, len(CLASS_NAMES))
        np.testing.assert_allclose(got, want[name], rtol=1e-6, atol=1e-7)
    predict = http.post("/models/ica/predict", json={"inputs": x.tolist()}).json()
    assert [p["label"] for p in predict["predictions"]] == \
        [CLASS_NAMES[i] for i in result.as_numpy("probabilities").argmax(1)]
    # one version, one output
    one = client.infer("ica", [_input(x)], model_version="1", headers=AUTH,
                       outputs=[grpcclient.InferRequestedOutput("logits")])
    assert [o.name for o in one.get_response().outputs] == ["logits"]
    assert one.get_response().model_version == "1"


def test_saliency_output_equals_explain(client: grpcclient.InferenceServerClient, http: Any) -> None:
    x = _batch(b=2, t=8, seed=5)
    params = {"method": "integrated_gradients", "target": "all", "steps": 8}
    result = client.infer("ica", [_input(x)], headers=AUTH, parameters=params,
                          outputs=[grpcclient.InferRequestedOutput("saliency"),
                                   grpcclient.InferRequestedOutput("probabilities")])
    sal = result.as_numpy("saliency")
    assert sal.shape == (2, len(CLASS_NAMES), 8, N_FEATURES) and np.isfinite(sal).all()
    np.testing.assert_allclose(sal, _http_v2(http, x, ["saliency"], params)["saliency"], rtol=1e-6, atol=1e-7)
    r = http.post("/models/ica/explain", json={"inputs": x.tolist(), "method": "integrated_gradients",
                                                "target": "all", "parameters": {"steps": 8}})
    assert r.status_code == 200, r.text
    explain = np.asarray([[a["saliency"] for a in e["attributions"]] for e in r.json()["explanations"]],
                         dtype=np.float32)
    np.testing.assert_allclose(sal, explain, rtol=1e-5, atol=1e-6)
    # a method parameter of another method is named as V2 names it: a request parameter
    with pytest.raises(InferenceServerException) as exc:
        client.infer("ica", [_input(x)], headers=AUTH, parameters={"method": "gradient", "steps": 8},
                     outputs=[grpcclient.InferRequestedOutput("saliency")])
    assert "parameters.steps" in (_error(exc, "INVALID_ARGUMENT")["field"] or "")


def test_typed_contents_both_ways(server: Server, client: grpcclient.InferenceServerClient) -> None:
    """Triton's stubs, typed contents (INT64 here: integer inputs are honoured too): the answer
    comes typed (fp32_contents) and equals the raw round trip's."""
    x = np.rint(_batch(b=1, t=6, seed=9)).astype(np.int64)
    request = service_pb2.ModelInferRequest(model_name="ica")
    tensor = request.inputs.add(name="x", datatype="INT64", shape=list(x.shape))
    tensor.contents.int64_contents.extend(x.reshape(-1).tolist())
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, metadata=list(AUTH.items()), timeout=60)
    assert not response.raw_output_contents
    typed = {o.name: np.asarray(o.contents.fp32_contents, dtype=np.float32).reshape(o.shape)
             for o in response.outputs}
    raw = client.infer("ica", [_input(x.astype(np.float32))], headers=AUTH)
    for name in ("probabilities", "logits"):
        np.testing.assert_allclose(typed[name], raw.as_numpy(name), rtol=1e-6, atol=1e-7)


# -- errors ----------------------------------------------------------------------------------------

def test_bad_shape_is_invalid_argument(client: grpcclient.InferenceServerClient) -> None:
    x = np.zeros((1, 4, N_FEATURES - 1), dtype=np.float32)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("ica", [_input(x)], headers={**AUTH, "x-request-id": "bad-shape-1"})
    body = _error(exc, "INVALID_ARGUMENT")
    assert body["field"] == "inputs[0].shape" and body["code"] == "invalid_input"
    assert body["request_id"] == "bad-shape-1"
    assert str(N_FEATURES) in body["error"]


@pytest.mark.parametrize("case", ["nan", "unknown_output", "two_inputs", "raw_size"])
def test_bad_requests_name_the_field(client: grpcclient.InferenceServerClient, server: Server, case: str) -> None:
    x = _batch(b=1, t=4)
    outputs = None
    inputs = [_input(x)]
    if case == "nan":
        x[0, 2, 1] = np.nan
        inputs = [_input(x)]
        field = "raw_input_contents[0][0][2][1]"
    elif case == "unknown_output":
        outputs = [grpcclient.InferRequestedOutput("attention_map")]
        field = "outputs[0].name"
    elif case == "two_inputs":
        inputs = [_input(x), _input(x)]
        field = "inputs"
    else:  # declared shape larger than the bytes sent
        inp = grpcclient.InferInput("x", [1, 4, N_FEATURES], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 4, N_FEATURES), dtype=np.float32))
        inp.set_shape([1, 5, N_FEATURES])
        inputs = [inp]
        field = "raw_input_contents[0]"
    with pytest.raises(InferenceServerException) as exc:
        client.infer("ica", inputs, headers=AUTH, outputs=outputs)
    body = _error(exc, "INVALID_ARGUMENT")
    assert body["field"] == field, body
    assert server.running


def test_unknown_model_is_not_found(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as exc:
        client.infer("nope", [_input(_batch(b=1, t=4))], headers=AUTH)
    assert _error(exc, "NOT_FOUND")["code"] == "not_found"
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("nope", headers=AUTH)
    _error(exc, "NOT_FOUND")


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": KEY}],
                         ids=["missing", "wrong", "not-bearer"])
def test_key_required(client: grpcclient.InferenceServerClient, headers: dict[str, str]) -> None:
    with pytest.raises(InferenceServerException) as exc:
        client.infer("ica", [_input(_batch(b=1, t=4))], headers=headers)
    assert _error(exc, "UNAUTHENTICATED")["code"] == "unauthorized"
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("ica", headers=headers)
    _error(exc, "UNAUTHENTICATED")


def test_oversize_message_refused(client: grpcclient.InferenceServerClient, server: Server) -> None:
    x = np.zeros((4, 1000, N_FEATURES), dtype=np.float32)  # 96,000 bytes > MAX_BODY
    with pytest.raises(InferenceServerException) as exc:
        client.infer("ica", [_input(x)], headers=AUTH)
    assert exc.value.status() == "StatusCode.RESOURCE_EXHAUSTED", exc.value.message()
    assert client.is_server_live() and server.running


# -- metrics and the proto -------------------------------------------------------------------------

def test_calls_are_counted(client: grpcclient.InferenceServerClient, http: Any) -> None:
    endpoint = "/inference.GRPCInferenceService/ModelInfer"
    before = http.get("/metrics").text
    client.infer("ica", [_input(_batch(b=1, t=4))], headers=AUTH)
    with pytest.raises(InferenceServerException):
        client.infer("ica", [_input(np.zeros((1, 4, 2), dtype=np.float32))], headers=AUTH)
    after = http.get("/metrics").text

    def delta(sample: str, **labels: str) -> float:
        return metric(after, sample, **labels) - metric(before, sample, **labels)

    assert delta("icaserve_requests_total", endpoint=endpoint, model="ica", version="2", status="200") == 1
    assert delta("icaserve_requests_total", endpoint=endpoint, model="ica", status="422") == 1
    assert delta("icaserve_errors_total", kind="invalid_input") == 1
    assert delta("icaserve_request_duration_seconds_count", endpoint=endpoint) == 2
    assert delta("icaserve_batch_size_count", queue="predict") >= 1


def test_proto_matches_the_official_one(tmp_path: Path) -> None:
    """Every message and RPC of service/proto/grpc_predict_v2.proto has the official package, names,
    field numbers and types (as tritonclient's generated module holds them)."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    assert protoc.main(["protoc", f"-I{REPO}", f"--descriptor_set_out={out}",
                        "service/proto/grpc_predict_v2.proto"]) == 0
    ours = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    assert ours.package == "inference"
    official = service_pb2.DESCRIPTOR

    def fields(msg: descriptor_pb2.DescriptorProto, prefix: str) -> dict[str, tuple]:
        out: dict[str, tuple] = {}
        for f in msg.field:
            out[f"{prefix}.{f.name}"] = (f.number, f.type, f.label == f.LABEL_REPEATED, f.type_name.lstrip("."))
        for n in msg.nested_type:
            out.update(fields(n, f"{prefix}.{n.name}"))
        return out

    def official_fields(d: Any, prefix: str) -> dict[str, tuple]:
        out: dict[str, tuple] = {}
        for f in d.fields:
            out[f"{prefix}.{f.name}"] = (f.number, f.type, f.is_repeated if hasattr(f, "is_repeated") else
                                         f.label == f.LABEL_REPEATED, f.message_type.full_name if f.message_type else "")
        for n in d.nested_types:
            out.update(official_fields(n, f"{prefix}.{n.name}"))
        return out

    for msg in ours.message_type:
        assert fields(msg, msg.name) == official_fields(official.message_types_by_name[msg.name], msg.name), msg.name
    (svc,) = ours.service
    theirs = official.services_by_name[svc.name]
    for m in svc.method:
        o = theirs.methods_by_name[m.name]
        assert (m.input_type.lstrip("."), m.output_type.lstrip(".")) == (o.input_type.full_name,
                                                                           o.output_type.full_name)
    assert {m.name for m in svc.method} == {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                             "ModelMetadata", "ModelInfer"}
