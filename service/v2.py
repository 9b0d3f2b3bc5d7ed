"""Open Inference Protocol (KServe V2) over the same models and the same predict batcher, so
clients written for KServe or Triton work unchanged. Errors are `{"error": "..."}` (plus our
usual `code`, `field` and `request_id`, which such clients ignore).

Input: one tensor of shape [B, T, N] (`data` flat in row-major order, or nested), FP32 in the
metadata; FP64 and FP16 (numbers, rounded to the declared precision) and INT32 / INT64 (integers
only, in the type's range) are accepted too, and the declared datatype is honoured: a value it
cannot hold is a 422 naming the input. Output: `probabilities` [B, C] (FP32) and `logits` [B, C];
an unknown requested output is refused before any compute, and a non-finite output is never
returned (422 out_of_range).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from service.api import ERRORS, body_schema, json_response, refuse_non_finite, submit
from service.errors import InvalidInput, NotReady
from service.inputs import read_json, sequences, validate
from service.security import require_api_key

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])


class V2Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: Literal["FP32", "FP64", "FP16", "INT32", "INT64"]
    data: list[Any] = Field(..., description="row-major values, flat or nested")
    parameters: dict[str, Any] | None = None


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [0.1, -0.3, 1.2, 0.0, 0.5, -1.1]}]
    }]})
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor] = Field(..., min_length=1, max_length=1)
    outputs: list[V2RequestedOutput] | None = None


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("icaserve")
    except PackageNotFoundError:
        v = "unknown"
    return json_response({"name": "icaserve", "version": v, "extensions": []})


@router.get("/health/live", summary="Server liveness")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready", summary="Server readiness")
async def ready(request: Request) -> Response:
    if not request.app.state.registry.ready() or request.app.state.shutting_down:
        raise NotReady("server not ready")
    return json_response({"ready": True})


def _metadata(serving) -> dict[str, Any]:
    m = serving.model
    return {
        "name": m.name,
        "versions": [str(m.version)],
        "platform": "pytorch_torchscript" if m.backend == "torch" else "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1, m.manifest.input.n_features]}],
        "outputs": [{"name": o, "datatype": "FP32", "shape": [-1, len(m.class_names)]} for o in OUTPUTS],
        "parameters": {"class_names": m.class_names, "feature_names": m.manifest.input.feature_names},
    }


async def _get(request: Request, name: str, version: str | None):
    serving = await request.app.state.registry.get(name, version)
    request.state.model, request.state.version = serving.model.name, str(serving.model.version)
    return serving


@router.get("/models/{name}", summary="Model metadata", dependencies=[Depends(require_api_key)], responses=ERRORS)
async def model_metadata(request: Request, name: str) -> Response:
    serving = await _get(request, name, None)
    meta = _metadata(serving)
    meta["versions"] = [str(v) for v in request.app.state.registry.store.versions(name)]
    return json_response(meta)


@router.get("/models/{name}/versions/{version}", summary="Model version metadata",
            dependencies=[Depends(require_api_key)], responses=ERRORS)
async def version_metadata(request: Request, name: str, version: str) -> Response:
    return json_response(_metadata(await _get(request, name, version)))


@router.get("/models/{name}/ready", summary="Model readiness", dependencies=[Depends(require_api_key)],
            responses=ERRORS)
async def model_ready(request: Request, name: str) -> Response:
    await _get(request, name, None)
    return json_response({"name": name, "ready": True})


@router.get("/models/{name}/versions/{version}/ready", summary="Model version readiness",
            dependencies=[Depends(require_api_key)], responses=ERRORS)
async def version_ready(request: Request, name: str, version: str) -> Response:
    await _get(request, name, version)
    return json_response({"name": name, "version": version, "ready": True})


INFER_DOC = dict(
    dependencies=[Depends(require_api_key)],
    responses=ERRORS,
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": body_schema(V2InferRequest)}}}},
)


OUTPUTS = ("probabilities", "logits")
INT_RANGES = {"INT32": (-(2 ** 31), 2 ** 31 - 1), "INT64": (-(2 ** 63), 2 ** 63 - 1)}


def _values(tensor: V2Tensor, field: str = "inputs[0].data") -> np.ndarray:
    """The tensor's values, flat, as float64, checked against its declared datatype: FP32 / FP64
    / FP16 take numbers (FP16 rounded to half precision, refused beyond its range), INT32 /
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


async def _infer(request: Request, name: str, version: str | None) -> Response:
    serving = await _get(request, name, version)
    settings = request.app.state.settings
    # Triton and KServe clients often send no Content-Type: accepted here (not on the JSON API)
    data = await read_json(request, serving.model.manifest, media_type_required=False)
    req, raw = validate(V2InferRequest, data, tensors=())
    wanted = [o.name for o in req.outputs] if req.outputs else ["probabilities"]
    for i, w in enumerate(wanted):  # before any compute
        if w not in OUTPUTS:
            raise InvalidInput(f"outputs[{i}].name: unknown output {w!r} (this model has {sorted(OUTPUTS)})",
                               field=f"outputs[{i}].name")
    tensor = req.inputs[0]
    n = serving.model.manifest.input.n_features
    if len(tensor.shape) != 3 or tensor.shape[2] != n or min(tensor.shape) < 1:
        raise InvalidInput(f"inputs[0].shape: expected [B, T, {n}], got {tensor.shape}", field="inputs[0].shape")
    flat = _values(tensor)
    b, t, _ = tensor.shape
    if flat.size != b * t * n:
        raise InvalidInput(f"inputs[0].data: {flat.size} values for shape {tensor.shape} ({b * t * n} expected)",
                           field="inputs[0].data")
    arr = flat.reshape(b, t, n).tolist()
    seqs = sequences(arr, serving.model.manifest, settings.max_sequences, field="inputs[0].data",
                     max_sigma=settings.max_input_sigma)
    logits = np.stack(await submit(request, serving.predict, seqs, None)).astype(np.float64)
    for i, z in enumerate(logits):
        refuse_non_finite(z, f"inputs[0].data[{i}]", "the model's output")
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    values = {"probabilities": probs, "logits": logits}  # one entry per name in OUTPUTS
    body: dict[str, Any] = {"model_name": serving.model.name, "model_version": str(serving.model.version),
                            "outputs": [{"name": w, "datatype": "FP32", "shape": list(probs.shape),
                                         "data": values[w].astype(np.float32).reshape(-1)} for w in wanted]}
    if req.id is not None:
        body["id"] = req.id
    return json_response(body)


@router.post("/models/{name}/infer", summary="Inference (latest version)", **INFER_DOC)
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference (one version)", **INFER_DOC)
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)
