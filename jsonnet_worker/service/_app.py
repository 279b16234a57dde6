"""The Starlette application: the pool's ``aevaluate`` behind a small JSON API.

Goals: the reference for "a pool inside an ASGI app": one pool per process, started in the
lifespan and shared by every request; requests validated before they reach a worker; every
outcome a JSON answer with a fitting status (see ``_errors.py``); nothing a client sends can
take a worker down for longer than one respawn, or see a stack trace.

Plan::

    POST /v1/evaluate          {snippet, ext_vars, tla_vars, ext_codes, tla_codes, timeout}
    POST /v1/mappers/{name}    {claims, identity?, timeout?}  claims/identity as ext code
    POST /v1/templates/{name}  {ctx, timeout?}                ctx as top-level argument
    GET  /healthz              pool state and sandbox status (503 while not serving)
    GET  /metrics              Prometheus text format
    GET  /openapi.json         the OpenAPI description

A body is read in chunks and refused with 413 as soon as it passes ``serve.max_body_bytes``
(before any JSON parsing). The answer of an evaluation is the engine's manifested JSON
passed through as is (``aevaluate_json``): no decode and re-encode per request.

Weak spots: a client that disconnects mid-evaluation does not cancel it (the worker finishes
and the answer is dropped), which is the cheaper choice: cancelling costs a worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._errors import Error
from .._pool import WorkerPool
from .._status import PoolStats
from ._config import ServiceConfig, Snippet
from ._errors import ApiError, from_pool_error
from ._metrics import CONTENT_TYPE, ServiceMetrics
from ._openapi import openapi_document

logger = logging.getLogger("jsonnet_worker.service")

#: Called once the pool has started and before the server listens; returns the host
#: sandbox's status for /healthz. The command line passes the ``restrict_host`` step here.
AfterStart = Callable[[WorkerPool, ServiceConfig], Mapping[str, Any]]


class Service:
    """The state one app shares between requests: config, pool, metrics, sandbox status."""

    def __init__(
        self,
        config: ServiceConfig,
        pool: WorkerPool | None = None,
        after_start: AfterStart | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.owns_pool = pool is None
        self.after_start = after_start
        self.host_sandbox: Mapping[str, Any] = {"applied": False, "reason": "not requested"}
        self.serving = pool is not None
        self.metrics = ServiceMetrics(self.stats)

    def stats(self) -> PoolStats | None:
        return None if self.pool is None else self.pool.stats()

    def running_pool(self) -> WorkerPool:
        if self.pool is None or not self.serving:
            raise ApiError(503, "unavailable", "the service is not serving")
        return self.pool

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.pool is None:
            settings = self.config.pool
            # Blocks until the workers said hello: fine at start, nothing is served yet.
            self.pool = WorkerPool(settings.size, **settings.as_kwargs())
        try:
            if self.after_start is not None:  # e.g. restrict_host: if it fails, stop here
                self.host_sandbox = self.after_start(self.pool, self.config)
            self.serving = True
            logger.info("serving with %d workers (%s)", self.pool.size, self.sandbox_summary())
            yield
        finally:
            self.serving = False
            if self.owns_pool:
                pool = self.pool
                # The server has finished its requests by now; close() then reaps the workers.
                await anyio.to_thread.run_sync(pool.close, self.config.shutdown_timeout)
                logger.info("pool closed, workers reaped")

    def sandbox_summary(self) -> str:
        sandbox = None if self.pool is None else self.pool.sandbox
        return "workers: no sandbox reported" if sandbox is None else sandbox.summary()

    # -- endpoints ------------------------------------------------------------------------

    async def evaluate(self, request: Request) -> Response:
        if not self.config.evaluate_enabled:
            raise ApiError(403, "evaluate_disabled", "ad-hoc snippets are disabled")
        body = await self.read_body(request)
        _check_fields(
            body, {"snippet", "ext_vars", "tla_vars", "ext_codes", "tla_codes", "timeout"}
        )
        snippet = body.get("snippet")
        if not isinstance(snippet, str):
            raise ApiError(400, "bad_request", "'snippet' must be a string")
        return await self.run(
            "evaluate",
            snippet,
            "snippet.jsonnet",
            body,
            ext_vars=_object(body, "ext_vars"),
            tla_vars=_object(body, "tla_vars"),
            ext_codes=_codes(body, "ext_codes"),
            tla_codes=_codes(body, "tla_codes"),
        )

    async def mapper(self, request: Request) -> Response:
        mapper = self.named(self.config.mappers, request, "mapper")
        body = await self.read_body(request)
        _check_fields(body, {"claims", "identity", "timeout"})
        if not isinstance(body.get("claims"), dict):
            raise ApiError(400, "bad_request", "'claims' must be an object")
        ext_vars = {"claims": body["claims"]}
        if body.get("identity") is not None:
            ext_vars["identity"] = _object(body, "identity")
        return await self.run("mapper", mapper.source, mapper.filename, body, ext_vars=ext_vars)

    async def template(self, request: Request) -> Response:
        template = self.named(self.config.templates, request, "template")
        body = await self.read_body(request)
        _check_fields(body, {"ctx", "timeout"})
        if not isinstance(body.get("ctx"), dict):
            raise ApiError(400, "bad_request", "'ctx' must be an object")
        return await self.run(
            "template", template.source, template.filename, body, tla_vars={"ctx": body["ctx"]}
        )

    async def healthz(self, request: Request) -> Response:
        stats = self.stats()
        sandbox = None if self.pool is None else self.pool.sandbox
        if stats is None or not self.serving:
            status, code = "unavailable", 503
        else:
            status, code = ("ok", 200) if stats.alive > 0 else ("degraded", 200)
        body: dict[str, Any] = {
            "status": status,
            "pool": None if stats is None else _stats_json(stats),
            "sandbox": {
                "workers": None
                if sandbox is None
                else {
                    "enforced": sandbox.enforced,
                    "summary": sandbox.summary(),
                    "reason": sandbox.reason,
                },
                "host": dict(self.host_sandbox),
            },
            "mappers": sorted(self.config.mappers),
            "templates": sorted(self.config.templates),
            "evaluate_enabled": self.config.evaluate_enabled,
        }
        return JSONResponse(body, status_code=code)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    # -- helpers --------------------------------------------------------------------------

    def named(self, snippets: Mapping[str, Snippet], request: Request, kind: str) -> Snippet:
        name = request.path_params["name"]
        snippet = snippets.get(name)
        if snippet is None:
            raise ApiError(404, f"unknown_{kind}", f"no {kind} named {name!r}")
        return snippet

    async def read_body(self, request: Request) -> dict[str, Any]:
        """The request's JSON object, refused with 413 past the size limit (before parsing)
        and 400 when it is not a JSON object."""
        limit = self.config.max_body
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "bad_request", "bad Content-Length")
            if int(declared) > limit:
                raise ApiError(413, "too_large", f"the body is over {limit} bytes")
        chunks = bytearray()
        async for chunk in request.stream():
            chunks += chunk
            if len(chunks) > limit:
                raise ApiError(413, "too_large", f"the body is over {limit} bytes")
        try:
            body = json.loads(chunks)
        except (ValueError, RecursionError):
            raise ApiError(400, "bad_request", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "the body must be a JSON object")
        return body

    async def run(
        self, endpoint: str, snippet: str, filename: str, body: Mapping[str, Any], **variables: Any
    ) -> Response:
        """Evaluate on the pool; time it; turn a typed error into its HTTP answer."""
        pool = self.running_pool()
        timeout = self.request_timeout(body)
        started = time.perf_counter()
        status = 200
        try:
            text = await pool.aevaluate_json(
                snippet, filename=filename, timeout=timeout, **variables
            )
        except Error as exc:
            error = from_pool_error(exc)
            status = error.status
            raise error from None
        except (TypeError, ValueError, RecursionError) as exc:
            # The pool refused a variable before sending anything (a NaN, a name twice).
            status = 400
            raise ApiError(400, "bad_request", str(exc)) from None
        finally:
            self.metrics.observe(endpoint, status, time.perf_counter() - started)
        return Response(text, media_type="application/json")

    def request_timeout(self, body: Mapping[str, Any]) -> float | None:
        timeout = body.get("timeout")
        if timeout is None:
            return None
        ceiling = self.config.max_request_timeout
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or not 0 < timeout <= ceiling
        ):
            raise ApiError(
                400, "bad_request", f"'timeout' must be a number of seconds in (0, {ceiling}]"
            )
        return float(timeout)


def _check_fields(body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, "bad_request", f"unknown fields {unknown}; allowed: {sorted(allowed)}")


def _object(body: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = body.get(key)
    if value is not None and not isinstance(value, dict):
        raise ApiError(400, "bad_request", f"'{key}' must be an object")
    return value


def _codes(body: Mapping[str, Any], key: str) -> dict[str, str] | None:
    value = _object(body, key)
    if value is not None and not all(isinstance(code, str) for code in value.values()):
        raise ApiError(400, "bad_request", f"'{key}' must map names to Jsonnet code (strings)")
    return value


def _stats_json(stats: PoolStats) -> dict[str, Any]:
    return {
        "size": stats.size,
        "alive": stats.alive,
        "busy": stats.busy,
        "idle": stats.idle,
        "starting": stats.starting,
        "spares": stats.spares,
        "queue_depth": stats.queue_depth,
        "evaluations": stats.evaluations,
        "errors": stats.errors,
        "timeouts": stats.timeouts,
        "crashes": stats.crashes,
        "respawns": stats.respawns,
        "start_failures": stats.start_failures,
        "worker_pids": list(stats.worker_pids),
    }


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kinds = {404: "not_found", 405: "method_not_allowed"}
    kind = kinds.get(exc.status_code, "bad_request")
    response = ApiError(exc.status_code, kind, str(exc.detail)).response()
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _internal_error(request: Request, exc: Exception) -> Response:
    # The detail goes to the log, never to the client.
    logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "internal", "internal error").response()


def create_app(
    config: ServiceConfig,
    *,
    pool: WorkerPool | None = None,
    after_start: AfterStart | None = None,
) -> Starlette:
    """The service as an ASGI app. Without ``pool`` it starts one from ``config.pool`` in
    its lifespan and closes it at shutdown; with one, the caller owns it."""
    service = Service(config, pool, after_start)
    routes = [
        Route("/v1/evaluate", service.evaluate, methods=["POST"]),
        Route("/v1/mappers/{name}", service.mapper, methods=["POST"]),
        Route("/v1/templates/{name}", service.template, methods=["POST"]),
        Route("/healthz", service.healthz, methods=["GET"]),
        Route("/metrics", service.metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", service.openapi, methods=["GET"]),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        ApiError: _api_error,
        HTTPException: _http_error,
        Exception: _internal_error,
    }
    app = Starlette(
        routes=routes,
        exception_handlers=handlers,
        lifespan=service.lifespan,
    )
    app.state.service = service
    return app
