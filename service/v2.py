"""Open Inference Protocol (KServe V2) over the data plane, so clients written for KServe or
Triton (`tritonclient.http` with its defaults) work unchanged. Errors are `{"error": "..."}`
(plus our usual `code`, `field` and `request_id`, which such clients ignore).

Input: one tensor of shape [B, T, N], FP32 in the metadata; FP64, FP16, INT32 and INT64 are
accepted too and the declared datatype is honoured (a value it cannot hold is a 422 naming the
input). Its values come as JSON `data` (flat in row-major order, or nested) or, with the binary
tensor extension, as raw little-endian bytes after the JSON header (`Inference-Header-Content-Length`
header, `binary_data_size` parameter of the input).

Outputs: `probabilities` [B, C] and `logits` [B, C] (both when none are requested), and, on
request only (it is an explanation, priced as one), `saliency` [B, K, T, N]: the method, target
and method parameters are request `parameters` (`method`, `target`, `absolute`, `normalize`,
`steps`, `baseline`, ...; other keys, e.g. Triton's `binary_data_output`, are not ours and ignored).
All FP32; binary on the wire when the output's `binary_data` parameter, or the request's
`binary_data_output`, says so. An unknown output is refused before any compute; a non-finite
output is never returned (422 out_of_range).

Model repository extension (admin key): `POST /v2/repository/index`, `.../models/{name}/load`,
`.../models/{name}/unload`.
"""

from __future__ import annotations

import math
from importlib.metadata import PackageNotFoundError, version as package_version
from typing import Any, Literal

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from service.api import dataplane, serving_for
from service.dataplane import (
    API_PARAMETERS,
    BINARY_BYTES_PER_NUMBER,
    JSON_BYTES_PER_NUMBER,
    explain_options,
    softmax,
)
from service.errors import InvalidInput, MalformedBody, NotReady, UnsupportedMediaType, fields_renamed
from service.inputs import JsonLimits, OCTET_STREAM, check_json_media_type, parse_json, read_json, validate
from service.media import body_schema, json_bytes, json_response, parse_media_type
from service.registry import Serving
from service.schemas import ERRORS, ErrorBody
from service.security import require_admin, require_api_key

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])

HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data", "model_repository", "saliency"]
PREDICT_OUTPUTS = ("probabilities", "logits")  # what a request naming no outputs gets
OUTPUTS = (*PREDICT_OUTPUTS, "saliency")
# request parameters that configure the `saliency` output (besides the method parameters)
EXPLAIN_KEYS = ("method", "target", "absolute", "normalize")
DTYPES = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "INT32": "<i4", "INT64": "<i8"}
INT_RANGES = {"INT32": (-(2 ** 31), 2 ** 31 - 1), "INT64": (-(2 ** 63), 2 ** 63 - 1)}


class V2Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: Literal["FP32", "FP64", "FP16", "INT32", "INT64"]
    data: list[Any] | None = Field(None, description="row-major values, flat or nested; absent when the "
                                   "tensor is binary (parameters.binary_data_size)")
    parameters: dict[str, Any] | None = None


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [0.1, -0.3, 1.2, 0.0, 0.5, -1.1]}]
    }]})
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor] = Field(..., min_length=1, max_length=1)
    outputs: list[V2RequestedOutput] | None = None


class RepositoryIndexRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    ready: bool | None = None


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    try:
        v = package_version("icaserve")
    except PackageNotFoundError:
        v = "unknown"
    return json_response({"name": "icaserve", "version": v, "extensions": EXTENSIONS})


@router.get("/health/live", summary="Server liveness")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready", summary="Server readiness")
async def ready(request: Request) -> Response:
    if not request.app.state.registry.ready() or request.app.state.shutting_down:
        raise NotReady("server not ready")
    return json_response({"ready": True})


def _metadata(serving: Serving) -> dict[str, Any]:
    m = serving.model
    n, c = m.manifest.input.n_features, len(m.class_names)
    params: dict[str, Any] = {"class_names": m.class_names, "feature_names": m.manifest.input.feature_names}
    quality = getattr(m.manifest, "explanation_quality", None)  # measured at publish; older manifests lack it
    if quality is not None:
        params["explanation_quality"] = quality.model_dump() if hasattr(quality, "model_dump") else quality
    return {
        "name": m.name,
        "versions": [str(m.version)],
        "platform": "pytorch_torchscript" if m.backend == "torch" else "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1, n]}],
        "outputs": [{"name": o, "datatype": "FP32", "shape": [-1, c]} for o in PREDICT_OUTPUTS]
        + [{"name": "saliency", "datatype": "FP32", "shape": [-1, -1, -1, n]}],
        "parameters": params,
    }


@router.get("/models/{name}", summary="Model metadata", dependencies=[Depends(require_api_key)], responses=ERRORS)
async def model_metadata(request: Request, name: str) -> Response:
    serving = await serving_for(request, name, None)
    meta = _metadata(serving)
    meta["versions"] = [str(v) for v in request.app.state.registry.store.versions(name)]
    return json_response(meta)


@router.get("/models/{name}/versions/{version}", summary="Model version metadata",
            dependencies=[Depends(require_api_key)], responses=ERRORS)
async def version_metadata(request: Request, name: str, version: str) -> Response:
    return json_response(_metadata(await serving_for(request, name, version)))


async def _ready(request: Request, name: str, version: str | None) -> bool:
    """Unloaded through the repository API: not ready (200, ready false); absent: 404."""
    if name in dataplane(request).unloaded():
        await request.app.state.registry.get(name, version)  # still 404 for what does not exist
        return False
    await serving_for(request, name, version)
    return True


@router.get("/models/{name}/ready", summary="Model readiness", dependencies=[Depends(require_api_key)],
            responses=ERRORS)
async def model_ready(request: Request, name: str) -> Response:
    return json_response({"name": name, "ready": await _ready(request, name, None)})


@router.get("/models/{name}/versions/{version}/ready", summary="Model version readiness",
            dependencies=[Depends(require_api_key)], responses=ERRORS)
async def version_ready(request: Request, name: str, version: str) -> Response:
    return json_response({"name": name, "version": version, "ready": await _ready(request, name, version)})


INFER_DOC = dict(
    dependencies=[Depends(require_api_key)],
    responses={**ERRORS, 200: {"content": {"application/json": {}, OCTET_STREAM: {}},
                               "description": "JSON, or with binary outputs the binary tensor extension's "
                               "JSON header followed by the output bytes"}},
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": body_schema(V2InferRequest)}}}},
)


# -- decoding --------------------------------------------------------------------------------------

def _values(tensor: V2Tensor, field: str = "inputs[0].data") -> np.ndarray:
    """The tensor's JSON values, flat, as float64, checked against its declared datatype: FP32 /
    FP64 / FP16 take numbers (FP16 rounded to half precision, refused beyond its range), INT32 /
    INT64 integers only, within the type's range. FP32's range is checked with the inputs."""
    dt = tensor.datatype
    try:
        # As objects first: a float dtype would silently turn "1.5" and true into numbers.
        values = np.asarray(tensor.data, dtype=object).reshape(-1)
        kinds = set(map(type, values))
        if not kinds <= {int, float}:
            raise TypeError("not a number")
        if dt in INT_RANGES and float in kinds:
            i = next(i for i, v in enumerate(values) if type(v) is float)
            raise InvalidInput(f"{field}: input {tensor.name!r} is declared {dt}, which holds integers only; value "
                               f"{values[i]!r} at flat index {i} is not one", field=field)
        if dt in INT_RANGES and values.size:
            lo, hi = INT_RANGES[dt]
            if min(values) < lo or max(values) > hi:
                i = next(i for i, v in enumerate(values) if not lo <= v <= hi)
                raise InvalidInput(f"{field}: input {tensor.name!r} is declared {dt}; value {values[i]!r} at flat "
                                   f"index {i} is outside [{lo}, {hi}]", field=field)
        flat = values.astype(np.float64)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"{field}: must hold numbers only", field=field) from None
    if dt == "FP16":
        with np.errstate(over="ignore"):
            half = flat.astype(np.float16)
        bad = ~np.isfinite(half)
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidInput(f"{field}: input {tensor.name!r} is declared FP16; value {flat[i]!r} at flat index {i} "
                               "is outside its range (+-65504)", field=field)
        flat = half.astype(np.float64)
    return flat


def _binary_size(parameters: dict[str, Any] | None, field: str) -> int | None:
    size = (parameters or {}).get("binary_data_size")
    if size is None:
        return None
    if type(size) is not int or size < 0:
        raise InvalidInput(f"{field}: binary_data_size must be a non-negative integer, got {size!r}", field=field)
    return size


def _input_array(tensor: V2Tensor, n_features: int, binary: memoryview) -> np.ndarray:
    """The input tensor as a [B, T, N] array of its declared datatype, from JSON `data` or from
    the binary section; the shape is checked before any value is read."""
    shape = tensor.shape
    if len(shape) != 3 or shape[2] != n_features or min(shape) < 1:
        raise InvalidInput(f"inputs[0].shape: expected [B, T, {n_features}], got {shape}", field="inputs[0].shape")
    count = math.prod(shape)
    size = _binary_size(tensor.parameters, "inputs[0].parameters.binary_data_size")
    if size is not None:
        if tensor.data is not None:
            raise InvalidInput("inputs[0].data: a binary input (binary_data_size) carries no JSON data",
                               field="inputs[0].data")
        dtype = np.dtype(DTYPES[tensor.datatype])
        if size != count * dtype.itemsize or size != len(binary):
            raise InvalidInput(f"inputs[0].parameters.binary_data_size: shape {shape} of {tensor.datatype} takes "
                               f"{count * dtype.itemsize} bytes; binary_data_size is {size} and {len(binary)} binary "
                               "bytes follow the JSON header", field="inputs[0].parameters.binary_data_size")
        return np.frombuffer(binary, dtype=dtype).reshape(shape)
    if len(binary):
        raise InvalidInput(f"body: {len(binary)} bytes follow the JSON header but no input declares "
                           "binary_data_size", field="body")
    if tensor.data is None:
        raise InvalidInput("inputs[0].data: missing (send data, or binary_data_size with the binary tensor "
                           "extension)", field="inputs[0].data")
    flat = _values(tensor)
    if flat.size != count:
        raise InvalidInput(f"inputs[0].data: {flat.size} values for shape {shape} ({count} expected)",
                           field="inputs[0].data")
    return flat.reshape(shape)


async def _read(request: Request, serving: Serving) -> tuple[Any, memoryview]:
    """The JSON part of the request (parsed with the model's limits) and the binary part after it
    (empty without the binary tensor extension). Triton and KServe clients often send no
    Content-Type: accepted here (not on the JSON API); with a binary part, octet-stream too."""
    manifest = serving.model.manifest
    declared = request.headers.get(HEADER_LENGTH)
    if declared is None:
        return await read_json(request, manifest, media_type_required=False), memoryview(b"")
    content_type = request.headers.get("content-type")
    media = parse_media_type(content_type) if content_type else None
    if media is None or f"{media.type}/{media.subtype}" != OCTET_STREAM:
        try:
            check_json_media_type(content_type, required=False)
        except UnsupportedMediaType:
            raise UnsupportedMediaType(f"send the binary tensor extension as {OCTET_STREAM} (or JSON), not "
                                       f"{content_type!r}", field="body") from None
    body = await request.body()
    if not (declared.isascii() and declared.isdigit()) or int(declared) > len(body):
        raise MalformedBody(f"Inference-Header-Content-Length: {declared[:32]!r} is not a length within the "
                            f"{len(body)}-byte body", field="Inference-Header-Content-Length")
    n = int(declared)
    limits = JsonLimits.for_model(manifest, request.app.state.settings.max_sequences)
    data = await anyio.to_thread.run_sync(lambda: parse_json(body[:n], None, limits, media_type_required=False))
    return data, memoryview(body)[n:]


def _v2_field(field: str) -> str:
    """Data plane fields as V2 names them: explanation options are request parameters."""
    head = field.split("[", 1)[0].split(".", 1)[0]
    if head in EXPLAIN_KEYS or head == "attention":
        return f"parameters.{field}"
    return field


LIST_KEYS = ("target", "window", "stride")  # V2 parameters hold scalars: these lists come as `up,0`, `3,2`


def _comma_list(value: Any) -> Any:
    if isinstance(value, str) and "," in value:
        return [int(v) if v.strip().isascii() and v.strip().isdigit() else v.strip() for v in value.split(",")]
    return value


def _explain_options(parameters: dict[str, Any] | None):
    opts: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for key, value in (parameters or {}).items():
        if key in LIST_KEYS:
            value = _comma_list(value)
        if key in EXPLAIN_KEYS:
            opts[key] = value
        elif key in API_PARAMETERS:
            params[key] = value
    if params:
        opts["parameters"] = params
    return explain_options(opts)


def _binary_flag(value: Any, field: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidInput(f"{field}: must be true or false, got {value!r}", field=field)
    return value


# -- inference -------------------------------------------------------------------------------------

async def _infer(request: Request, name: str, version: str | None) -> Response:
    serving = await serving_for(request, name, version)
    plane = dataplane(request)
    data, binary = await _read(request, serving)
    req, _ = validate(V2InferRequest, data, tensors=())
    request_binary = _binary_flag((req.parameters or {}).get("binary_data_output"), "parameters.binary_data_output")
    wanted: list[tuple[str, bool]] = []
    if req.outputs:
        for i, o in enumerate(req.outputs):  # before any compute
            if o.name not in OUTPUTS:
                raise InvalidInput(f"outputs[{i}].name: unknown output {o.name!r} (this model has {sorted(OUTPUTS)})",
                                   field=f"outputs[{i}].name")
            flag = (o.parameters or {}).get("binary_data")
            wanted.append((o.name, request_binary if flag is None else
                           _binary_flag(flag, f"outputs[{i}].parameters.binary_data")))
    else:
        wanted = [(o, request_binary) for o in PREDICT_OUTPUTS]
    arr = _input_array(req.inputs[0], serving.model.manifest.input.n_features, binary)
    seqs = plane.batch(serving.model, arr, field="inputs[0].data")
    timings = request.state.timings
    values: dict[str, np.ndarray] = {}
    saliency = [b for o, b in wanted if o == "saliency"]
    if saliency:
        with fields_renamed(_v2_field):
            options = _explain_options(req.parameters)
            request.state.method = options.method
            per_number = BINARY_BYTES_PER_NUMBER if all(saliency) else JSON_BYTES_PER_NUMBER
            explained = await plane.explain(serving, seqs, options, bytes_per_number=per_number,
                                            field="inputs[0].data", timings=timings)
        logits = np.stack([e.logits for e in explained.explanations]).astype(np.float32)
        values["saliency"] = explained.saliency_tensor()
    else:
        logits = (await plane.predict(serving, seqs, field="inputs[0].data", timings=timings)).logits
    values["logits"] = logits
    values["probabilities"] = softmax(logits).astype(np.float32)
    return _encode(req, serving, wanted, values)


def _encode(req: V2InferRequest, serving: Serving, wanted: list[tuple[str, bool]],
            values: dict[str, np.ndarray]) -> Response:
    """One JSON answer, or the binary tensor extension's JSON header followed by the outputs'
    little-endian bytes, in the order of the outputs."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in wanted:
        v = np.ascontiguousarray(values[name], dtype="<f4")
        out: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(v.shape)}
        if binary:
            raw = v.tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = v.reshape(-1)
        outputs.append(out)
    body: dict[str, Any] = {"model_name": serving.model.name, "model_version": str(serving.model.version),
                            "outputs": outputs}
    if req.id is not None:
        body["id"] = req.id
    header = json_bytes(body)
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(b"".join([header, *chunks]), media_type=OCTET_STREAM,
                    headers={"Inference-Header-Content-Length": str(len(header))})


@router.post("/models/{name}/infer", summary="Inference (latest version)", **INFER_DOC)
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference (one version)", **INFER_DOC)
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)


# -- model repository extension --------------------------------------------------------------------

REPOSITORY_DOC = dict(dependencies=[Depends(require_admin)],
                      responses={**ERRORS, 403: {"model": ErrorBody}})  # 403: the admin API is disabled


async def _small_json(request: Request) -> Any:
    """A repository request's optional JSON body (empty: {})."""
    body = await request.body()
    if not body.strip():
        return {}
    return parse_json(body, request.headers.get("content-type"), JsonLimits(256, 4096, "a repository request"),
                      media_type_required=False)


@router.post("/repository/index", summary="Models in the repository and their state", **REPOSITORY_DOC)
async def repository_index(request: Request) -> Response:
    req, _ = validate(RepositoryIndexRequest, await _small_json(request), tensors=())
    registry = request.app.state.registry
    await registry.follow_reloads()
    unloaded = dataplane(request).unloaded()
    latest = registry.latest()
    refused = registry.refused()
    out = []
    for name in sorted(set(registry.store.models()) | set(latest)):
        serving = latest.get(name)
        if serving is not None and name not in unloaded:
            entry = {"name": name, "version": str(serving.model.version), "state": "READY", "reason": ""}
        else:
            why = "unloaded" if name in unloaded else "; ".join(
                f"v{k.rsplit('/', 1)[1]}: {r}" for k, r in refused.items() if k.split("/", 1)[0] == name)
            version = str(serving.model.version) if serving is not None else ""
            entry = {"name": name, "version": version, "state": "UNAVAILABLE", "reason": why or "not loaded"}
        if not req.ready or entry["state"] == "READY":
            out.append(entry)
    return json_response(out)


@router.post("/repository/models/{name}/load", summary="Load (or reload) a model", **REPOSITORY_DOC)
async def repository_load(request: Request, name: str) -> Response:
    await _small_json(request)
    serving = await dataplane(request).load(name)
    request.state.model, request.state.version = serving.model.name, str(serving.model.version)
    return json_response({})


@router.post("/repository/models/{name}/unload", summary="Stop serving a model", **REPOSITORY_DOC)
async def repository_unload(request: Request, name: str) -> Response:
    await _small_json(request)
    await dataplane(request).unload(name)
    return json_response({})
