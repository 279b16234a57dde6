"""HTTP errors of the service: one JSON shape, and the status code of each pool error.

Goals: every failure a client can cause or meet gets a stable ``kind``, a readable
``message`` and a fitting status, and nothing else (never a stack trace).

The body is always ``{"error": {"kind": ..., "message": ..., "status": ...}}``. The mapping
(documented in README.md and the OpenAPI description):

=====  ==========================================================================
400    bad_request: not JSON, a wrong type, an unknown field, a bad timeout
403    evaluate_disabled: ad-hoc snippets are turned off in the config
404    unknown_mapper, unknown_template, not_found
405    method_not_allowed
413    too_large: the body is over ``serve.max_body_bytes``, or the request over the
       pool's frame limit (InputTooLarge)
422    jsonnet_error (with the engine's message), output_too_large, memory_limit: the
       snippet itself failed; the same request fails the same way again
502    worker_crashed, protocol_error: the worker died or misbehaved during the call (a
       crash the snippet may have caused); the worker was replaced
503    overloaded (with Retry-After), unavailable (pool closed or workers cannot start)
504    timeout: the evaluation ran past its deadline; its worker was killed and replaced
500    internal: a bug in the service; the detail goes to the log only
=====  ==========================================================================

Weak spots: 502 is a judgement call: a snippet that crashes its engine on purpose gets 502,
not 422, because a crash can also come from outside (the OOM killer, an operator's kill).
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from .. import _errors as pool_errors

RETRY_AFTER_SECONDS = 1


class ApiError(Exception):
    """An error answer: ``status``, a stable ``kind`` and a message for the client."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if self.status == 503 else None
        body: dict[str, Any] = {
            "error": {"kind": self.kind, "message": self.message, "status": self.status}
        }
        return JSONResponse(body, status_code=self.status, headers=headers)


_POOL_ERRORS: list[tuple[type[pool_errors.Error], int, str]] = [
    (pool_errors.JsonnetError, 422, "jsonnet_error"),
    (pool_errors.OutputTooLarge, 422, "output_too_large"),
    (pool_errors.MemoryLimitExceeded, 422, "memory_limit"),
    (pool_errors.InputTooLarge, 413, "too_large"),
    (pool_errors.EvaluationTimeout, 504, "timeout"),
    (pool_errors.Overloaded, 503, "overloaded"),
    (pool_errors.PoolClosed, 503, "unavailable"),
    (pool_errors.WorkerStartError, 503, "unavailable"),
    (pool_errors.SandboxUnavailable, 503, "unavailable"),
    (pool_errors.WorkerCrashed, 502, "worker_crashed"),
    (pool_errors.ProtocolError, 502, "protocol_error"),
]


def from_pool_error(error: pool_errors.Error) -> ApiError:
    """The HTTP answer to a typed pool error."""
    for kind, status, name in _POOL_ERRORS:
        if isinstance(error, kind):
            message = error.message if isinstance(error, pool_errors.JsonnetError) else str(error)
            return ApiError(status, name, message)
    return ApiError(500, "internal", "internal error")
