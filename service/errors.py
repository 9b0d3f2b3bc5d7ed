"""Every error the API returns, in one JSON shape, mapped to its status code in one place.

    {"error": "<what is wrong>", "code": "<machine-readable kind>", "field": "<where>" | null,
     "request_id": "<id>"}

`error` is a string so the same body is also a valid Open Inference Protocol (KServe V2) error.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from model_store import StoreError
from model_store.store import InvalidName, ModelNotFound, VersionNotFound

log = logging.getLogger("icaserve.errors")


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}


class InvalidInput(ApiError):
    status, code = 422, "invalid_input"


class MalformedBody(ApiError):
    status, code = 400, "malformed_body"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class TooExpensive(ApiError):
    status, code = 422, "too_expensive"


class Overloaded(ApiError):
    status, code = 503, "overloaded"


class NotReady(ApiError):
    status, code = 503, "not_ready"


class DeadlineExceeded(ApiError):
    status, code = 504, "deadline_exceeded"


def from_store_error(exc: StoreError) -> ApiError:
    if isinstance(exc, (ModelNotFound, VersionNotFound, InvalidName)):
        return NotFound(str(exc), field="model")
    return NotReady(f"model unavailable: {exc}", field="model")


@contextlib.contextmanager
def fields_renamed(rename: Callable[[str], str]) -> Iterator[None]:
    """Errors raised inside name their field in the caller's wire format: `rename` maps the
    data plane's field (e.g. `parameters.steps`, `target`) to it, in `field` and in the message's
    leading `field:`. For adapters whose requests nest or name things differently (V2, KServe V1)."""
    try:
        yield
    except ApiError as exc:
        if exc.field:
            new = rename(exc.field)
            if new != exc.field:
                if exc.message.startswith(exc.field):
                    exc.message = new + exc.message[len(exc.field):]
                exc.field = new
        raise


def error_body(message: str, code: str, field: str | None, request_id: str | None) -> bytes:
    """The one error format, as bytes; also for answers given below the app (service/app.py,
    service/server.py), where there is no Request."""
    body: dict[str, Any] = {"error": message, "code": code, "field": field, "request_id": request_id}
    return orjson.dumps(body)


def error_response(status: int, code: str, message: str, field: str | None, request: Request,
                   headers: dict[str, str] | None = None) -> Response:
    request.state.error_code = code
    body = error_body(message, code, field, getattr(request.state, "request_id", None))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


# Pydantic names the member of a union that failed as one more step of an error's location
# (`target.literal['predicted','all']`, `parameters.baseline.list[list[float]]`): not a field.
_UNION_TAGS = {"int", "str", "float", "bool", "none"}


def _loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if p in ("body", "query", "path", "header"):
            continue
        if parts and isinstance(p, str) and ("[" in p or p in _UNION_TAGS):
            continue
        parts.append(str(p))
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.field, request, exc.headers)

    @app.exception_handler(StoreError)
    async def _store(request: Request, exc: StoreError) -> Response:
        err = from_store_error(exc)
        return error_response(err.status, err.code, err.message, err.field, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = _loc(tuple(first.get("loc", ())))
        return error_response(422, "invalid_input", f"{field}: {first.get('msg')}", field, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), None, request, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", extra={"path": request.url.path})
        return error_response(500, "internal", "internal error; see the server log for this request id", None,
                              request)
