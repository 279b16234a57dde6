"""HTTP errors of the service: one JSON shape, and the library's own ``kind`` and status.

Goals: every failure a client can cause or meet gets a stable ``kind``, a readable
``message`` and a fitting status, and nothing else (never a stack trace). The ``kind`` of a
pool error is the library's ``Error.kind`` and its status ``Error.http_status``
(``_errors.py`` draws the hierarchy), the same word the metrics' ``kind`` label and
``PoolStats.errors`` use. The body is always
``{"error": {"kind": ..., "message": ..., "status": ...}}``.

The service's own kinds: ``bad_request`` (400: not JSON, a wrong type, an unknown field, a
bad timeout), ``unauthorized`` (401, with ``WWW-Authenticate: Bearer``),
``evaluate_disabled``, ``traces_disabled`` and ``library_disabled`` (403: a library set
not open to ad-hoc snippets), ``unknown_mapper``, ``unknown_template``, ``unknown_library``,
``not_found`` (404),
``method_not_allowed`` (405), ``too_large`` (413, also the library's ``InputTooLarge``),
``unsupported_media_type`` (415: a body not sent as JSON), ``internal`` (500: a bug; the
detail goes to the log only). A 503 and a 429 carry ``Retry-After``: 429 is the library's
``TenantOverloaded`` (the caller's tenant has as many calls waiting as it may; other tenants
are served), 503 ``overloaded`` a queue timeout or ``unavailable``.

Weak spots: 502 is a judgement call: a snippet that crashes its engine on purpose gets 502,
not 422, because a crash can also come from outside (the OOM killer, an operator's kill).
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from .. import Error, JsonnetError

RETRY_AFTER_SECONDS = 1
_RETRY_LATER = (429, 503)  # statuses that carry Retry-After


class ApiError(Error):
    """An error answer: ``status``, a stable ``kind`` and a message for the client."""

    kind = "api_error"

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = self.http_status = status
        self.kind = kind
        self.message = message

    def response(self) -> JSONResponse:
        headers: dict[str, str] = {}
        if self.status in _RETRY_LATER:
            headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        body: dict[str, Any] = {
            "error": {"kind": self.kind, "message": self.message, "status": self.status}
        }
        return JSONResponse(body, status_code=self.status, headers=headers)


def from_pool_error(error: Error) -> ApiError:
    """The HTTP answer to a typed library error: its own kind and status."""
    if isinstance(error, ApiError):
        return error
    message = error.message if isinstance(error, JsonnetError) else str(error)
    if type(error) is Error:  # an untyped error is a bug somewhere: say nothing more
        return ApiError(500, "internal", "internal error")
    return ApiError(error.http_status, error.kind, message)
