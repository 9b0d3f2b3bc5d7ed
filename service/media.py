"""Media types on the wire: `Content-Type` parsed as a media type (not searched for a substring)
and `Accept` negotiated with q-values, so `text/json-evil` is not JSON and
`application/x-npz;q=0` means "not npz" (RFC 9110, sections 8.3.1 and 12.5.1).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

JSON = "application/json"
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_QVALUE = re.compile(r"^(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)$")


class MediaType(NamedTuple):
    type: str  # lower-cased
    subtype: str  # lower-cased
    params: dict[str, str]  # names lower-cased, values unquoted


def parse_media_type(value: str) -> MediaType | None:
    """`type/subtype; name=value; ...` -> MediaType, or None when it is not one (then it names no type)."""
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
        q = media.params.pop("q", "1")
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
