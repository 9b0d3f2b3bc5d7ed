"""KServe V1 protocol over the data plane, so a KServe InferenceService can route its verbs here:
`GET /v1/models/{name}` (ready state), `POST /v1/models/{name}:predict` (`{"instances": [...]}`,
each instance a T x N sequence -> `{"predictions": [...]}`, each as /predict writes one) and
`POST /v1/models/{name}:explain` (the same body plus /explain's `method`, `target`, `parameters`,
`absolute`, `normalize`, `attention` -> `{"explanations": [...]}`, each as /explain writes one).
Errors: the one error format; the inputs are named `instances`.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from service.api import dataplane, serving_for
from service.dataplane import explain_options
from service.errors import InvalidInput
from service.inputs import read_json
from service.media import body_schema, json_response
from service.schemas import ERRORS, EXAMPLE_SEQUENCE, ExplainOptions, Matrix
from service.security import require_api_key

router = APIRouter(prefix="/v1", tags=["KServe V1"])


class V1PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"instances": [EXAMPLE_SEQUENCE]}]})
    instances: list[Matrix] = Field(..., description="sequences, each T x N raw values")


class V1ExplainRequest(ExplainOptions):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"instances": [EXAMPLE_SEQUENCE], "method": "gradient", "target": "all"}]})
    instances: list[Matrix] = Field(..., description="sequences, each T x N raw values")


def _instances(data: Any, allowed: frozenset[str]) -> tuple[Any, dict[str, Any]]:
    """(the raw instances, the other fields) of a V1 body; unknown fields are refused by name."""
    if not isinstance(data, dict):
        raise InvalidInput(f"body must be a JSON object, got {type(data).__name__}", field="body")
    if "instances" not in data:
        raise InvalidInput("instances: missing (send {\"instances\": [sequence, ...]})", field="instances")
    rest = {k: v for k, v in data.items() if k != "instances"}
    for key in rest:
        if key not in allowed:
            raise InvalidInput(f"{key}: not a field of this request", field=key)
    return data["instances"], rest


@router.get("/models/{name}", summary="Model ready state", dependencies=[Depends(require_api_key)],
            responses=ERRORS)
async def model_ready(request: Request, name: str) -> Response:
    if name in dataplane(request).unloaded():
        await request.app.state.registry.get(name)  # 404 for what does not exist
        return json_response({"name": name, "ready": False})
    await serving_for(request, name, None)
    return json_response({"name": name, "ready": True})


@router.post("/models/{name}:predict", summary="Predict (KServe V1)", dependencies=[Depends(require_api_key)],
             responses=ERRORS, openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": body_schema(V1PredictRequest)}}}})
async def predict(request: Request, name: str) -> Response:
    serving = await serving_for(request, name, None)
    t0 = time.perf_counter()
    plane = dataplane(request)
    raw, _ = _instances(await read_json(request, serving.model.manifest), frozenset())
    seqs = plane.sequences(serving.model, raw, field="instances")
    request.state.timings["parse_s"] = time.perf_counter() - t0
    result = await plane.predict(serving, seqs, field="instances", timings=request.state.timings)
    return json_response({"predictions": result.as_dicts()})


@router.post("/models/{name}:explain", summary="Explain (KServe V1)", dependencies=[Depends(require_api_key)],
             responses=ERRORS, openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": body_schema(V1ExplainRequest)}}}})
async def explain(request: Request, name: str) -> Response:
    serving = await serving_for(request, name, None)
    t0 = time.perf_counter()
    plane = dataplane(request)
    raw, rest = _instances(await read_json(request, serving.model.manifest), frozenset(ExplainOptions.model_fields))
    options = explain_options(rest)
    seqs = plane.sequences(serving.model, raw, field="instances")
    request.state.timings["parse_s"] = time.perf_counter() - t0
    request.state.method = options.method
    result = await plane.explain(serving, seqs, options, field="instances", timings=request.state.timings)
    return json_response({"model": serving.model.name, "version": serving.model.version, "method": options.method,
                          "explanations": result.as_dicts()})
