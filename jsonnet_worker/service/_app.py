"""The Starlette application: the pool's ``aevaluate`` behind a small JSON API.

Goals: the reference for "a pool inside an ASGI app": one pool per process, started in the
lifespan and shared by every request; requests validated before they reach a worker; every
outcome a JSON answer with a fitting status (see ``_errors.py``); nothing a client sends can
take a worker down for longer than one respawn, or see a stack trace.

Plan::

    POST /v1/evaluate          {snippet, ext_vars, tla_vars, ext_codes, tla_codes, timeout,
                                tenant?, traces?, library?}
    POST /v1/mappers/{name}    {claims, identity?, timeout?, tenant?}  claims/identity as ext
                                                                       code
    POST /v1/templates/{name}  {ctx, timeout?, tenant?}                ctx as top-level argument
    GET  /livez                200 while the process answers
    GET  /readyz               200 once the pool serves (503 before, and while the sandbox is
                               required but not enforced)
    GET  /healthz              pool state and the sandbox verdict ("ok" or "degraded" with
                               reasons; 503 while not serving); with a token configured,
                               only {"status"} without it
    GET  /metrics              Prometheus text format (behind the token, when configured)
    GET  /openapi.json         the OpenAPI description

Trust domains: a request's optional ``tenant`` is passed to the pool in one of two
namespaces, ``config:<tenant>`` for the configured mappers and templates and
``adhoc:<tenant>`` for ``/v1/evaluate``, so an ad-hoc snippet never runs in a worker that
serves a configured mapper (a compromised worker could read later callers' claims). With
``serve.auth.bearer_token_file`` set, every ``/v1/*`` request needs ``Authorization: Bearer
<token>`` (compared in constant time; 401 otherwise), and so do ``/metrics`` and the detail
of ``/healthz`` (worker pids, mapper names, the sandbox layers: a map for an attacker);
``serve.auth.metrics_token_file`` adds a token good for those two only (a scraper's). Without
it ``/healthz`` answers its status alone; ``/livez`` and ``/readyz`` stay open for
orchestrators.

Library sets: a configured mapper or template that names a set (``library:`` beside its
URI, ``_config.py``) has its imports served from it; every other import is refused, as
everywhere. A ``/v1/evaluate`` request may name a set (``"library": NAME``) only where that
set says ``adhoc: true`` (403 ``library_disabled`` otherwise, 404 ``unknown_library`` for a
name not configured): an ad-hoc caller then runs code next to the operator's helpers, in its
own ``adhoc:`` domain's workers as always.

Only JSON: a ``/v1/*`` request whose ``Content-Type`` is not ``application/json`` (or
``application/<x>+json``; parameters such as ``charset`` allowed) gets 415 before anything
else is done, the bearer token's check included: a browser may send a cross-site "simple"
POST (``text/plain``, no preflight) to a service on localhost, and it must not run. 415
first because the refusal costs nothing and says only what ``/openapi.json`` publishes
anyway. No CORS header is ever sent, so a browser lets no other
origin read an answer, and a preflight (OPTIONS) gets 405.

A body over ``serve.max_body_bytes`` is refused with 413 before any JSON parsing: by its
Content-Length (then read in one piece), or, chunked, as soon as the chunks pass it. The
answer of an evaluation is the engine's manifested JSON passed through as is
(``aevaluate_json``): no decode and re-encode per request.

Traces: a ``/v1/evaluate`` request that says ``"traces": true`` gets its snippet's
``std.trace`` lines (the pool's ``on_trace``: bounded by ``pool.max_trace_lines`` and
``pool.max_trace_bytes``, control characters escaped), as ``{"result": <the JSON>,
"traces": [...]}`` or, for an error, beside it: ``{"error": {...}, "traces": [...]}``; only
where ``serve.evaluate.traces`` is true (default false: 403 ``traces_disabled``), since a
trace may print what the snippet was given. They are never logged. The configured mappers
and templates take no ``traces``: their author runs them through ``/v1/evaluate`` or
``jsonnet-worker test``.

Weak spots: a client that disconnects mid-evaluation does not cancel it (the worker finishes
and the answer is dropped), which is the cheaper choice: cancelling costs a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import (
    Error,
    JsonnetError,
    Library,
    PoolStats,
    SandboxStatus,
    SandboxVerdict,
    WorkerPool,
    judge_sandbox,
)
from ._config import ServiceConfig, Snippet
from ._errors import ApiError, from_pool_error
from ._metrics import CONTENT_TYPE, REFRESH_INTERVAL, ServiceMetrics
from ._openapi import openapi_document
from ._requests import RequestContext, install_filter

logger = logging.getLogger("jsonnet_worker.service")

#: Called once the pool has started and before the server listens; returns the host
#: sandbox's status for /healthz. The command line passes the ``restrict_host`` step here.
AfterStart = Callable[[WorkerPool, ServiceConfig], Mapping[str, Any]]
CONFIG_DOMAIN = "config"
ADHOC_DOMAIN = "adhoc"
MAX_TENANT = 200
# application/json or application/<anything>+json, parameters (charset) after a ";"
JSON_MEDIA_TYPE = re.compile(r"application/(?:[a-z0-9!#$&^_.+-]+\+)?json")


class StartupCheckFailed(Error):
    """A configured mapper or template does not parse or check: the service does not start."""

    kind = "startup_check"


class Service:
    """The state one app shares between requests: config, pool, metrics, sandbox status."""

    def __init__(
        self,
        config: ServiceConfig,
        pool: WorkerPool | None = None,
        after_start: AfterStart | None = None,
        metrics_dir: str | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.owns_pool = pool is None
        self.after_start = after_start
        self.host_sandbox: Mapping[str, Any] = {"applied": False, "reason": "not requested"}
        self.serving = pool is not None
        self.metrics = ServiceMetrics(
            self.stats, self.sandbox, config.pool.engine, multiprocess_dir=metrics_dir
        )

    def stats(self) -> PoolStats | None:
        return None if self.pool is None else self.pool.stats()

    def sandbox(self) -> SandboxStatus | None:
        return None if self.pool is None else self.pool.sandbox

    def running_pool(self) -> WorkerPool:
        if self.pool is None or not self.serving:
            raise ApiError(503, "unavailable", "the service is not serving")
        return self.pool

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.pool is None:
            # Blocks until the workers said hello: fine at start, nothing is served yet.
            self.pool = WorkerPool(config=self.config.pool)
        refreshing: asyncio.Task[None] | None = None
        try:
            await self.check_snippets(self.pool)
            await self.check_libraries(self.pool)
            if self.after_start is not None:  # e.g. restrict_host: if it fails, stop here
                self.host_sandbox = self.after_start(self.pool, self.config)
            self.serving = True
            verdict = self.verdict()
            log = logger.info if verdict.complete else logger.warning
            log("serving with %d workers; %s", self.pool.size, verdict.summary())
            if self.metrics.multiprocess_dir is not None:
                refreshing = asyncio.create_task(self.refresh_metrics())
            yield
        finally:
            self.serving = False
            if refreshing is not None:
                refreshing.cancel()
            if self.owns_pool:
                pool = self.pool
                # The server has finished its requests by now; close() then reaps the workers.
                await anyio.to_thread.run_sync(pool.close, self.config.shutdown_timeout)
                logger.info("pool closed, workers reaped")

    async def refresh_metrics(self) -> None:
        """Multiprocess metrics: copy this process's pool stats to the shared files now
        and then, so that a scrape answered by another process sees them."""
        while True:
            self.metrics.refresh()
            await asyncio.sleep(REFRESH_INTERVAL)

    async def check_snippets(self, pool: WorkerPool) -> None:
        """Parse and statically check every configured mapper and template in the sandbox
        (without evaluating them); StartupCheckFailed naming the first that fails."""
        for snippet in [*self.config.mappers.values(), *self.config.templates.values()]:
            try:
                await pool.acheck(snippet.source, filename=snippet.filename, tenant=CONFIG_DOMAIN)
            except JsonnetError as exc:
                raise StartupCheckFailed(
                    f"{snippet.kind.value} {snippet.name!r} ({snippet.key}: {snippet.uri}) "
                    f"does not check: {exc.message.rstrip()}"
                ) from None

    async def check_libraries(self, pool: WorkerPool) -> None:
        """Send each library set to a worker once (evaluating ``null`` with it): the pool
        refuses a set its requests cannot carry (``pool.max_request``), so that is found
        now and not on every call; StartupCheckFailed naming the set's file, line and key.
        (The snippets' own check above needs no set: a static check resolves no import.)"""
        for named in self.config.libraries.values():
            try:
                await pool.aevaluate_json("null", library=named.library, tenant=CONFIG_DOMAIN)
            except Error as exc:
                raise StartupCheckFailed(
                    f"{named.where}: the library set cannot be sent to a worker: {exc}"
                ) from None

    def verdict(self) -> SandboxVerdict:
        return judge_sandbox(None if self.pool is None else self.pool.sandbox)

    def ready(self) -> tuple[bool, str]:
        """Whether requests can be served, and why not."""
        if self.pool is None or not self.serving:
            return False, "the pool is not serving"
        if self.config.pool.require_sandbox and not self.verdict().enforced:
            return False, "the sandbox is required but not enforced"
        return True, ""

    # -- endpoints ------------------------------------------------------------------------

    async def evaluate(self, request: Request) -> Response:
        if not self.config.evaluate_enabled:
            raise ApiError(403, "evaluate_disabled", "ad-hoc snippets are disabled")
        body = await self.read_body(request)
        _check_fields(
            body,
            {
                *("snippet", "ext_vars", "tla_vars", "ext_codes", "tla_codes", "timeout"),
                *("tenant", "traces", "library"),
            },
        )
        snippet = body.get("snippet")
        if not isinstance(snippet, str):
            raise ApiError(400, "bad_request", "'snippet' must be a string")
        return await self.run(
            "evaluate",
            snippet,
            "snippet.jsonnet",
            body,
            ADHOC_DOMAIN,
            traces=self.traces_asked(body),
            library=self.adhoc_library(body),
            ext_vars=_object(body, "ext_vars"),
            tla_vars=_object(body, "tla_vars"),
            ext_codes=_codes(body, "ext_codes"),
            tla_codes=_codes(body, "tla_codes"),
        )

    async def mapper(self, request: Request) -> Response:
        mapper = self.named(self.config.mappers, request, "mapper")
        body = await self.read_body(request)
        _check_fields(body, {"claims", "identity", "timeout", "tenant"})
        if not isinstance(body.get("claims"), dict):
            raise ApiError(400, "bad_request", "'claims' must be an object")
        ext_vars = {"claims": body["claims"]}
        if body.get("identity") is not None:
            ext_vars["identity"] = _object(body, "identity")
        return await self.run(
            "mapper",
            mapper.source,
            mapper.filename,
            body,
            CONFIG_DOMAIN,
            library=_library_of(mapper),
            ext_vars=ext_vars,
        )

    async def template(self, request: Request) -> Response:
        template = self.named(self.config.templates, request, "template")
        body = await self.read_body(request)
        _check_fields(body, {"ctx", "timeout", "tenant"})
        if not isinstance(body.get("ctx"), dict):
            raise ApiError(400, "bad_request", "'ctx' must be an object")
        return await self.run(
            "template",
            template.source,
            template.filename,
            body,
            CONFIG_DOMAIN,
            library=_library_of(template),
            tla_vars={"ctx": body["ctx"]},
        )

    async def livez(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        ready, reason = self.ready()
        if ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not_ready", "reason": reason}, status_code=503)

    async def healthz(self, request: Request) -> Response:
        status, code, body = self.health()
        if not self.may_see_detail(request):
            return JSONResponse({"status": status}, status_code=code)
        return JSONResponse(body, status_code=code)

    def health(self) -> tuple[str, int, dict[str, Any]]:
        """(status, HTTP status, the whole /healthz answer)."""
        stats = self.stats()
        sandbox = None if self.pool is None else self.pool.sandbox
        verdict = judge_sandbox(sandbox)
        reasons = list(verdict.reasons)
        if stats is not None and stats.alive == 0:
            reasons.insert(0, "no worker alive")
        if self.host_sandbox.get("applied") is False:
            reasons.append(f"host sandbox not applied: {self.host_sandbox.get('reason', '')}")
        if stats is None or not self.serving:
            status, code = "unavailable", 503
        else:
            status, code = ("degraded" if reasons else "ok"), 200
        body: dict[str, Any] = {
            "status": status,
            "reasons": reasons,
            "pool": None if stats is None else _stats_json(stats),
            "sandbox": {
                "workers": None
                if sandbox is None
                else {
                    "enforced": verdict.enforced,
                    "complete": verdict.complete,
                    "summary": sandbox.summary(),
                    "reason": sandbox.reason,
                },
                "host": dict(self.host_sandbox),
            },
            "mappers": sorted(self.config.mappers),
            "templates": sorted(self.config.templates),
            "libraries": {
                name: {"files": len(named.library.files), "bytes": named.library.size}
                | {"adhoc": named.adhoc}
                for name, named in sorted(self.config.libraries.items())
            },
            "evaluate_enabled": self.config.evaluate_enabled,
            "server": {"pid": os.getpid()},  # which process answered (serve --workers N)
        }
        return status, code, body

    async def metrics_endpoint(self, request: Request) -> Response:
        if not self.may_see_detail(request):
            raise unauthorized()
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
            # The server reads no more than the declared length: one read, bounded.
            raw: bytes | bytearray = await request.body()
        else:  # chunked: count as it comes, refuse at the limit
            raw = bytearray()
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > limit:
                    raise ApiError(413, "too_large", f"the body is over {limit} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise ApiError(400, "bad_request", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "the body must be a JSON object")
        return body

    async def run(
        self,
        endpoint: str,
        snippet: str,
        filename: str,
        body: Mapping[str, Any],
        domain: str,
        *,
        traces: bool = False,
        library: Library | None = None,
        **variables: Any,
    ) -> Response:
        """Evaluate on the pool in the tenant's domain, its imports served from ``library``;
        time it; turn a typed error into its HTTP answer; with ``traces``, the call's
        std.trace lines beside either."""
        pool = self.running_pool()
        timeout = self.request_timeout(body)
        tenant = _tenant(body, domain)
        lines: list[str] = []
        try:
            text = await pool.aevaluate_json(
                snippet,
                filename=filename,
                timeout=timeout,
                tenant=tenant,
                on_trace=lines.append if traces else None,
                library=library,
                **variables,
            )
        except Error as exc:
            error = from_pool_error(exc)
            raise (TracedApiError(error, lines) if traces else error) from None
        except (TypeError, ValueError, RecursionError) as exc:
            # The pool refused a variable before sending anything (a NaN, a name twice).
            raise ApiError(400, "bad_request", str(exc)) from None
        if traces:
            # The engine's JSON passed through as is, inside the object (no decode).
            text = f'{{"result": {text.rstrip()}, "traces": {json.dumps(lines)}}}'
        return Response(text, media_type="application/json")

    def traces_asked(self, body: Mapping[str, Any]) -> bool:
        """Whether the request asks for its std.trace lines (400 for a non-boolean; 403
        where ``serve.evaluate.traces`` does not allow it)."""
        asked = body.get("traces", False)
        if not isinstance(asked, bool):
            raise ApiError(400, "bad_request", "'traces' must be a boolean")
        if asked and not self.config.evaluate_traces:
            raise ApiError(
                403, "traces_disabled", "std.trace lines are disabled (serve.evaluate.traces)"
            )
        return asked

    def adhoc_library(self, body: Mapping[str, Any]) -> Library | None:
        """The library set a /v1/evaluate request names (``library``): 400 for a non-string,
        404 for a name ``libraries`` does not hold, 403 for a set whose ``adhoc`` is not
        true (configured snippets only)."""
        name = body.get("library")
        if name is None:
            return None
        if not isinstance(name, str):
            raise ApiError(400, "bad_request", "'library' must be the name of a library set")
        named = self.config.libraries.get(name)
        if named is None:
            raise ApiError(404, "unknown_library", f"no library set named {name!r}")
        if not named.adhoc:
            raise ApiError(
                403,
                "library_disabled",
                f"library set {name!r} is not open to ad-hoc snippets (libraries.{name}.adhoc)",
            )
        return named.library

    def counted(
        self, endpoint: str, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` behind the bearer token (when configured), with every outcome counted
        by endpoint, status and kind (a 400 for a bad body too) and timed."""

        async def counted_handler(request: Request) -> Response:
            started = time.perf_counter()
            try:
                require_json(request)
                self.authorize(request)
                response = await handler(request)
            except ApiError as exc:
                self.metrics.observe(endpoint, exc.status, exc.kind, time.perf_counter() - started)
                raise
            elapsed = time.perf_counter() - started
            self.metrics.observe(endpoint, response.status_code, "ok", elapsed)
            return response

        return counted_handler

    def authorize(self, request: Request) -> None:
        """/v1/*: the bearer token, when configured (401 otherwise)."""
        token = self.config.bearer_token
        if token is not None and not _bearer_matches(request, [token]):
            raise unauthorized()

    def may_see_detail(self, request: Request) -> bool:
        """/metrics and /healthz's detail: open without tokens, else the bearer token or
        the metrics token."""
        tokens = [t for t in (self.config.bearer_token, self.config.metrics_token) if t]
        return not tokens or _bearer_matches(request, tokens)

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


class TracedApiError(ApiError):
    """An error answer with the call's std.trace lines beside it (a request that asked,
    where the config allows it)."""

    def __init__(self, error: ApiError, traces: list[str]) -> None:
        super().__init__(error.status, error.kind, error.message)
        self.traces = traces

    def response(self) -> JSONResponse:
        plain = super().response()
        body = json.loads(bytes(plain.body))
        body["traces"] = self.traces
        # Its own headers (Retry-After) kept; the body's length and type are JSONResponse's.
        headers = {
            name: value
            for name, value in plain.headers.items()
            if name not in ("content-length", "content-type")
        }
        return JSONResponse(body, status_code=self.status, headers=headers)


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", "a valid bearer token is required")


def _bearer_matches(request: Request, tokens: list[str]) -> bool:
    """Whether the request's bearer token is one of ``tokens`` (each compared in constant
    time, all of them every time)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    matches = [hmac.compare_digest(given.strip().encode(), token.encode()) for token in tokens]
    return scheme.lower() == "bearer" and any(matches)


def require_json(request: Request) -> None:
    """415 unless the request has one ``Content-Type``, a JSON one."""
    given = request.headers.getlist("content-type")
    media_type = given[0].partition(";")[0].strip().lower() if len(given) == 1 else ""
    if not JSON_MEDIA_TYPE.fullmatch(media_type):
        raise ApiError(
            415,
            "unsupported_media_type",
            "the body must be JSON, sent with Content-Type: application/json",
        )


def _library_of(snippet: Snippet) -> Library | None:
    return None if snippet.library is None else snippet.library.library


def _tenant(body: Mapping[str, Any], domain: str) -> str:
    """The pool's tenant for this request: its ``tenant`` field within ``domain``, so the
    configured snippets' and ad-hoc snippets' workers never mix."""
    tenant = body.get("tenant")
    if tenant is None:
        return domain
    if not isinstance(tenant, str) or not tenant or len(tenant) > MAX_TENANT:
        raise ApiError(
            400, "bad_request", f"'tenant' must be a non-empty string of at most {MAX_TENANT}"
        )
    return f"{domain}:{tenant}"


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


def create_app(
    config: ServiceConfig,
    *,
    pool: WorkerPool | None = None,
    after_start: AfterStart | None = None,
    metrics_dir: str | None = None,
) -> Starlette:
    """The service as an ASGI app. Without ``pool`` it starts one from ``config.pool`` in
    its lifespan and closes it at shutdown; with one, the caller owns it. ``metrics_dir``:
    prometheus_client's multiprocess directory, shared by every server process
    (``PROMETHEUS_MULTIPROC_DIR`` must name it before prometheus_client is imported);
    ``/metrics`` then answers for all of them."""
    service = Service(config, pool, after_start, metrics_dir)
    install_filter()
    routes = [
        Route("/v1/evaluate", service.counted("evaluate", service.evaluate), methods=["POST"]),
        Route("/v1/mappers/{name}", service.counted("mapper", service.mapper), methods=["POST"]),
        Route(
            "/v1/templates/{name}",
            service.counted("template", service.template),
            methods=["POST"],
        ),
        Route("/livez", service.livez, methods=["GET"]),
        Route("/readyz", service.readyz, methods=["GET"]),
        Route("/healthz", service.healthz, methods=["GET"]),
        Route("/metrics", service.metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", service.openapi, methods=["GET"]),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        ApiError: _api_error,
        HTTPException: _http_error,
    }  # an internal error (500) is RequestContext's, with the request id
    app = Starlette(
        routes=routes,
        exception_handlers=handlers,
        lifespan=service.lifespan,
        middleware=[Middleware(RequestContext)],
    )
    app.state.service = service
    return app
