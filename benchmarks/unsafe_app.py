"""The service benchmark's baseline: a plain Starlette app that evaluates the GitHub mapper
in-process with ``_gojsonnet``, the unsafe way users write it today (no sandbox, no timeout,
imports read the disk). Run under uvicorn by ``benchmarks/bench_service.py``:

    python -m uvicorn benchmarks.unsafe_app:app --host 127.0.0.1 --port PORT

``UNSAFE_THREADPOOL=1`` evaluates in Starlette's thread pool (a sync endpoint) instead of on
the event loop; the benchmark runs both and compares against the faster.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import _gojsonnet
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

MAPPER_PATH = (
    Path(__file__).resolve().parent.parent / "tests" / "data" / "kratos" / "oidc-github.jsonnet"
)
MAPPER = MAPPER_PATH.read_text()
IN_THREADPOOL = os.environ.get("UNSAFE_THREADPOOL") == "1"


def evaluate(claims: object) -> str:
    result: str = _gojsonnet.evaluate_snippet(
        MAPPER_PATH.name, MAPPER, ext_codes={"claims": json.dumps(claims)}
    )
    return result


async def github(request: Request) -> Response:
    body = await request.json()
    claims = body.get("claims") if isinstance(body, dict) else None
    if not isinstance(claims, dict):
        return JSONResponse({"error": "'claims' must be an object"}, status_code=400)
    try:
        text = await run_in_threadpool(evaluate, claims) if IN_THREADPOOL else evaluate(claims)
    except RuntimeError as exc:
        return JSONResponse({"error": str(exc)}, status_code=422)
    return Response(text, media_type="application/json")


app = Starlette(routes=[Route("/v1/mappers/github", github, methods=["POST"])])
