"""The FastAPI application: wiring of settings, registry, routes, errors and request context.

`create_app()` is also the uvicorn factory (`icaserve serve` runs `service.app:create_app`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import torch
from fastapi import FastAPI, Request
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from icaserve.tuning import tune_malloc
from service import api, errors, metrics, v1, v2
from service.dataplane import DataPlane
from service.errors import ApiError, PayloadTooLarge, error_body
from service.fast_path import FastPath
from service.logs import REQUEST_ID, configure_logging
from service.registry import ModelRegistry
from service.runtime import pick_device
from service.server import OVER_CONNECTION_CAP
from service.settings import Settings
from service.viewer import router as viewer_router

log = logging.getLogger("icaserve.access")
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# asyncio's own timeout (Python 3.11+) bounds each body chunk's wait at 4 us a chunk, anyio's
# fail_after (the fallback on 3.10) at 10 us; both raise TimeoutError.
_timeout = getattr(asyncio, "timeout", None)
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer"


class RequestTimeout(ApiError):
    """The client kept the server waiting for its request body longer than `body_timeout_s`."""

    status, code = 408, "request_timeout"


class RequestContext:
    """Request id, body-size and body-time limits, in-flight gauge, request metrics and the access log line.

    A pure ASGI middleware, so the body limit also holds for chunked uploads: the byte count is
    checked as the body streams in, before it is all in memory. The time spent waiting for the
    body is bounded too (`body_timeout_s` in all, 408 and close past it), so a client that
    trickles or stalls its body cannot hold a request open. A client that leaves before its
    request is answered is counted apart (status 499, kind `client_closed`): nothing failed here.
    HEAD is answered as GET without the body; a connection beyond the server's cap (marked by
    service/server.py) gets 503 with Retry-After.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float = 30.0,
                 retry_after_s: int = 1, fast_path: FastPath | None = None) -> None:
        self.app = app
        self.fast_path = fast_path  # the busiest routes, served past the router (service/fast_path.py)
        self.max_body = max_body_bytes
        self.body_timeout = body_timeout_s
        self.retry_after = retry_after_s

    @staticmethod
    async def _internal_error(scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
        handler = scope["app"].exception_handlers.get(Exception)
        if handler is None:
            raise exc
        response = await handler(Request(scope, receive), exc)
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given, declared = "", None  # the two headers read here (the last of each, as a dict would keep)
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value.decode("latin-1")
            elif name == b"content-length":
                declared = value.decode("latin-1")
        request_id = given if _REQUEST_ID_OK.match(given) else os.urandom(16).hex()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        timings: dict[str, float] = {}
        state["timings"] = timings
        token = REQUEST_ID.set(request_id)
        head_only = scope.get("method") == "HEAD"
        # HEAD on a GET route is the GET without its body (FastAPI routes list GET only). A copy, so
        # the server still sees HEAD and sends no body; the router writes the route into it.
        app_scope = {**scope, "method": "GET"} if head_only else scope
        status: dict[str, Any] = {"code": 500, "started": False}
        start = time.perf_counter()
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_body
        over_cap = state.get(OVER_CONNECTION_CAP)
        received = 0
        waited = 0.0  # seconds spent waiting for body chunks
        body_done = False
        client_gone = False  # the client disconnected before the answer started

        async def limited_receive() -> Message:
            nonlocal received, waited, body_done, client_gone
            if body_done:  # after the body: e.g. listening for a disconnect, not bounded
                return await receive()
            t0 = time.monotonic()
            try:
                if _timeout is not None:
                    async with _timeout(self.body_timeout - waited):
                        message = await receive()
                else:
                    with anyio.fail_after(self.body_timeout - waited):
                        message = await receive()
            except TimeoutError:
                raise RequestTimeout(f"request body not received within {self.body_timeout:g} s", field="body",
                                     headers={"Connection": "close"}) from None
            finally:
                waited += time.monotonic() - t0
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise PayloadTooLarge(f"request body over {self.max_body} bytes", field="body",
                                          headers={"Connection": "close"})
                body_done = not message.get("more_body", False)
            elif message["type"] == "http.disconnect" and not status["started"]:
                client_gone = True
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                extra = [(b"x-request-id", request_id.encode())]
                if timings:
                    extra.append((b"server-timing", _server_timing(timings, time.perf_counter() - start)))
                message["headers"] = [*message.get("headers", []), *extra]
            elif head_only and message["type"] == "http.response.body" and message.get("body"):
                message = {**message, "body": b""}
            await send(message)

        async def refuse(code: int, kind: str, message: str, field: str | None,
                         extra: list[tuple[bytes, bytes]]) -> None:
            """Answer in the error format without calling the app (its route is never resolved)."""
            body = error_body(message, kind, field, request_id)
            state["error_code"] = kind
            await send_with_id({"type": "http.response.start", "status": code,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
                                            *extra]})
            await send_with_id({"type": "http.response.body", "body": body})

        # probes and scrapes are not traffic; nor are connections turned away at the cap
        counted = scope.get("path") not in metrics.UNCOUNTED_PATHS and not over_cap
        if counted:
            metrics.IN_FLIGHT.inc()
        try:
            if over_cap:
                await refuse(503, "too_many_connections", f"the server holds its maximum of {over_cap} open "
                             "connections; retry shortly", None, [(b"retry-after", str(self.retry_after).encode())])
            elif too_big:  # refuse before reading a byte of it
                await refuse(413, "payload_too_large", f"request body over {self.max_body} bytes", "body", [])
            else:
                try:
                    fast = self.fast_path.match(app_scope) if self.fast_path is not None else None
                    if fast is not None:
                        await self.fast_path.serve(fast, app_scope, limited_receive, send_with_id)
                    else:
                        await self.app(app_scope, limited_receive, send_with_id)
                except Exception as exc:
                    if status["started"]:  # too late for an error answer: the server closes the connection
                        raise
                    if not client_gone:
                        # A bug: the app's catch-all handler logs it and answers 500 in the error
                        # format, here, so the answer carries the request id like every other.
                        await self._internal_error(app_scope, limited_receive, send_with_id, exc)
                    # Else the client left mid-request (typically mid-body): there is nobody to answer
                    # and nothing failed here, so no 500 and no traceback; counted below as 499.
        finally:
            if counted:
                metrics.IN_FLIGHT.dec()
            elapsed = time.perf_counter() - start
            route = app_scope.get("route")
            endpoint = getattr(route, "path", "other")
            code = status["code"]
            if client_gone and not status["started"]:
                code = CLIENT_CLOSED
                state["error_code"] = "client_closed"
            if endpoint not in metrics.UNCOUNTED_PATHS:
                metrics.request_counter(endpoint, state.get("model", ""), state.get("version", ""), code).inc()
                metrics.request_seconds(endpoint).observe(elapsed)
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
    parse, queue, model = t.get("parse_s", 0.0), t.get("queue_s", 0.0), t.get("model_s", 0.0)
    other = max(total_s - parse - queue - model, 0.0)
    out = "parse;dur=%.3f, queue;dur=%.3f, model;dur=%.3f, other;dur=%.3f" % (
        parse * 1000, queue * 1000, model * 1000, other * 1000)
    if "batch" in t:
        out += ', batch;desc="%d"' % int(t["batch"])
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
        grpc = None
        if settings.grpc_enabled:  # the Open Inference Protocol over gRPC, beside HTTP, in this loop
            from service import grpc_server

            try:
                grpc = await grpc_server.start(app)
            except BaseException:
                await app.state.registry.stop()
                raise
        logging.getLogger("icaserve").info(
            "serving", extra={"store": str(settings.store), "device": str(app.state.registry.device),
                              "models": sorted(app.state.registry.latest()),
                              "default_model": app.state.registry.default_name})
        yield
        app.state.shutting_down = True
        if grpc is not None:
            await grpc_server.stop(grpc, settings.request_timeout_s)
        await app.state.registry.stop()

    app = FastAPI(
        title="icaserve",
        version="0.1.0",
        summary="Predictions and per-time-step saliency from input-cell-attention RNNs.",
        description="Post sequences (T x N raw values) to `/predict` for class scores and to `/explain` for "
        "T x N saliency matrices. Errors share one format: `{\"error\", \"code\", \"field\", \"request_id\"}`.",
        lifespan=lifespan,
        telemetry=None if settings.otel else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.registry = ModelRegistry(settings, pick_device(settings.device))
    app.state.dataplane = DataPlane(app.state.registry, settings)  # predict and explain for every route
    app.state.shutting_down = False

    errors.install(app)
    app.include_router(api.router)
    app.include_router(v2.router)
    app.include_router(v1.router)
    app.include_router(viewer_router)  # /viewer: the explanation viewer page and its helpers
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"])
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s,
                       retry_after_s=settings.retry_after_s, fast_path=FastPath(app, api.router.routes) if settings.fast_path else None)
    return app
