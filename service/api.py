"""The JSON API: /predict, /explain (default model, or per model and version), model listing,
admin reload, health. Handlers translate wire formats and nothing else; the compute lives in
`service.runtime`, the queues in `service.batching`.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import orjson
import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel

import attribution
from model_store import ManifestError
from service import metrics
from service.batching import Expired, QueueFull
from service.errors import DeadlineExceeded, InvalidInput, NotReady, Overloaded, TooExpensive
from service.inputs import OutOfRange, matrix, read_json, resolve_targets, sequences, validate, within_range
from service.media import JSON, negotiate
from service.registry import Serving
from service.runtime import Explanation, ExplainSpec, LoadedModel
from service.schemas import (
    GRADIENT_METHODS,
    ErrorBody,
    ExplainParameters,
    ExplainRequest,
    ExplainResponse,
    PredictRequest,
    PredictResponse,
)
from service.security import require_admin, require_api_key

NPZ = "application/x-npz"
# Bytes per number of an /explain answer, for the response-size estimate made before compute:
# JSON writes float32 values as their shortest text ("-1.2345678e-38," is 15 bytes; typical
# values take ~10), npz stores 4 bytes each.
JSON_BYTES_PER_NUMBER = 16
NPZ_BYTES_PER_NUMBER = 4
# The explain parameters a client can send (attribution methods take more, e.g. internal_batch_size).
API_PARAMETERS = frozenset(ExplainParameters.model_fields)
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


def refuse_non_finite(values: np.ndarray, field: str, what: str) -> None:
    """A non-finite model output or saliency is never a success: 422 out_of_range naming the
    field whose values took the model's float32 arithmetic out of range."""
    if not np.isfinite(values).all():
        raise OutOfRange(f"{field}: {what} is not finite: the values are out of the range the model can handle "
                         "(send values nearer the training data's range)", field=field)


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
    data = await read_json(request, serving.model.manifest)
    _, raw = validate(PredictRequest, data)
    settings = _state(request).settings
    seqs = sequences(raw.get("inputs"), serving.model.manifest, settings.max_sequences,
                     max_sigma=settings.max_input_sigma)
    request.state.timings["parse_s"] = time.perf_counter() - t0
    logits = await submit(request, serving.predict, seqs, None)
    for i, z in enumerate(logits):
        refuse_non_finite(z, f"inputs[{i}]", "the model's output")
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
    """The attribution keyword arguments for this request, checked against the method and limits.
    What a method accepts comes from its registration in `attribution.METHODS` (TSR: its own
    parameters and its base method's), limited to the parameters the API exposes."""
    given = req.parameters.model_dump(exclude_none=True)
    try:
        allowed = set(attribution.resolve_method(req.method).accepted(given)) & API_PARAMETERS
    except ValueError as exc:  # a bad base_method (the schema already limits it)
        raise InvalidInput(f"parameters.base_method: {exc}", field="parameters.base_method") from None
    for key in given:
        if key not in allowed:
            raise InvalidInput(f"parameters.{key}: not a parameter of method {req.method!r} "
                               f"(it takes: {sorted(allowed) or 'none'})", field=f"parameters.{key}")
    if given.get("steps", 0) > settings.max_ig_steps:
        raise TooExpensive(f"parameters.steps: at most {settings.max_ig_steps}", field="parameters.steps")
    if given.get("samples", 0) > settings.max_smoothgrad_samples:
        raise TooExpensive(f"parameters.samples: at most {settings.max_smoothgrad_samples}",
                           field="parameters.samples")
    if given.get("noise", 0.0) > settings.max_smoothgrad_noise:
        raise OutOfRange(f"parameters.noise: {given['noise']:g} standard deviations is out of range; at most "
                         f"{settings.max_smoothgrad_noise:g} (setting max_smoothgrad_noise)", field="parameters.noise")
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
            length = lengths.pop()
            given["baseline"] = within_range(
                matrix(b, "parameters.baseline", manifest.input.n_features, length, manifest.input.max_length),
                manifest, settings.max_input_sigma, "parameters.baseline")
    for key in ("window", "stride"):
        if key in given:
            given[key] = tuple(given[key])
    return given


def _cost(method: str, params: dict[str, Any], seqs: list[np.ndarray], n_features: int, n_targets: int) -> int:
    """Work of the request in sample-step evaluations (time steps x forward-equivalents, summed
    over sequences). Every parameter reaches `attribution.estimate_cost`, which prices each method
    (TSR included) from all the parameters that change its work; priced once per length."""
    p = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in params.items()}
    return sum(count * length * attribution.estimate_cost(method, 1, length, n_features, n_targets, **p)
               for length, count in Counter(len(s) for s in seqs).items())


def _wants_npz(request: Request) -> bool:
    """Accept negotiated with q-values (`application/x-npz;q=0` is a refusal); JSON on a tie."""
    return negotiate(request.headers.get("accept"), (JSON, NPZ)) == NPZ


def _price(request: Request, req: ExplainRequest, params: dict[str, Any], seqs: list[np.ndarray],
           model: LoadedModel, n_targets: int, settings) -> None:
    """Refuse, before any compute, an explanation whose work or answer is too large: the work
    (`max_explain_cost`) and the answer's estimated size (`max_response_bytes`), each first
    without the T x T attention weights (too large: field `inputs`), then with them (`attention`)."""
    n_features = model.manifest.input.n_features
    try:
        cost = _cost(req.method, params, seqs, n_features, n_targets)
    except ValueError as exc:  # parameters the method refuses for these inputs, e.g. an occlusion window
        raise InvalidInput(f"parameters: {exc}", field="parameters") from None
    limit = settings.max_explain_cost
    if cost > limit:
        raise TooExpensive(
            f"this explanation would cost {cost:,} sample-step evaluations, above the limit of "
            f"{limit:,}; send fewer or shorter sequences, fewer targets or fewer steps", field="inputs")
    if req.attention:
        with_attention = cost + sum(len(s) * model.attention_cost(len(s)) for s in seqs)
        if with_attention > limit:
            raise TooExpensive(
                f"with its T x T attention weights this explanation would cost {with_attention:,} sample-step "
                f"evaluations, above the limit of {limit:,}; leave out attention or send fewer or shorter "
                "sequences", field="attention")
    per_number = NPZ_BYTES_PER_NUMBER if _wants_npz(request) else JSON_BYTES_PER_NUMBER
    n_classes = len(model.class_names)
    # per sequence: K saliency matrices T x N with their time (T) and feature (N) profiles, logits
    # and probabilities; attention: T x T
    numbers = sum(n_targets * (len(s) * n_features + len(s) + n_features) + 2 * n_classes for s in seqs)
    size = numbers * per_number
    cap = settings.max_response_bytes
    if size > cap:
        raise TooExpensive(
            f"the answer would be about {size:,} bytes, above the limit of {cap:,}; send fewer or shorter "
            "sequences or fewer targets (or ask for Accept: application/x-npz, 4 bytes a number)", field="inputs")
    if req.attention:
        size += sum(len(s) ** 2 for s in seqs) * per_number
        if size > cap:
            raise TooExpensive(
                f"with its T x T attention weights the answer would be about {size:,} bytes, above the limit of "
                f"{cap:,}; leave out attention or send fewer or shorter sequences", field="attention")


def _checked(results: list[Explanation], req: ExplainRequest
             ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(saliency as returned, time profiles, feature profiles) per sequence, after making sure
    that every number of the answer is finite: a non-finite logit, saliency, profile or attention
    weight is a 422 out_of_range naming the sequence (or, for saliency of finite logits, the
    perturbation parameter the client gave, when it gave one), never a 200 with nulls."""
    given = req.parameters.model_dump(exclude_none=True)
    suspects = [f"parameters.{k}" for k in ("noise", "baseline")
                if k in given and (k != "baseline" or isinstance(given[k], list))]
    out = []
    for i, e in enumerate(results):
        refuse_non_finite(e.logits, f"inputs[{i}]", "the model's output")
        if e.attention is not None:
            refuse_non_finite(e.attention, f"inputs[{i}]", "the attention weights")
        sal = _postprocess(e.saliency, req.absolute, req.normalize)
        # summed in float64, returned as float32 (as the saliency): an overflow shows as inf
        time_profiles = sal.sum(axis=2, dtype=np.float64).astype(np.float32)
        feature_profiles = sal.sum(axis=1, dtype=np.float64).astype(np.float32)
        for values in (sal, time_profiles, feature_profiles):
            field = suspects[0] if suspects else f"inputs[{i}]"
            refuse_non_finite(values, field, f"the saliency of inputs[{i}]")
        out.append((sal, time_profiles, feature_profiles))
    return out


def _postprocess(sal: np.ndarray, absolute: bool, normalize: str) -> np.ndarray:
    """The saliency as returned (float32); scaled in float64, so a large but finite saliency
    cannot overflow in the scaling."""
    sal = sal.astype(np.float64)
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
    data = await read_json(request, serving.model.manifest)
    req, raw = validate(ExplainRequest, data)
    model = serving.model
    seqs = sequences(raw.get("inputs"), model.manifest, settings.max_sequences, max_sigma=settings.max_input_sigma)
    targets, all_targets = resolve_targets(req.target, model.class_names)
    if req.attention and not model.has_attention:
        raise InvalidInput("attention: this model has no input-cell attention", field="attention")
    params = _method_params(req, seqs, serving, settings)
    spec = ExplainSpec(req.method, params, targets, all_targets, req.attention)
    _price(request, req, params, seqs, model, spec.n_targets(len(model.class_names)), settings)
    request.state.timings["parse_s"] = time.perf_counter() - t0
    request.state.method = req.method
    # the same deadline as the batcher's (now + request_timeout_s): the compute stops there too
    spec = dataclasses.replace(spec, deadline=time.perf_counter() + settings.request_timeout_s)
    specs = [spec] * len(seqs)  # read-only to the batcher
    results: list[Explanation] = await submit(request, serving.explain, seqs, specs)
    processed = _checked(results, req)
    metrics.EXPLANATIONS.labels(req.method).inc(len(seqs))
    names = model.class_names
    if _wants_npz(request):
        return _npz(model.name, model.version, req.method, results, [sal for sal, _, _ in processed], names)
    out = []
    for e, (sal, time_profiles, feature_profiles) in zip(results, processed):
        out.append({
            "prediction": prediction(e.logits, names),
            "attributions": [
                {"target": names[t], "target_index": t, "saliency": sal[k],
                 "time_profile": time_profiles[k], "feature_profile": feature_profiles[k]}
                for k, t in enumerate(e.targets)
            ],
            "attention": e.attention,
        })
    return json_response({"model": model.name, "version": model.version, "method": req.method,
                          "explanations": out})


def _npz(name: str, version: int, method: str, results: list[Explanation], saliency: list[np.ndarray],
         names: list[str]) -> Response:
    """Compact binary answer: float32 arrays per sequence i (saliency_i: K x T x N as returned,
    logits_i, targets_i, attention_i) and `meta` (UTF-8 JSON bytes)."""
    arrays: dict[str, np.ndarray] = {}
    for i, (e, sal) in enumerate(zip(results, saliency)):
        arrays[f"saliency_{i}"] = sal
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
    manifest = None
    if serving is not None:
        manifest = serving.model.manifest.model_dump()
    else:  # none of its versions loads: list it with its refusals rather than fail the listing
        try:
            manifest = store.manifest(name).model_dump()
        except ManifestError:
            pass
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


__all__ = ["router", "body_schema", "json_response", "prediction", "submit", "GRADIENT_METHODS"]
