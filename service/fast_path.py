"""POST /predict and POST /explain on the default model, called without FastAPI's router.

Those two routes carry most of the traffic, and the router's layers around them (route matching
through included routers, dependency solving, the exception and exit-stack middlewares) cost
~0.2 ms of the event loop's CPU per request, measured in-process on a 100 x 100 /predict: as much
as parsing the body. `RequestContext` (service/app.py) hands such a request to `FastPath.serve`,
which runs the same route's dependencies and endpoint function that FastAPI would, and answers
an error through the same exception handlers. Everything else goes through FastAPI as before, and
the routes stay declared there, so the OpenAPI document is unchanged.

Only routes whose endpoint and dependencies all take just the `Request` qualify (checked when the
app is built); tests/test_fast_path.py asserts that both do and that answers are the same either way.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

FAST_PATHS = ("/predict", "/explain")

Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class FastRoute:
    route: APIRoute  # written into the scope, as the router does: metrics label requests by its path
    dependencies: tuple[Endpoint, ...]
    endpoint: Endpoint


def _takes_only_request(fn: Callable) -> bool:
    params = list(inspect.signature(fn).parameters.values())
    return (inspect.iscoroutinefunction(fn) and len(params) == 1
            and params[0].annotation in (Request, "Request"))


class FastPath:
    def __init__(self, app: FastAPI, routes: Sequence[BaseRoute], paths: tuple[str, ...] = FAST_PATHS) -> None:
        """`routes`: those of the router that `app` includes without a prefix (FastAPI keeps an
        included router as one entry of `app.routes`)."""
        self.app = app
        self.routes: dict[str, FastRoute] = {}
        for route in routes:
            if not (isinstance(route, APIRoute) and route.path in paths and "POST" in route.methods):
                continue
            deps = tuple(d.dependency for d in route.dependencies)
            if all(d is not None and _takes_only_request(d) for d in deps) and _takes_only_request(route.endpoint):
                self.routes[route.path] = FastRoute(route, deps, route.endpoint)  # type: ignore[arg-type]

    def match(self, scope: Scope) -> FastRoute | None:
        if scope["method"] != "POST":
            return None
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # the router matches below the root path too
            path = path[len(root):]
        return self.routes.get(path)

    async def serve(self, fast: FastRoute, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = fast.route
        scope["endpoint"] = fast.endpoint
        request = Request(scope, receive)
        try:
            for dependency in fast.dependencies:
                await dependency(request)
            response = await fast.endpoint(request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:  # unexpected: ServerErrorMiddleware answers 500 and logs it, as for any route
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Callable | None:
        """The app's handler for `exc`'s class or its nearest base, as Starlette's
        ExceptionMiddleware looks it up; the catch-all (`Exception`) is left to the outer middleware."""
        handlers = self.app.exception_handlers
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            if cls in handlers:
                return handlers[cls]
        return None
