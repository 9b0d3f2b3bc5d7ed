"""The FastAPI application: wiring of settings, registry, routes, errors and request context.

`create_app()` is also the uvicorn factory (`icaserve serve` runs `service.app:create_app`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator

import orjson
import torch
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from icaserve.tuning import tune_malloc
from service import api, errors, metrics, v2
from service.errors import PayloadTooLarge
from service.logs import REQUEST_ID, configure_logging
from service.registry import ModelRegistry
from service.runtime import pick_device
from service.settings import Settings

log = logging.getLogger("icaserve.access")
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    """Request id, body-size limit, in-flight gauge, request metrics and the access log line.

    A pure ASGI middleware, so the body limit also holds for chunked uploads: the byte count is
    checked as the body streams in, before it is all in memory.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID_OK.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        timings: dict[str, float] = {}
        scope["state"]["timings"] = timings
        token = REQUEST_ID.set(request_id)
        status = {"code": 500}
        start = time.perf_counter()
        declared = headers.get("content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_body
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise PayloadTooLarge(f"request body over {self.max_body} bytes", field="body")
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                extra = [(b"x-request-id", request_id.encode())]
                if timings:
                    extra.append((b"server-timing", _server_timing(timings, time.perf_counter() - start)))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        counted = scope.get("path") not in metrics.UNCOUNTED_PATHS  # probes and scrapes are not traffic
        if counted:
            metrics.IN_FLIGHT.inc()
        try:
            if too_big:  # refuse before reading a byte of it
                body = {"error": f"request body over {self.max_body} bytes", "code": "payload_too_large",
                        "field": "body", "request_id": request_id}
                scope["state"]["error_code"] = "payload_too_large"
                await send_with_id({"type": "http.response.start", "status": 413,
                                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
                await send_with_id({"type": "http.response.body", "body": orjson.dumps(body)})
            else:
                await self.app(scope, limited_receive, send_with_id)
        finally:
            if counted:
                metrics.IN_FLIGHT.dec()
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            endpoint = getattr(route, "path", "other")
            state = scope.get("state", {})
            code = status["code"]
            if endpoint not in metrics.UNCOUNTED_PATHS:
                metrics.REQUESTS.labels(endpoint, state.get("model", ""), state.get("version", ""), str(code)).inc()
                metrics.REQUEST_SECONDS.labels(endpoint).observe(elapsed)
                if code >= 400:
                    metrics.ERRORS.labels(state.get("error_code", "http_error")).inc()
                if "method" in state and code < 400:
                    metrics.EXPLAIN_SECONDS.labels(state["method"]).observe(elapsed)
            # probes and scrapes at debug level: every few seconds, they would drown the real requests
            log.log(logging.INFO if counted else logging.DEBUG, "%s %s %s %.1f ms", scope.get("method"),
                    scope.get("path"), code, elapsed * 1000,
                    extra={"method": scope.get("method"), "path": scope.get("path"), "status": code,
                           "duration_ms": round(elapsed * 1000, 2), "model": state.get("model"),
                           "version": state.get("version")})
            REQUEST_ID.reset(token)


def _server_timing(t: dict[str, float], total_s: float) -> bytes:
    """Where a request's time went (ms): parsing and checks, queue wait, model, the rest
    (encoding the answer, framework); read by the serving benchmark and browser dev tools."""
    parts = {k: t.get(f"{k}_s", 0.0) for k in ("parse", "queue", "model")}
    parts["other"] = max(total_s - sum(parts.values()), 0.0)
    out = ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in parts.items())
    if "batch" in t:
        out += f', batch;desc="{int(t["batch"])}"'
    return out.encode()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    if settings.tune_malloc:
        tune_malloc()
    configure_logging(settings.log_json, settings.log_level)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await app.state.registry.start()
        logging.getLogger("icaserve").info(
            "serving", extra={"store": str(settings.store), "device": str(app.state.registry.device),
                              "models": sorted(app.state.registry.latest()),
                              "default_model": app.state.registry.default_name})
        yield
        app.state.shutting_down = True
        await app.state.registry.stop()

    app = FastAPI(
        title="icaserve",
        version="0.1.0",
        summary="Predictions and per-time-step saliency from input-cell-attention RNNs.",
        description="Post sequences (T x N raw values) to `/predict` for class scores and to `/explain` for "
        "T x N saliency matrices. Errors share one format: `{\"error\", \"code\", \"field\", \"request_id\"}`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = ModelRegistry(settings, pick_device(settings.device))
    app.state.shutting_down = False

    errors.install(app)
    app.include_router(api.router)
    app.include_router(v2.router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"])
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes)
    return app
