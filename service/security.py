"""Bearer keys: one for inference and model listing, a separate one for administration.

Keys are compared in constant time and never logged. With no inference key configured the
inference API is open; with no admin key configured the admin API is off entirely, so the
inference key can never perform admin actions.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import Forbidden, Unauthorized


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token.strip()


def _matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


async def require_api_key(request: Request) -> None:
    settings = request.app.state.settings
    if settings.api_key is None:
        return
    token = _bearer(request)
    if not _matches(token, settings.api_key.get_secret_value()):
        # The admin key also reads: operators need not hold two keys.
        if settings.admin_key is not None and _matches(token, settings.admin_key.get_secret_value()):
            return
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})


async def require_admin(request: Request) -> None:
    settings = request.app.state.settings
    if settings.admin_key is None:
        raise Forbidden("the admin API is disabled; set ICASERVE_ADMIN_KEY to enable it")
    if not _matches(_bearer(request), settings.admin_key.get_secret_value()):
        raise Unauthorized("missing or wrong admin key: send 'Authorization: Bearer <admin key>'",
                           headers={"WWW-Authenticate": "Bearer"})
