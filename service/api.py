"""The JSON API: /predict, /explain (default model, or per model and version), model listing,
admin reload, health. Handlers translate wire formats and nothing else; the compute lives in
`service.runtime`, the queues in `service.batching`.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel

import attribution
from service import metrics
from service.batching import Expired, QueueFull
from service.errors import DeadlineExceeded, InvalidInput, NotReady, Overloaded, TooExpensive
from service.inputs import matrix, parse_json, resolve_targets, sequences, validate
from service.registry import Serving
from service.runtime import Explanation, ExplainSpec
from service.schemas import (
    GRADIENT_METHODS,
    ErrorBody,
    METHOD_PARAMETERS,
    ExplainRequest,
    ExplainResponse,
    PredictRequest,
    PredictResponse,
)
from service.security import require_admin, require_api_key

NPZ = "application/x-npz"
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422, 503, 504)}

router = APIRouter()


def _fallback(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):  # orjson serialises only C-contiguous arrays natively
        return np.ascontiguousarray(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data, default=_fallback, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A request body's JSON schema for the OpenAPI document, self-contained: nested models are
    inlined, since FastAPI does not move a hand-written body schema's `$defs` into the document's
    components (a `$ref` to them would dangle, and clients generated from it would break)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return {**inline(defs[ref.removeprefix("#/$defs/")]), **inline(rest)}
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def _state(request: Request):
    return request.app.state


async def submit(request: Request, batcher, seqs, specs) -> list[Any]:
    settings = _state(request).settings
    try:
        return await batcher.submit(seqs, specs, settings.request_timeout_s, request.state.timings)
    except QueueFull:
        raise Overloaded(f"the {batcher.name} queue is full; retry shortly",
                         headers={"Retry-After": str(settings.retry_after_s)}) from None
    except Expired:
        raise DeadlineExceeded(f"not answered within {settings.request_timeout_s} s") from None


def prediction(logits: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    k = int(np.argmax(z))
    return {"label": class_names[k], "class_index": k,
            "probabilities": {c: float(v) for c, v in zip(class_names, p)}, "logits": logits.tolist()}


async def _serving(request: Request, name: str | None, version: str | None) -> Serving:
    serving = await _state(request).registry.get(name, version)
    request.state.model = serving.model.name
    request.state.version = str(serving.model.version)
    return serving


# -- predict -------------------------------------------------------------------------------------

PREDICT_DOC = dict(
    response_model=PredictResponse,
    responses=ERRORS,
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": body_schema(PredictRequest),
    }}}},
    dependencies=[Depends(require_api_key)],
)


async def _predict(request: Request, name: str | None, version: str | None) -> Response:
    serving = await _serving(request, name, version)
    t0 = time.perf_counter()
    data = parse_json(await request.body(), request.headers.get("content-type"))
    _, raw = validate(PredictRequest, data)
    seqs = sequences(raw.get("inputs"), serving.model.manifest, _state(request).settings.max_sequences)
    request.state.timings["parse_s"] = time.perf_counter() - t0
    logits = await submit(request, serving.predict, seqs, None)
    names = serving.model.class_names
    return json_response({"model": serving.model.name, "version": serving.model.version,
                          "predictions": [prediction(z, names) for z in logits]})


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
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": body_schema(ExplainRequest),
    }}}},
    dependencies=[Depends(require_api_key)],
)


def _method_params(req: ExplainRequest, seqs: list[np.ndarray], serving: Serving, settings) -> dict[str, Any]:
    """The attribution keyword arguments for this request, checked against the method and limits."""
    given = req.parameters.model_dump(exclude_none=True)
    allowed = set(METHOD_PARAMETERS[req.method])
    if req.method == "tsr":
        base = given.get("base_method", "gradient")
        allowed = {"base_method", "threshold_quantile", "feature_default", "baseline"} | METHOD_PARAMETERS[base]
    for key in given:
        if key not in allowed:
            raise InvalidInput(f"parameters.{key}: not a parameter of method {req.method!r} "
                               f"(it takes: {sorted(allowed) or 'none'})", field=f"parameters.{key}")
    if given.get("steps", 0) > settings.max_ig_steps:
        raise TooExpensive(f"parameters.steps: at most {settings.max_ig_steps}", field="parameters.steps")
    if given.get("samples", 0) > settings.max_smoothgrad_samples:
        raise TooExpensive(f"parameters.samples: at most {settings.max_smoothgrad_samples}",
                           field="parameters.samples")
    manifest = serving.model.manifest
    if "baseline" in allowed:
        b = given.get("baseline", "mean")
        if b == "mean":
            given["baseline"] = np.asarray(manifest.normalization.mean, dtype=np.float32)
        elif b == "zeros":
            given["baseline"] = 0.0
        else:
            lengths = {len(s) for s in seqs}
            if len(lengths) != 1:
                raise InvalidInput("parameters.baseline: a given baseline needs all sequences of one length",
                                   field="parameters.baseline")
            given["baseline"] = matrix(b, "parameters.baseline", manifest.input.n_features, lengths.pop(),
                                       manifest.input.max_length)
    for key in ("window", "stride"):
        if key in given:
            given[key] = tuple(given[key])
    return given


def _cost(method: str, params: dict[str, Any], seqs: list[np.ndarray], n_features: int, n_targets: int) -> int:
    """Work of the request in sample-time-step evaluations; refused up front above the limit."""
    p = {k: v for k, v in params.items() if k != "baseline"}
    total = 0
    for s in seqs:
        if method == "tsr":
            base = p.get("base_method", "gradient")
            rest = {k: v for k, v in p.items() if k not in ("base_method", "threshold_quantile", "feature_default")}
            per = attribution.tsr_cost(base, 1, len(s), n_features, n_targets, **rest)
        else:
            per = attribution.estimate_cost(method, 1, len(s), n_features, n_targets, **p)
        total += per * len(s)
    return total


def _postprocess(sal: np.ndarray, absolute: bool, normalize: str) -> np.ndarray:
    if absolute:
        sal = np.abs(sal)
    if normalize == "minmax":
        lo = sal.min(axis=(1, 2), keepdims=True)
        span = sal.max(axis=(1, 2), keepdims=True) - lo
        sal = (sal - lo) / np.where(span > 0, span, 1.0)
    elif normalize == "sum":
        total = np.abs(sal).sum(axis=(1, 2), keepdims=True)
        sal = sal / np.where(total > 0, total, 1.0)
    return np.ascontiguousarray(sal, dtype=np.float32)


async def _explain(request: Request, name: str | None, version: str | None) -> Response:
    serving = await _serving(request, name, version)
    settings = _state(request).settings
    t0 = time.perf_counter()
    data = parse_json(await request.body(), request.headers.get("content-type"))
    req, raw = validate(ExplainRequest, data)
    model = serving.model
    seqs = sequences(raw.get("inputs"), model.manifest, settings.max_sequences)
    targets, all_targets = resolve_targets(req.target, model.class_names)
    params = _method_params(req, seqs, serving, settings)
    spec = ExplainSpec(req.method, params, targets, all_targets, req.attention)
    try:
        cost = _cost(req.method, params, seqs, model.manifest.input.n_features,
                     spec.n_targets(len(model.class_names)))
    except ValueError as exc:  # parameters the method refuses for these inputs, e.g. an occlusion window
        raise InvalidInput(f"parameters: {exc}", field="parameters") from None
    if cost > settings.max_explain_cost:
        raise TooExpensive(
            f"this explanation would cost {cost:,} sample-step evaluations, above the limit of "
            f"{settings.max_explain_cost:,}; send fewer or shorter sequences, fewer targets or fewer steps",
            field="inputs")
    if req.attention and not model.has_attention:
        raise InvalidInput("attention: this model has no input-cell attention", field="attention")
    request.state.timings["parse_s"] = time.perf_counter() - t0
    request.state.method = req.method
    specs = [spec] * len(seqs)  # read-only to the batcher
    results: list[Explanation] = await submit(request, serving.explain, seqs, specs)
    metrics.EXPLANATIONS.labels(req.method).inc(len(seqs))
    names = model.class_names
    if NPZ in request.headers.get("accept", ""):
        return _npz(model.name, model.version, req.method, results, names, req)
    out = []
    for e in results:
        sal = _postprocess(e.saliency, req.absolute, req.normalize)
        out.append({
            "prediction": prediction(e.logits, names),
            "attributions": [
                {"target": names[t], "target_index": t, "saliency": sal[k],
                 "time_profile": sal[k].sum(axis=1), "feature_profile": sal[k].sum(axis=0)}
                for k, t in enumerate(e.targets)
            ],
            "attention": e.attention,
        })
    return json_response({"model": model.name, "version": model.version, "method": req.method,
                          "explanations": out})


def _npz(name: str, version: int, method: str, results: list[Explanation], names: list[str],
         req: ExplainRequest) -> Response:
    """Compact binary answer: float32 arrays per sequence i (saliency_i: K x T x N, logits_i,
    targets_i, attention_i) and `meta` (UTF-8 JSON bytes)."""
    arrays: dict[str, np.ndarray] = {}
    for i, e in enumerate(results):
        arrays[f"saliency_{i}"] = _postprocess(e.saliency, req.absolute, req.normalize)
        arrays[f"logits_{i}"] = e.logits.astype(np.float32)
        arrays[f"targets_{i}"] = np.asarray(e.targets, dtype=np.int64)
        if e.attention is not None:
            arrays[f"attention_{i}"] = e.attention.astype(np.float32)
    meta = {"model": name, "version": version, "method": method, "class_names": names, "sequences": len(results)}
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
    manifest = serving.model.manifest if serving else store.manifest(name)
    return {"name": name, "versions": store.versions(name),
            "serving_version": serving.model.version if serving else None,
            "default": name == registry.default_name, "manifest": manifest.model_dump()}


@router.get("/models", summary="Models in the store, with their manifests",
            dependencies=[Depends(require_api_key)], responses=ERRORS)
async def list_models(request: Request) -> Response:
    registry = _state(request).registry
    names = sorted(set(registry.store.models()) | set(registry.latest()))
    return json_response({"default": registry.default_name, "models": [_model_view(request, n) for n in names]})


@router.get("/models/{name}", summary="One model: versions and latest manifest",
            dependencies=[Depends(require_api_key)], responses=ERRORS)
async def get_model(request: Request, name: str) -> Response:
    registry = _state(request).registry
    if name not in registry.latest():
        registry.store.resolve(name, "latest")  # 404 when absent
    return json_response(_model_view(request, name))


@router.post("/admin/reload", summary="Load newly published versions now", dependencies=[Depends(require_admin)],
             responses={**ERRORS, 403: {"model": ErrorBody}})  # 403: the admin API is disabled
async def reload_models(request: Request) -> Response:
    registry = _state(request).registry
    serving = await registry.refresh()
    return json_response({"serving": serving, "refused": registry.refused()})


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


__all__ = ["router", "body_schema", "json_response", "prediction", "submit", "GRADIENT_METHODS"]
