"""Media types on the wire: `Content-Type` parsed as a media type (not searched for a substring)
and `Accept` negotiated with q-values, so `text/json-evil` is not JSON and
`application/x-npz;q=0` means "not npz" (RFC 9110, sections 8.3.1 and 12.5.1).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import orjson
from pydantic import BaseModel
from starlette.responses import Response

JSON = "application/json"
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_QVALUE = re.compile(r"^(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)$")


class MediaType(NamedTuple):
    type: str  # lower-cased
    subtype: str  # lower-cased
    params: dict[str, str]  # names lower-cased, values unquoted


@functools.lru_cache(maxsize=256)  # a handful of distinct headers carry nearly all traffic
def parse_media_type(value: str) -> MediaType | None:
    """`type/subtype; name=value; ...` -> MediaType, or None when it is not one (then it names no type).
    Cached: callers must not change the returned `params`."""
    head, *rest = value.split(";")
    kind, slash, sub = head.strip().partition("/")
    if not slash or not _TOKEN.match(kind) or not _TOKEN.match(sub):
        return None
    params: dict[str, str] = {}
    for item in rest:
        if not item.strip():
            continue
        name, eq, val = item.strip().partition("=")
        name, val = name.strip().lower(), val.strip()
        if not eq or not _TOKEN.match(name):
            return None
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1]
        params[name] = val
    return MediaType(kind.lower(), sub.lower(), params)


def is_json(media: MediaType) -> bool:
    """application/json, or any type with the structured-syntax suffix `+json` (RFC 6839)."""
    return (media.type, media.subtype) == ("application", "json") or (
        media.subtype.endswith("+json") and len(media.subtype) > len("+json"))


def parse_accept(header: str) -> list[tuple[MediaType, float]]:
    """The media ranges of an Accept header with their q-values; malformed elements are skipped
    (RFC 9110 lets a server ignore what it cannot parse)."""
    ranges = []
    for element in header.split(","):
        if not element.strip():
            continue
        media = parse_media_type(element)
        if media is None or (media.type == "*" and media.subtype != "*"):
            continue
        q = media.params.get("q", "1")  # parse_media_type's answer is cached: copied, not changed
        media = media._replace(params={k: v for k, v in media.params.items() if k != "q"})
        if not _QVALUE.match(q):
            continue
        ranges.append((media, float(q)))
    return ranges


def negotiate(accept: str | None, offered: Sequence[str]) -> str | None:
    """The offered type (`type/subtype`) the client prefers, or None when it accepts none of them.

    A type's q-value is that of the most specific range matching it (`a/b` over `a/*` over `*/*`);
    the highest q wins, then the more specific match, then the server's order (`offered[0]` first).
    No or an empty Accept header accepts everything: `offered[0]`."""
    if accept is None or not accept.strip():
        return offered[0]
    ranges = parse_accept(accept)
    best: tuple[float, int, int] | None = None
    choice = None
    for order, name in enumerate(offered):
        kind, _, sub = name.lower().partition("/")
        matches = [(2 if r.subtype == sub else 1 if r.type == kind else 0, q) for r, q in ranges
                   if (r.type, r.subtype) in ((kind, sub), (kind, "*"), ("*", "*"))]
        if not matches:
            continue
        specificity = max(s for s, _ in matches)
        q = max(q for s, q in matches if s == specificity)
        key = (q, specificity, -order)
        if q > 0 and (best is None or key > best):
            best, choice = key, name
    return choice


# -- encoding answers (every wire format's JSON goes through here) ---------------------------------

def _fallback(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):  # orjson serialises only C-contiguous arrays natively
        return np.ascontiguousarray(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def json_bytes(data: Any) -> bytes:
    """`data` as JSON, numpy arrays written natively by orjson (float32 as its shortest text)."""
    return orjson.dumps(data, default=_fallback, option=orjson.OPT_SERIALIZE_NUMPY)


def json_response(data: Any, status: int = 200) -> Response:
    return Response(json_bytes(data), status_code=status, media_type=JSON)


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
