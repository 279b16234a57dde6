"""The service's hardening: only JSON on /v1/* (415 before anything else), no CORS, the
token on /metrics and /healthz's detail, and a request id on every answer and on every log
record a request causes. In process (httpx's ASGI transport on a real pool) where the app
decides, and the real server (uvicorn, one process and ``--workers 2``) where the server's
logging and processes matter."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from jsonnet_worker import PoolConfig, WorkerPool
from jsonnet_worker.service import ServiceConfig, create_app, load_config
from jsonnet_worker.service._requests import REQUEST_ID
from servicekit import GITHUB_CLAIMS, GITHUB_EXPECT, running_service, write_config

TOKEN = "api-token-1"
METRICS_TOKEN = "scrape-token-2"
LOOP = "local f(n) = f(n + 1) tailstrict; f(0)"
GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    with WorkerPool(config=PoolConfig(size=1, spares=0)) as shared:
        yield shared


def config_with(folder: Path, auth: dict[str, str]) -> ServiceConfig:
    """A config with the ``serve.auth`` files ``auth`` names (key: token)."""
    files = {}
    for key, token in auth.items():
        (folder / key).write_text(token + "\n")
        files[key] = key
    extra = {"serve": {"auth": files}} if files else {}
    return load_config(write_config(folder, extra), environ={})


Calls = Callable[[httpx.AsyncClient], Awaitable[None]]


def in_process(config: ServiceConfig, pool: WorkerPool, calls: Calls) -> None:
    async def main() -> None:
        app = create_app(config, pool=pool)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            await calls(client)

    asyncio.run(main())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- only JSON ----------------------------------------------------------------------------

REFUSED_TYPES = [
    None,
    "text/plain",  # what a cross-site "simple" POST may send, no preflight
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/jsonx",
    "application/json-seq",
    "text/json",
    "application/+json",
    "json",
]
ACCEPTED_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "Application/JSON;charset=UTF-8",
    "application/merge-patch+json",
    "application/vnd.example.v1+json; charset=utf-8",
]


def test_only_json_is_accepted_and_415_comes_first(tmp_path: Path, pool: WorkerPool) -> None:
    """415 before the token's check, before the body is read, before a worker is used."""
    config = config_with(tmp_path, {"bearer_token_file": TOKEN})
    body = json.dumps({"snippet": "1"}).encode()
    read: list[bytes] = []

    async def watched_body() -> AsyncIterator[bytes]:
        read.append(body)
        yield body

    async def calls(client: httpx.AsyncClient) -> None:
        before = pool.stats().evaluations
        for content_type in REFUSED_TYPES:
            headers = {} if content_type is None else {"content-type": content_type}
            for auth in ({}, bearer(TOKEN)):  # with a token or without: 415 either way
                answer = await client.post(
                    "/v1/evaluate", content=watched_body(), headers={**headers, **auth}
                )
                assert answer.status_code == 415, (content_type, answer.text)
                assert answer.json()["error"]["kind"] == "unsupported_media_type"
            answer = await client.post("/v1/mappers/m", content=body, headers=headers)
            assert answer.status_code == 415
        assert read == []  # no body was read
        assert pool.stats().evaluations == before  # no worker was asked
        two = [("content-type", "application/json"), ("content-type", "text/plain")]
        answer = await client.post(
            "/v1/evaluate", content=body, headers=[*two, *bearer(TOKEN).items()]
        )
        assert answer.status_code == 415
        for content_type in ACCEPTED_TYPES:
            headers = {"content-type": content_type, **bearer(TOKEN)}
            answer = await client.post("/v1/evaluate", content=body, headers=headers)
            assert answer.status_code == 200 and answer.json() == 1, (content_type, answer.text)
        answer = await client.post("/v1/evaluate", content=body, headers=ACCEPTED_JSON)
        assert answer.status_code == 401  # JSON, but no token

    in_process(config, pool, calls)


ACCEPTED_JSON = {"content-type": "application/json"}


def test_no_cors_headers_and_no_preflight(tmp_path: Path, pool: WorkerPool) -> None:
    config = config_with(tmp_path, {})
    origin = {"Origin": "https://attacker.example"}

    async def calls(client: httpx.AsyncClient) -> None:
        answers = [
            await client.post("/v1/evaluate", json={"snippet": "1"}, headers=origin),
            await client.post("/v1/evaluate", content=b"{}", headers=origin),  # 415
            await client.get("/healthz", headers=origin),
            await client.request(
                "OPTIONS",
                "/v1/evaluate",
                headers={
                    **origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type",
                },
            ),
        ]
        assert [answer.status_code for answer in answers] == [200, 415, 200, 405]
        for answer in answers:
            assert not [name for name in answer.headers if name.startswith("access-control-")]

    in_process(config, pool, calls)


# -- the token on /metrics and /healthz's detail ----------------------------------------------


def test_a_bearer_token_guards_metrics_and_health_detail(tmp_path: Path, pool: WorkerPool) -> None:
    config = config_with(tmp_path, {"bearer_token_file": TOKEN})

    async def calls(client: httpx.AsyncClient) -> None:
        refused = await client.get("/metrics")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"]["kind"] == "unauthorized"
        assert (await client.get("/metrics", headers=bearer("nope"))).status_code == 401
        scraped = await client.get("/metrics", headers=bearer(TOKEN))
        assert scraped.status_code == 200 and "jsonnet_worker_pool_size" in scraped.text
        detail = (await client.get("/healthz", headers=bearer(TOKEN))).json()
        assert detail["mappers"] == ["m"] and detail["pool"]["worker_pids"]
        status = {"status": detail["status"]}  # degraded here: no host layer in process
        assert (await client.get("/healthz")).json() == status
        assert (await client.get("/healthz", headers=bearer("nope"))).json() == status
        assert (await client.get("/livez")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).json() == {"status": "ready"}

    in_process(config, pool, calls)


def test_a_metrics_token_is_good_for_metrics_and_health_only(
    tmp_path: Path, pool: WorkerPool
) -> None:
    config = config_with(
        tmp_path, {"bearer_token_file": TOKEN, "metrics_token_file": METRICS_TOKEN}
    )
    assert config.metrics_token == METRICS_TOKEN

    async def calls(client: httpx.AsyncClient) -> None:
        for token in (METRICS_TOKEN, TOKEN):
            assert (await client.get("/metrics", headers=bearer(token))).status_code == 200
            health = (await client.get("/healthz", headers=bearer(token))).json()
            assert "pool" in health
        assert (await client.get("/metrics")).status_code == 401
        claims = {"claims": GITHUB_CLAIMS}
        refused = await client.post("/v1/mappers/m", json=claims, headers=bearer(METRICS_TOKEN))
        assert refused.status_code == 401
        mapped = await client.post("/v1/mappers/m", json=claims, headers=bearer(TOKEN))
        assert mapped.json() == GITHUB_EXPECT

    in_process(config, pool, calls)


def test_without_a_token_metrics_and_health_stay_open(tmp_path: Path, pool: WorkerPool) -> None:
    async def calls(client: httpx.AsyncClient) -> None:
        assert (await client.get("/metrics")).status_code == 200
        assert "worker_pids" in (await client.get("/healthz")).json()["pool"]

    in_process(config_with(tmp_path, {}), pool, calls)


# -- request ids --------------------------------------------------------------------------


def test_request_ids_are_kept_when_well_formed_else_made(tmp_path: Path, pool: WorkerPool) -> None:
    config = config_with(tmp_path, {})
    kept = ["abc-1", "0f8fad5b-d9cb-469f-a165-70867728950e", "Root=1-5e1b4151:x/y+z", "x" * 128]
    replaced = ["", "x" * 129, "a b", 'a"b', "a\tb", "ä", "a;b", "a,b"]

    async def calls(client: httpx.AsyncClient) -> None:
        for given in kept:
            answer = await client.get("/livez", headers={"X-Request-ID": given})
            assert answer.headers["x-request-id"] == given
        for given in replaced:
            answer = await client.get("/livez", headers=[(b"x-request-id", given.encode())])
            assert GENERATED.fullmatch(answer.headers["x-request-id"]), given
        made = {(await client.get("/livez")).headers["x-request-id"] for _ in range(5)}
        assert len(made) == 5 and all(GENERATED.fullmatch(one) for one in made)
        for answer in (
            await client.post("/v1/mappers/nope", json={"claims": {}}),  # 404
            await client.post("/v1/evaluate", content=b"{}"),  # 415
            await client.post("/v1/evaluate", json={"snippet": "error 'x'"}),  # 422
            await client.get("/nothing"),
        ):
            assert GENERATED.fullmatch(answer.headers["x-request-id"]), answer.text
        assert REQUEST_ID.get() is None  # nothing leaks out of a request

    in_process(config, pool, calls)


def test_the_pools_log_records_carry_the_request_id(
    tmp_path: Path, pool: WorkerPool, caplog: pytest.LogCaptureFixture
) -> None:
    """The pool's records about a call (its worker recycled for another domain, killed at
    its deadline) are logged from the request's task: each carries the request's id."""
    config = config_with(tmp_path, {})
    caplog.set_level(logging.DEBUG, logger="jsonnet_worker")

    async def calls(client: httpx.AsyncClient) -> None:
        claims = {"claims": GITHUB_CLAIMS}
        mapped = await client.post("/v1/mappers/m", json=claims, headers={"X-Request-ID": "r-1"})
        assert mapped.status_code == 200
        caplog.clear()
        answer = await client.post(
            "/v1/evaluate",
            json={"snippet": LOOP, "timeout": 0.2},
            headers={"X-Request-ID": "r-timeout"},
        )
        assert answer.status_code == 504 and answer.headers["x-request-id"] == "r-timeout"

    in_process(config, pool, calls)
    caused = [r for r in caplog.records if r.name == "jsonnet_worker"]
    deadline = [r for r in caused if "deadline" in r.getMessage()]
    assert deadline, [r.getMessage() for r in caused]
    assert all(getattr(record, "request_id", None) == "r-timeout" for record in deadline)


class BrokenPool(WorkerPool):
    async def aevaluate_json(self, *args: Any, **kw: Any) -> str:
        raise RuntimeError("a bug")


def test_an_internal_error_is_500_with_the_id_and_logged_with_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_with(tmp_path, {})
    caplog.set_level(logging.ERROR, logger="jsonnet_worker.service")
    with BrokenPool(config=PoolConfig(size=1, spares=0)) as broken:

        async def calls(client: httpx.AsyncClient) -> None:
            answer = await client.post(
                "/v1/evaluate", json={"snippet": "1"}, headers={"X-Request-ID": "r-500"}
            )
            assert answer.status_code == 500 and answer.headers["x-request-id"] == "r-500"
            assert answer.json()["error"] == {
                "kind": "internal",
                "message": "internal error",
                "status": 500,
            }
            assert "a bug" not in answer.text

        in_process(config, broken, calls)
    logged = [r for r in caplog.records if "internal error on POST /v1/evaluate" in r.message]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert getattr(logged[0], "request_id", None) == "r-500"


# -- the real server: its logs, one process and several -------------------------------------


def json_records(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_real_server_hardened_and_its_log_lines_carry_request_ids(
    tmp_path: Path, workers: str
) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    config = write_config(tmp_path, {"serve": {"auth": {"bearer_token_file": str(token)}}})
    args = ("--log-format", "json", "--workers", workers)
    with running_service(config, tmp_path, *args) as running:
        url = running.base_url
        plain = httpx.post(
            f"{url}/v1/evaluate",
            content=b'{"snippet": "1"}',
            headers={"content-type": "text/plain"},
        )
        assert plain.status_code == 415
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics", headers=bearer(TOKEN)).status_code == 200
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        assert "pool" in httpx.get(f"{url}/healthz", headers=bearer(TOKEN)).json()
        answer = httpx.post(
            f"{url}/v1/evaluate",
            json={"snippet": LOOP, "timeout": 0.2},
            headers={**bearer(TOKEN), "X-Request-ID": "real-timeout"},
        )
        assert answer.status_code == 504 and answer.headers["x-request-id"] == "real-timeout"
        assert not [name for name in answer.headers if name.startswith("access-control-")]
        log = running.log()
    records = json_records(log)
    ours = [r for r in records if r.get("request_id") == "real-timeout"]
    access = [r for r in ours if r["logger"] == "uvicorn.access"]
    assert len(access) == 1 and '"POST /v1/evaluate HTTP/1.1" 504' in access[0]["message"]
    assert any("deadline" in r["message"] for r in ours if r["logger"] == "jsonnet_worker"), ours
    refused = [r for r in records if r["logger"] == "uvicorn.access" and " 415" in r["message"]]
    assert len(refused) == 1 and GENERATED.fullmatch(refused[0]["request_id"])
    startup = [r for r in records if "serving with" in r["message"]]
    assert startup and all("request_id" not in r for r in startup)  # not a request's
