"""The service's std.trace lines: returned to a /v1/evaluate request that asks, only where
``serve.evaluate.traces`` allows it, beside a result or an error; never logged. In process
(httpx's ASGI transport on a real pool)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from jsonnet_worker import PoolConfig, WorkerPool
from jsonnet_worker.service import ServiceConfig, create_app, load_config
from jsonnet_worker.service._schema import schema_text
from servicekit import write_config

MARKER = "PERSONAL-DATA-trace-77c1"
TRACED = f"local t = std.trace('claims of {MARKER}', {{a: 1}}); t"
TRACED_ERROR = f"local t = std.trace('before {MARKER}', 1); t + error 'boom'"


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    with WorkerPool(config=PoolConfig(size=1, spares=0)) as shared:
        yield shared


def config(folder: Path, traces: bool | None) -> ServiceConfig:
    evaluate = {} if traces is None else {"traces": traces}
    return load_config(write_config(folder, {"serve": {"evaluate": evaluate}}), environ={})


def post(config: ServiceConfig, pool: WorkerPool, body: dict[str, Any]) -> httpx.Response:
    async def main() -> httpx.Response:
        app = create_app(config, pool=pool)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.post("/v1/evaluate", json=body)

    return asyncio.run(main())


def test_asked_and_allowed_the_result_comes_with_its_lines(
    tmp_path: Path, pool: WorkerPool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    allowed = config(tmp_path, True)
    answer = post(allowed, pool, {"snippet": TRACED, "traces": True})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "result": {"a": 1},
        "traces": [f"TRACE: snippet.jsonnet:1 claims of {MARKER}"],
    }
    answer = post(allowed, pool, {"snippet": TRACED_ERROR, "traces": True})
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["error"]["kind"] == "jsonnet_error" and "boom" in body["error"]["message"]
    assert body["traces"] == [f"TRACE: snippet.jsonnet:1 before {MARKER}"]
    # Not asked: the engine's JSON as before, no lines.
    answer = post(allowed, pool, {"snippet": TRACED})
    assert answer.status_code == 200 and answer.json() == {"a": 1}
    answer = post(allowed, pool, {"snippet": TRACED, "traces": False})
    assert answer.status_code == 200 and answer.json() == {"a": 1}
    assert MARKER not in caplog.text
    for record in caplog.records:
        assert MARKER not in repr(vars(record))


@pytest.mark.parametrize("setting", [None, False])
def test_asked_and_not_allowed_is_403(
    tmp_path: Path, pool: WorkerPool, setting: bool | None
) -> None:
    refused = config(tmp_path, setting)
    assert refused.evaluate_traces is False
    answer = post(refused, pool, {"snippet": TRACED, "traces": True})
    assert answer.status_code == 403, answer.text
    assert answer.json() == {
        "error": {
            "kind": "traces_disabled",
            "message": "std.trace lines are disabled (serve.evaluate.traces)",
            "status": 403,
        }
    }
    assert MARKER not in answer.text
    assert post(refused, pool, {"snippet": TRACED}).json() == {"a": 1}


def test_traces_must_be_a_boolean(tmp_path: Path, pool: WorkerPool) -> None:
    answer = post(config(tmp_path, True), pool, {"snippet": "1", "traces": "yes"})
    assert answer.status_code == 400 and "'traces' must be a boolean" in answer.text


def test_the_key_is_in_the_schema_and_the_environment(tmp_path: Path) -> None:
    assert '"traces"' in schema_text()
    path = write_config(tmp_path)
    from_env = load_config(path, environ={"JSONNET_WORKER_SERVE_EVALUATE_TRACES": "true"})
    assert from_env.evaluate_traces is True
    assert load_config(path, environ={}).evaluate_traces is False


def test_the_openapi_document_describes_them(tmp_path: Path, pool: WorkerPool) -> None:
    async def main() -> dict[str, Any]:
        app = create_app(config(tmp_path, None), pool=pool)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            document: dict[str, Any] = (await client.get("/openapi.json")).json()
            return document

    document = asyncio.run(main())
    evaluate = document["paths"]["/v1/evaluate"]["post"]
    schema = evaluate["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["traces"]["type"] == "boolean"
    assert "traces_disabled" in evaluate["responses"]["403"]["description"]
    schemas = document["components"]["schemas"]
    assert schemas["Traced"]["required"] == ["result", "traces"]
    assert "traces" in schemas["Error"]["properties"]
