"""Per-request context: the request id, on the answer and on every log record it causes.

Goals: one id ties a request's access log line, the pool's records about its call (a timeout,
a crash, a recycled worker) and the caller's own logs together. The caller's
``X-Request-ID`` is kept when it is well-formed (1 to 128 characters of a safe set: no
spaces, quotes or control characters, so it cannot forge a log line); otherwise a new one is
made. Every answer carries it in ``X-Request-ID``.

Plan: ``RequestContext`` is the app's outermost middleware of its own (inside Starlette's
last-resort error middleware). It sets the ``REQUEST_ID`` context variable for the whole
request: the handler, the pool call and uvicorn's access log line (logged from the ``send``
the app calls) all run in the request's task, so they see it; the pool's ``aevaluate``
performs its log effects in the caller's task. ``RequestIdFilter`` copies the variable onto
each record as ``request_id`` (None outside a request); ``install_filter`` puts it on the
loggers the service's records come from (``jsonnet_worker``: the pool's;
``jsonnet_worker.service``; ``uvicorn.access``), so any handler sees the field, a test's
capturing handler included. The middleware also answers what escapes the app: a request
cancelled at shutdown (503) and an internal error (500), both in the JSON envelope and with
the id, never a traceback to the client.

Weak spots: records the pool's supervisor thread logs later on its own (a respawn after a
crash) are not the request's and carry no id; a caller's thread started without copying
the context (``contextvars.copy_context``) loses it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._errors import ApiError

logger = logging.getLogger("jsonnet_worker.service")

HEADER = "X-Request-ID"
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "jsonnet_worker_request_id", default=None
)
WELL_FORMED = re.compile(r"[A-Za-z0-9._~:/+=-]{1,128}")
LOGGERS = ("jsonnet_worker", "jsonnet_worker.service", "uvicorn.access")


def request_id_from(given: str | None) -> str:
    """The caller's id when well-formed, else a new one (32 hex digits)."""
    if given is not None and WELL_FORMED.fullmatch(given):
        return given
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id``: the current request's id, or None outside a request (a
    record that already has one keeps it). Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


def install_filter() -> None:
    """``RequestIdFilter`` on each logger of ``LOGGERS``, once."""
    for name in LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(existing, RequestIdFilter) for existing in target.filters):
            target.addFilter(RequestIdFilter())


class RequestContext:
    """The request id for the request's whole life, on its answer; and the JSON envelope
    for a request cancelled at shutdown (uvicorn cancels what still runs once
    ``serve.shutdown_timeout`` is overrun: 503, not a text/plain 500 and a CancelledError
    traceback in the log) or failing on a bug (500; the detail goes to the log only)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = [value for name, value in scope["headers"] if name == b"x-request-id"]
        request_id = request_id_from(given[0].decode("latin-1") if len(given) == 1 else None)
        token = REQUEST_ID.set(request_id)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() != b"x-request-id"
                ]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            if started:
                raise
            logger.warning(
                "%s %s cancelled at shutdown before it answered", scope["method"], scope["path"]
            )
            error = ApiError(503, "unavailable", "the service is shutting down")
            await error.response()(scope, receive, send_with_id)
        except Exception:
            logger.exception("internal error on %s %s", scope["method"], scope["path"])
            if started:
                raise
            await ApiError(500, "internal", "internal error").response()(
                scope, receive, send_with_id
            )
        finally:
            REQUEST_ID.reset(token)
