"""How uvicorn serves the app: one place that builds its options (`icaserve serve` and the test
servers both use `uvicorn_options`), and the HTTP protocol that guards the transport.

`GuardedHttpToolsProtocol` is uvicorn's httptools protocol plus what uvicorn lacks for hostile or
broken clients (limits from `Settings`, read in each worker process from its ICASERVE_* variables):

- request head size: bytes of the request line and headers are counted as they arrive, before
  httptools buffers them (it joins a header's pieces by repeated concatenation, so a 64 MB header
  cost seconds of CPU); past `max_header_bytes`: 431 and close;
- request head time: the head must arrive within `header_timeout_s` of its first byte (or of the
  connection); past it: 408 and close (a connection that sent nothing is just closed);
- connection cap: a connection beyond `max_connections` gets 503 + Retry-After to its request
  (answered by the app's RequestContext, so it is counted and logged like any answer) and is closed;
- request body time: the app enforces `body_timeout_s` while it reads a body (408, see
  service/app.py); here a body still trickling in after the app has answered without reading it
  is cut off `body_timeout_s` after the head, where uvicorn would keep the connection for it.

uvicorn's own `limit_concurrency` answers 503 without Retry-After and not in our error format,
and `h11_max_incomplete_event_size` applies to the h11 protocol only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.errors import error_body
from service.logs import REQUEST_ID
from service.settings import Settings

APP = "service.app:create_app"
PROTOCOL = "service.server:GuardedHttpToolsProtocol"  # by name: uvicorn imports it in every worker
# Set in a request's scope["state"] when its connection is beyond the cap; RequestContext answers 503.
OVER_CONNECTION_CAP = "icaserve.over_connection_cap"
# After answering 431/408 mid-request: how long to read and drop what the client still sends before
# closing. Closing with unread bytes would make the kernel send a reset, which can destroy the
# answer before the client reads it.
LINGER_S = 2.0

log = logging.getLogger("icaserve.access")


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of `uvicorn.run(APP, ...)` serving with `settings`."""
    return {
        "factory": True, "host": settings.host, "port": settings.port, "workers": settings.workers,
        "log_level": settings.log_level, "access_log": False,  # RequestContext writes the access log
        "http": PROTOCOL,
        "ws": "none",  # no websocket routes: an upgrade request is answered as plain HTTP
        "timeout_graceful_shutdown": int(settings.request_timeout_s) + 5,
    }


def run_workers(settings: Settings) -> None:
    """`uvicorn.run` with several workers, except that the supervising process closes its copy of
    the listening socket as soon as it is told to stop. uvicorn's supervisor keeps it open until
    the workers have drained and exited, so during a drain the kernel still completed new
    connections into a backlog nobody accepts: clients hung instead of being refused, and a client
    that waits for the refusal before finishing a request it had started saw 408 (measured by
    tests/test_faults.py's drain test with two workers)."""
    import uvicorn
    from uvicorn.supervisors.multiprocess import Multiprocess

    class ClosingMultiprocess(Multiprocess):
        def _close_listeners(self) -> None:
            for sock in self.sockets:
                sock.close()

        def handle_term(self) -> None:
            self._close_listeners()
            super().handle_term()

        def handle_int(self) -> None:
            self._close_listeners()
            super().handle_int()

    config = uvicorn.Config(APP, **uvicorn_options(settings))
    ClosingMultiprocess(config, sockets=[config.bind_socket()]).run()


class TransportLimits:
    """The transport settings of this process, read once (Settings() per connection would cost)."""

    def __init__(self, settings: Settings) -> None:
        self.max_header_bytes = settings.max_header_bytes
        self.header_timeout_s = settings.header_timeout_s
        self.body_timeout_s = settings.body_timeout_s
        self.max_connections = settings.max_connections


@functools.lru_cache(maxsize=1)
def transport_limits() -> TransportLimits:
    return TransportLimits(Settings())


def _head_end(probe: bytes) -> int:
    """Index just past the blank line ending a request head in `probe`, or -1 (bare LF too).

    The bare-LF search stops where the CRLF one matched: a body in the same read (the usual case
    for a small POST) is never scanned."""
    crlf = probe.find(b"\n\r\n")
    lf = probe.find(b"\n\n", 0, len(probe) if crlf < 0 else crlf + 2)
    if lf >= 0:
        return lf + 2
    return -1 if crlf < 0 else crlf + 3


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head size and time limits, a connection cap and a cut-off
    for bodies nobody reads (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = transport_limits()
        self._head_bytes: int | None = 0  # bytes of the current request head so far; None: past it
        self._tail = b""  # last bytes of the head so far, to find a blank line split across reads
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._over_cap = False
        self._refused = False  # answered 431/408 without a request: drop whatever else comes

    # -- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._over_cap = len(self.connections) > self.limits.max_connections
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._linger_timer = None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._head_bytes is not None:  # reading a request head: count it before the parser sees it
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
            # Only the bytes that may still belong to an allowed head are searched: a head whose
            # end lies beyond them is over the limit whatever follows (and a body is not copied).
            window = data[: self.limits.max_header_bytes - self._head_bytes + 4]
            probe = self._tail + window
            end = _head_end(probe)
            # Leading CRLFs before a request line also look like a head's end: then the parser is
            # still in the head, and the next read is counted whole.
            self._head_bytes += len(data) if end < 0 else max(end - len(self._tail), 0)
            self._tail = probe[-2:]
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(431, "headers_too_large",
                             f"request line and headers over {self.limits.max_header_bytes} bytes")
                return
        super().data_received(data)

    # -- parser callbacks ---------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self._head_bytes, self._tail = None, b""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._over_cap:
            self.scope["state"][OVER_CONNECTION_CAP] = self.limits.max_connections
        super().on_headers_complete()
        if self._body_timer is None:  # cancelled by on_message_complete (at once when there is no body)
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._head_bytes, self._tail = 0, b""  # what comes next is the next request's head

    # -- timers -------------------------------------------------------------------------------

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._head_bytes is None:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind a request still being answered: it waits for that one.
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
            return
        if self._head_bytes == 0 and not self._tail:  # nothing sent: nobody to answer
            self.transport.close()
            return
        self._refuse(408, "request_timeout",
                     f"request line and headers not received within {self.limits.header_timeout_s:g} s")

    def _body_timed_out(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body:
            return
        if cycle.response_complete:
            # Answered without reading the whole body (401, 404, 413...): uvicorn would keep the
            # connection for as long as the rest trickles in.
            log.debug("closed a connection whose unread request body was still arriving after %g s",
                      self.limits.body_timeout_s)
            self.transport.close()
            return
        # The app is handling the request: it bounds the wait for the body itself (408, in the
        # error format); look again later.
        self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)

    # -- answers without a request ------------------------------------------------------------

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer `status` in the service's error format, close (lingering), and count and log it as
        RequestContext would (this never reaches the app: there is no complete request)."""
        request_id = uuid.uuid4().hex
        body = error_body(message, code, "headers", request_id)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                 b"\r\nconnection: close\r\nx-request-id: ", request_id.encode(), b"\r\n\r\n", body]
        self._cancel_timers()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # a pipelined request before this one: no longer answerable
            self.cycle.message_event.set()
        self._refused = True
        self.transport.write(b"".join(head))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.flow.resume_reading()
            self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()
        from service import metrics  # not at import: `icaserve serve` imports this module before the workers

        metrics.REQUESTS.labels("other", "", "", str(status)).inc()
        metrics.ERRORS.labels(code).inc()
        token = REQUEST_ID.set(request_id)
        try:
            client = "%s:%d" % self.client if self.client else "?"
            log.warning("%s from %s: %d %s", message, client, status, code,
                        extra={"status": status, "client": client, "error_code": code})
        finally:
            REQUEST_ID.reset(token)
