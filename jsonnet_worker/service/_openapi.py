"""The OpenAPI 3.1 description of the service, served at ``/openapi.json``.

Goals: one hand-written document that says exactly what the handlers accept and answer,
status codes included, so clients can be generated and reviewers can check the contract.

Weak spots: it is kept in step with ``_app.py`` and ``_errors.py`` by hand; a test checks
that every route of the app is described and every error status is declared.
"""

from __future__ import annotations

from typing import Any

from .. import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}
_TIMEOUT = {
    "type": "number",
    "exclusiveMinimum": 0,
    "description": "Seconds; at most serve.max_request_timeout. Default: pool.timeout.",
}
_TRACES = {
    "type": "array",
    "items": {"type": "string"},
    "description": "The call's std.trace lines (TRACE: <file>:<line> <message>), at most "
    "pool.max_trace_lines lines and pool.max_trace_bytes bytes, control characters escaped, "
    "a last line saying what was cut; only for a request that asked, where "
    "serve.evaluate.traces allows it.",
}
_TENANT = {
    "type": "string",
    "maxLength": 200,
    "description": "Trust domain: a worker that served one tenant never serves another "
    "(configured snippets and ad-hoc snippets never share a worker either).",
}
_ERROR_STATUSES = {
    "400": "Bad input: not JSON, a wrong type, an unknown field, a bad timeout.",
    "401": "serve.auth.bearer_token_file is set and the bearer token is missing or wrong.",
    "404": "No mapper or template of that name (unknown_mapper, unknown_template); for "
    "/v1/evaluate, no library set of the name the request gives (unknown_library).",
    "413": "The body is over serve.max_body_bytes (or the request over the frame limit).",
    "415": "The request's Content-Type is not application/json (or application/*+json); "
    "checked before anything else.",
    "422": "The snippet failed: jsonnet_error (the engine's message), output_too_large, "
    "memory_limit.",
    "429": "tenant_overloaded: this tenant has as many calls waiting as pool.queue_limit "
    "allows (or its part of pool.queue_limit_total); other tenants are served. See "
    "Retry-After.",
    "502": "The worker crashed or broke the protocol during the call; it was replaced.",
    "503": "overloaded (no worker became free within pool.queue_timeout; see Retry-After), "
    "or unavailable.",
    "504": "The evaluation ran past its timeout; its worker was killed and replaced.",
}


def _errors(*codes: str) -> dict[str, Any]:
    return {
        code: {
            "description": _ERROR_STATUSES[code],
            "content": {"application/json": {"schema": _ERROR}},
        }
        for code in codes
    }


def _evaluation(summary: str, body_schema: dict[str, Any], *extra: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": body_schema}},
            },
            "responses": {
                "200": {"description": "The result.", "content": {"application/json": {}}},
                **_errors("400", "401", *extra, "413", "415", "422", "429", "502", "503", "504"),
            },
        }
    }


_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def _body(required: str, properties: dict[str, Any]) -> dict[str, Any]:
    """A request body: a JSON object with one required field and no unknown ones."""
    return {
        "type": "object",
        "required": [required],
        "additionalProperties": False,
        "properties": properties,
    }


def openapi_document() -> dict[str, Any]:
    mapper = _evaluation(
        "Run a named OIDC claim mapper (claims and identity as ext code, as Kratos does).",
        _body(
            "claims",
            {
                "claims": {"type": "object", "description": "ext code 'claims'"},
                "identity": {"type": "object", "description": "ext code 'identity'"},
                "timeout": _TIMEOUT,
                "tenant": _TENANT,
            },
        ),
        "404",
    )
    mapper["parameters"] = [_NAME]
    template = _evaluation(
        "Render a named courier or web-hook body template (ctx as top-level argument).",
        _body("ctx", {"ctx": {"type": "object"}, "timeout": _TIMEOUT, "tenant": _TENANT}),
        "404",
    )
    template["parameters"] = [_NAME]
    evaluate = _evaluation(
        "Evaluate an ad-hoc snippet (403 when serve.evaluate.enabled is false).",
        _body(
            "snippet",
            {
                "snippet": {"type": "string"},
                "ext_vars": {
                    "type": "object",
                    "description": "A string value is a Jsonnet string; any other JSON "
                    "value is passed as JSON code.",
                },
                "tla_vars": {"type": "object", "description": "As ext_vars."},
                "ext_codes": {"type": "object", "additionalProperties": {"type": "string"}},
                "tla_codes": {"type": "object", "additionalProperties": {"type": "string"}},
                "timeout": _TIMEOUT,
                "tenant": _TENANT,
                "library": {
                    "type": "string",
                    "description": "The configured library set (libraries.NAME) the snippet's "
                    "imports are served from; only a set with adhoc: true (403 "
                    "library_disabled otherwise, 404 unknown_library for an unknown name). "
                    "Default: none, every import is refused.",
                },
                "traces": {
                    "type": "boolean",
                    "description": "Return the snippet's std.trace lines: the result as "
                    "{result, traces}, an error with traces beside it (403 unless "
                    "serve.evaluate.traces is true). Default false.",
                },
            },
        ),
        "404",
    )
    evaluate["post"]["responses"]["200"] = {
        "description": "The result; with traces asked for, {result, traces}.",
        "content": {
            "application/json": {"schema": {"oneOf": [{}, {"$ref": "#/components/schemas/Traced"}]}}
        },
    }
    evaluate["post"]["responses"]["403"] = {
        "description": "evaluate_disabled: ad-hoc snippets are disabled in the config; "
        "traces_disabled: the request asked for traces and serve.evaluate.traces is false; "
        "library_disabled: the request names a library set whose adhoc is not true.",
        "content": {"application/json": {"schema": _ERROR}},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "jsonnet-worker",
            "version": __version__,
            "description": "Evaluate Jsonnet (OIDC claim mappers, courier and web-hook "
            "templates, ad-hoc snippets) in sandboxed worker processes.",
        },
        "paths": {
            "/v1/evaluate": evaluate,
            "/v1/mappers/{name}": mapper,
            "/v1/templates/{name}": template,
            "/livez": {
                "get": {
                    "summary": "Liveness: the process answers.",
                    "responses": {"200": {"description": "Alive."}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: the pool serves, with the sandbox where required.",
                    "responses": {
                        "200": {"description": "Ready."},
                        "503": {
                            "description": "Starting, shutting down, or the sandbox is "
                            "required (security.require_sandbox) but not enforced.",
                        },
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Pool state and the sandbox verdict; with a token configured "
                    "(serve.auth), only {status} unless the request has it.",
                    "responses": {
                        "200": {
                            "description": "Serving: status ok, or degraded with the "
                            "reasons (no worker alive, a sandbox layer missing).",
                            "content": {"application/json": {}},
                        },
                        "503": {
                            "description": "Not serving (starting or shutting down).",
                            "content": {"application/json": {}},
                        },
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (text format), of every server process.",
                    "responses": {
                        "200": {"description": "Metrics.", "content": {"text/plain": {}}},
                        "401": {
                            "description": "A token is configured (serve.auth) and the "
                            "request does not have it.",
                            "content": {"application/json": {"schema": _ERROR}},
                        },
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document.",
                    "responses": {
                        "200": {"description": "OpenAPI 3.1.", "content": {"application/json": {}}}
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["kind", "message", "status"],
                            "properties": {
                                "kind": {"type": "string"},
                                "message": {"type": "string"},
                                "status": {"type": "integer"},
                            },
                        },
                        "traces": _TRACES,
                    },
                },
                "Traced": {
                    "type": "object",
                    "required": ["result", "traces"],
                    "properties": {
                        "result": {"description": "The snippet's JSON value."},
                        "traces": _TRACES,
                    },
                },
            }
        },
    }
