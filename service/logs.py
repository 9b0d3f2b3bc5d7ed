"""Logging: plain lines by default, one JSON object per line with `log_json`; every line made
while a request is handled carries its request id (also returned in `X-Request-ID`)."""

from __future__ import annotations

import contextvars
import logging
import sys

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def configure_logging(json_lines: bool, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if json_lines:
        from pythonjsonlogger.core import RESERVED_ATTRS
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                                           rename_fields={"asctime": "time", "levelname": "level"},
                                           reserved_attrs=[*RESERVED_ATTRS, "color_message"]))  # uvicorn's ANSI copy
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger("icaserve")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    if json_lines:  # uvicorn's own lines (start-up, shutdown, errors) in the same JSON shape
        logging.getLogger("uvicorn").handlers[:] = [handler]
        access = logging.getLogger("uvicorn.access")
        if access.handlers:  # uvicorn's access log is on exactly when its logger has handlers
            access.handlers[:] = [handler]
