"""The JSON API: /predict, /explain (default model, or per model and version), model listing,
admin reload, health. A thin adapter over `service.dataplane`: it decodes a body to arrays once
(JSON, or a binary body: .npy, .npz or raw float32), and encodes the answer once (JSON or npz).
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import anyio.to_thread
import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from model_store import ManifestError
from service.dataplane import (
    API_PARAMETERS,
    BINARY_BYTES_PER_NUMBER,
    JSON_BYTES_PER_NUMBER,
    DataPlane,
    Explained,
    explain_options,
    prediction,
    refuse_non_finite,
)
from service import metrics
from service.dataplane import cost as _cost  # noqa: F401  (tests price through it)
from service.errors import InvalidInput, NotReady
from service.inputs import NPZ, OCTET_STREAM, body_kind, decode_binary, read_json, validate
from service.media import JSON, body_schema, json_response, negotiate
from service.registry import Serving
from service.schemas import (
    ERRORS,
    GRADIENT_METHODS,
    ErrorBody,
    ExplainOptions,
    ExplainRequest,
    ExplainResponse,
    PredictRequest,
    PredictResponse,
)
from service.security import require_admin, require_api_key

router = APIRouter()

BINARY_BODIES = ("Binary bodies are accepted too (see README): `application/x-npy` (a [B, T, N] array), "
                 "`application/x-npz` (array `inputs`) or `application/octet-stream` (raw little-endian "
                 "float32 with `X-Shape: B,T,N`)")


def _state(request: Request):
    return request.app.state


def dataplane(request: Request) -> DataPlane:
    return _state(request).dataplane


async def serving_for(request: Request, name: str | None, version: str | None) -> Serving:
    """The model version that answers, recorded on the request for metrics and logs."""
    serving = await dataplane(request).model(name, version)
    request.state.model = serving.model.name
    request.state.version = str(serving.model.version)
    return serving


async def _binary_sequences(request: Request, serving: Serving, kind: str) -> list[np.ndarray]:
    """A binary body's sequences: decoded without JSON (npz decompressed in a thread), then the
    same checks as JSON inputs (count, lengths, features, finite float32, range)."""
    body = await request.body()
    settings = _state(request).settings
    shape = request.headers.get("x-shape")
    if kind == NPZ:
        arr = await anyio.to_thread.run_sync(decode_binary, body, kind, shape, settings.max_body_bytes)
    else:
        arr = decode_binary(body, kind, shape, settings.max_body_bytes)
    return dataplane(request).batch(serving.model, arr)


# -- predict -------------------------------------------------------------------------------------

PREDICT_DOC = dict(
    response_model=PredictResponse,
    responses=ERRORS,
    description=BINARY_BODIES + ".",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": body_schema(PredictRequest),
    }}}},
    dependencies=[Depends(require_api_key)],
)


async def _predict(request: Request, name: str | None, version: str | None) -> Response:
    serving = await serving_for(request, name, version)
    t0 = time.perf_counter()
    plane = dataplane(request)
    kind = body_kind(request.headers.get("content-type"))
    if kind is not None:
        seqs = await _binary_sequences(request, serving, kind)
    else:
        data = await read_json(request, serving.model.manifest, inputs_as_arrays=True)
        _, raw = validate(PredictRequest, data)
        seqs = plane.sequences(serving.model, raw.get("inputs"))
    request.state.timings["parse_s"] = time.perf_counter() - t0
    result = await plane.predict(serving, seqs, timings=request.state.timings)
    return json_response({"model": serving.model.name, "version": serving.model.version,
                          "predictions": result.as_dicts()})


@router.post("/predict", summary="Class scores from the default model", **PREDICT_DOC)
async def predict_default(request: Request) -> Response:
    return await _predict(request, None, None)


@router.post("/models/{name}/predict", summary="Class scores from a model's latest version", **PREDICT_DOC)
async def predict_model(request: Request, name: str) -> Response:
    return await _predict(request, name, None)


@router.post("/models/{name}/versions/{version}/predict", summary="Class scores from one model version",
             **PREDICT_DOC)
async def predict_version(request: Request, name: str, version: str) -> Response:
    return await _predict(request, name, version)


# -- explain -------------------------------------------------------------------------------------

EXPLAIN_DOC = dict(
    response_model=ExplainResponse,
    responses={**ERRORS, 200: {"content": {NPZ: {}}, "description": "JSON, or with `Accept: application/x-npz` "
                                "a NumPy .npz archive (see README)"}},
    description=BINARY_BODIES + "; with one, `method`, `target`, `absolute`, `normalize`, `attention` and the "
    "method parameters (`steps`, `window=3,2`, ..., or `parameters` as a JSON object) are query parameters.",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": body_schema(ExplainRequest),
    }}}},
    dependencies=[Depends(require_api_key)],
)


def _query_value(value: str) -> Any:
    """A query parameter's value: JSON when it parses as JSON (`16`, `0.3`, `true`, `["up", 0]`),
    a comma list of such values (`3,2`), else the string itself (`zeros`, `up`)."""
    try:
        return json.loads(value)
    except ValueError:
        pass
    if "," in value:
        return [_query_value(v.strip()) for v in value.split(",")]
    return value


def query_options(request: Request) -> ExplainOptions:
    """The explanation's options from the query string (for binary bodies), checked as a JSON
    body's would be: an unknown key is a 422 naming it."""
    data: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for key, value in request.query_params.multi_items():
        if key in ("method", "normalize", "absolute", "attention"):
            data[key] = value
        elif key == "target":
            data[key] = value if value in ("all", "predicted") else _query_value(value)
        elif key == "parameters":
            given = _query_value(value)
            if not isinstance(given, dict):
                raise InvalidInput("parameters: must be a JSON object", field="parameters")
            params.update(given)
        elif key in API_PARAMETERS:
            params[key] = _query_value(value) if key != "base_method" else value
        else:
            raise InvalidInput(f"{key}: not a query parameter of /explain (it takes method, target, absolute, "
                               f"normalize, attention, parameters and {sorted(API_PARAMETERS)})", field=key)
    if params:
        data["parameters"] = params
    return explain_options(data)


def wants_npz(request: Request) -> bool:
    """Accept negotiated with q-values (`application/x-npz;q=0` is a refusal); JSON on a tie."""
    return negotiate(request.headers.get("accept"), (JSON, NPZ)) == NPZ


async def _explain(request: Request, name: str | None, version: str | None) -> Response:
    serving = await serving_for(request, name, version)
    t0 = time.perf_counter()
    plane = dataplane(request)
    kind = body_kind(request.headers.get("content-type"))
    options: ExplainOptions
    if kind is not None:
        options = query_options(request)
        seqs = await _binary_sequences(request, serving, kind)
    else:
        data = await read_json(request, serving.model.manifest, inputs_as_arrays=True)
        options, raw = validate(ExplainRequest, data)
        seqs = plane.sequences(serving.model, raw.get("inputs"))
    request.state.timings["parse_s"] = time.perf_counter() - t0
    request.state.method = options.method
    npz = wants_npz(request)
    result = await plane.explain(serving, seqs, options,
                                 bytes_per_number=BINARY_BYTES_PER_NUMBER if npz else JSON_BYTES_PER_NUMBER,
                                 timings=request.state.timings)
    if npz:
        return _npz(result)
    return json_response({"model": serving.model.name, "version": serving.model.version, "method": options.method,
                          "explanations": result.as_dicts()})


def _npz(result: Explained) -> Response:
    """Compact binary answer: float32 arrays per sequence i (saliency_i: K x T x N as returned,
    logits_i, targets_i, attention_i) and `meta` (UTF-8 JSON bytes)."""
    arrays: dict[str, np.ndarray] = {}
    for i, (e, sal) in enumerate(zip(result.explanations, result.saliency)):
        arrays[f"saliency_{i}"] = sal
        arrays[f"logits_{i}"] = e.logits.astype(np.float32)
        arrays[f"targets_{i}"] = np.asarray(e.targets, dtype=np.int64)
        if e.attention is not None:
            arrays[f"attention_{i}"] = e.attention.astype(np.float32)
    m = result.model
    meta = {"model": m.name, "version": m.version, "method": result.method, "class_names": m.class_names,
            "sequences": len(result.explanations)}
    arrays["meta"] = np.frombuffer(orjson.dumps(meta), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return Response(buf.getvalue(), media_type=NPZ)


@router.post("/explain", summary="Saliency from the default model", **EXPLAIN_DOC)
async def explain_default(request: Request) -> Response:
    return await _explain(request, None, None)


@router.post("/models/{name}/explain", summary="Saliency from a model's latest version", **EXPLAIN_DOC)
async def explain_model(request: Request, name: str) -> Response:
    return await _explain(request, name, None)


@router.post("/models/{name}/versions/{version}/explain", summary="Saliency from one model version",
             **EXPLAIN_DOC)
async def explain_version(request: Request, name: str, version: str) -> Response:
    return await _explain(request, name, version)


# -- models, admin, health -----------------------------------------------------------------------

def _model_view(request: Request, name: str) -> dict[str, Any]:
    registry = _state(request).registry
    store = registry.store
    serving = registry.latest().get(name)
    manifest = None
    if serving is not None:
        manifest = serving.model.manifest.model_dump()
    else:  # none of its versions loads: list it with its refusals rather than fail the listing
        try:
            manifest = store.manifest(name).model_dump()
        except ManifestError:
            pass
    if manifest is not None and manifest.get("explanation_quality") is None:
        manifest.pop("explanation_quality", None)  # older manifests have none: omitted, not null
    return {"name": name, "versions": store.versions(name),
            "serving_version": serving.model.version if serving else None,
            "default": name == registry.default_name, "manifest": manifest,
            "refused": {key.rsplit("/", 1)[1]: why for key, why in registry.refused(name).items()}}


@router.get("/models", summary="Models in the store, with their manifests",
            dependencies=[Depends(require_api_key)], responses=ERRORS)
async def list_models(request: Request) -> Response:
    registry = _state(request).registry
    await registry.follow_reloads()  # with several workers: what this worker serves after a reload
    names = sorted(set(registry.store.models()) | set(registry.latest()))
    return json_response({"default": registry.default_name, "models": [_model_view(request, n) for n in names],
                          "worker_pid": os.getpid()})


@router.get("/models/{name}", summary="One model: versions and latest manifest",
            dependencies=[Depends(require_api_key)], responses=ERRORS)
async def get_model(request: Request, name: str) -> Response:
    registry = _state(request).registry
    await registry.follow_reloads()
    if name not in registry.latest():
        registry.store.resolve(name, "latest")  # 404 when absent
    return json_response(_model_view(request, name))


@router.post("/admin/reload", summary="Load newly published versions now, in every worker",
             dependencies=[Depends(require_admin)],
             responses={**ERRORS, 403: {"model": ErrorBody}})  # 403: the admin API is disabled
async def reload_models(request: Request) -> Response:
    """Refused versions are tried again too. With several workers, this one reloads before it
    answers and the others before they route their next request (service/registry.py)."""
    registry = _state(request).registry
    serving = await registry.reload()
    return json_response({"serving": serving, "refused": registry.refused(), "worker_pid": os.getpid()})


@router.get("/healthz", summary="Liveness")
async def healthz() -> Response:
    return json_response({"status": "alive"})


@router.get("/readyz", summary="Readiness: the default model is loaded and warmed up")
async def readyz(request: Request) -> Response:
    registry = _state(request).registry
    ready = registry.ready() and not _state(request).shutting_down
    body = {"ready": ready, "default_model": registry.default_name,
            "loaded": [f"{m.name}/{m.version}" for m in registry.loaded()],
            "store_readable": registry.store_readable}
    if not ready:
        raise NotReady("not ready: " + ("shutting down" if _state(request).shutting_down else
                                        "the default model is not loaded"))
    return json_response(body)


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics_endpoint() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


__all__ = ["router", "body_schema", "json_response", "prediction", "refuse_non_finite", "serving_for", "dataplane",
           "GRADIENT_METHODS", "OCTET_STREAM"]
