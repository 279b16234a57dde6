"""The service's operations: probes, the sandbox verdict, the bearer token, logging, tenants,
the start-up check and a shutdown overrun; the real server on 127.0.0.1 where it matters."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import DATA
from jsonnet_worker import PoolConfig, WorkerPool
from jsonnet_worker.service import create_app, load_config
from jsonnet_worker.service._server import warn_if_exposed
from servicekit import (
    GITHUB_CLAIMS,
    GITHUB_EXPECT,
    ServiceProcess,
    running_service,
    write_config,
)

CONFIG = DATA / "service" / "config.yaml"
SLOW = (
    # CPU only (a flat heap): std.range(1, 2e7) once took 1 GiB and ended in
    # MemoryLimitExceeded before the shutdown it was to outlast.
    "local depth(i) = if i == 0 then 0 else 1 + depth(i - 1); "
    "std.foldl(function(a, b) a + depth(400), std.range(1, {n}), 0)"
)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with running_service(CONFIG, tmp_path_factory.mktemp("ops")) as running:
        yield running


def test_probes_and_the_sandbox_verdict(service: ServiceProcess) -> None:
    assert httpx.get(f"{service.base_url}/livez").json() == {"status": "ok"}
    assert httpx.get(f"{service.base_url}/readyz").json() == {"status": "ready"}
    health = service.health()
    assert health["sandbox"]["workers"]["enforced"] is True
    complete = health["sandbox"]["workers"]["complete"]
    assert health["status"] == ("ok" if complete else "degraded")
    assert (health["reasons"] == []) == complete
    log = service.log()
    verdict = "sandbox: every layer active" if complete else "sandbox: degraded: "
    assert log.count(verdict) == 1, log  # the start-up log line: the same verdict, once


def test_bearer_token_json_logs_and_access_log(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    config = write_config(tmp_path, {})
    env = {"JSONNET_WORKER_SERVE_AUTH_BEARER_TOKEN_FILE": str(token)}  # from the environment
    with running_service(config, tmp_path, "--log-format", "json", env=env) as running:
        url = f"{running.base_url}/v1/mappers/m"
        body = {"claims": {"email": "a@example.com"}}
        refused = httpx.post(url, json=body)
        assert refused.status_code == 401
        assert refused.json()["error"] == {
            "kind": "unauthorized",
            "message": "a valid bearer token is required",
            "status": 401,
        }
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        accepted = httpx.post(url, json=body, headers={"Authorization": "Bearer s3cret-token"})
        assert accepted.json() == {"identity": {"traits": {"email": "a@example.com"}}}
        health = httpx.get(f"{running.base_url}/healthz")  # no token: the status alone
        assert health.status_code == 200 and set(health.json()) == {"status"}
        log = running.log()
    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(record) for record in records)
    assert all(record["time"].endswith("Z") for record in records)
    access = [r for r in records if r["logger"] == "uvicorn.access"]
    assert any('"POST /v1/mappers/m HTTP/1.1" 401' in r["message"] for r in access), access
    assert not any("s3cret-token" in line for line in log.splitlines())


def test_no_access_log(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    with running_service(config, tmp_path, "--no-access-log") as running:
        claims = {"claims": {"email": "a@example.com"}}
        assert httpx.post(f"{running.base_url}/v1/mappers/m", json=claims).status_code == 200
        log = running.log()
    assert "POST /v1/mappers/m" not in log
    assert " INFO jsonnet_worker.service: serving with 1 workers; sandbox: " in log  # text


def test_exposed_adhoc_evaluation_without_a_token_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(write_config(tmp_path, {}), environ={})
    caplog.set_level(logging.WARNING, logger="jsonnet_worker.service")
    warn_if_exposed(config, "127.0.0.1")
    assert not caplog.records
    warn_if_exposed(config, "0.0.0.0")
    assert "anyone who reaches the port can run snippets" in caplog.text


def test_shutdown_overrun_answers_the_json_envelope(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"serve": {"shutdown_timeout": 1, "max_request_timeout": 30}})
    with running_service(config, tmp_path) as running:
        url = f"{running.base_url}/v1/evaluate"
        # several seconds of CPU: still running when the 1 s shutdown timeout is overrun
        body = {"snippet": SLOW.format(n=1_000_000), "timeout": 30}
        with concurrent.futures.ThreadPoolExecutor(1) as threads:
            call = threads.submit(httpx.post, url, json=body, timeout=60)
            deadline = time.monotonic() + 10
            while running.health()["pool"]["busy"] < 1:
                assert time.monotonic() < deadline, "the request never reached the pool"
                time.sleep(0.01)
            running.process.send_signal(signal.SIGTERM)
            answer = call.result()
        running.process.wait(30)
        log = running.log()
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["error"]["kind"] == "unavailable"
    assert "Traceback" not in log and "CancelledError" not in log, log


def test_an_idle_connection_outlives_uvicorns_old_keep_alive(tmp_path: Path) -> None:
    """The load test's ReadError (1 run in 3): uvicorn closed connections idle for 5 s, the
    same 5 s httpx keeps them for reuse, so a request sent on a connection just as the server
    closed it was reset. The server now keeps an idle connection longer than clients keep
    theirs; a connection idle past the old 5 s still answers its next request."""
    config = write_config(tmp_path, {})
    assert load_config(config, environ={}).keep_alive_timeout > 90  # Go's net/http keeps 90 s
    request = (
        b"POST /v1/evaluate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 15\r\n\r\n{"snippet":"1"}'
    )
    with running_service(config, tmp_path) as running:
        port = int(running.base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            for _ in range(2):
                connection.sendall(request)
                answer = b""
                while not answer.endswith(b"\r\n\r\n1\n"):  # the whole answer, "1\n"
                    chunk = connection.recv(4096)
                    assert chunk, f"the server closed the connection: {answer!r}"
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 200 ")
                time.sleep(6)  # idle past uvicorn's default keep-alive timeout


# -- tenants: the request's field, in two namespaces ------------------------------------------


class RecordingPool(WorkerPool):
    """A real pool that records the tenant of each call."""

    tenants: list[str | None]

    def __enter__(self) -> RecordingPool:
        super().__enter__()
        self.tenants = []
        return self

    async def aevaluate_json(self, *args: Any, tenant: str | None = None, **kw: Any) -> str:
        self.tenants.append(tenant)
        return await super().aevaluate_json(*args, tenant=tenant, **kw)


def in_process(app: Any) -> httpx.AsyncClient:
    """An HTTP client on the app itself (a given pool: the app serves without a lifespan)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")


def test_tenants_are_passed_in_two_namespaces(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, {}), environ={})

    async def calls(client: httpx.AsyncClient) -> None:
        claims = {"claims": GITHUB_CLAIMS}
        assert (await client.post("/v1/mappers/m", json=claims)).status_code == 200
        tenant_call = await client.post("/v1/mappers/m", json={**claims, "tenant": "t1"})
        assert tenant_call.json() == GITHUB_EXPECT
        assert (await client.post("/v1/evaluate", json={"snippet": "1"})).json() == 1
        adhoc = await client.post("/v1/evaluate", json={"snippet": "2", "tenant": "t1"})
        assert adhoc.json() == 2
        for bad in ("", 7, "x" * 201):
            answer = await client.post("/v1/evaluate", json={"snippet": "1", "tenant": bad})
            assert answer.status_code == 400 and "tenant" in answer.json()["error"]["message"]

    with RecordingPool(config=PoolConfig(size=1, spares=0)) as pool:

        async def main() -> None:
            async with in_process(create_app(config, pool=pool)) as client:
                await calls(client)

        asyncio.run(main())
    assert pool.tenants == ["config", "config:t1", "adhoc", "adhoc:t1"]


def test_adhoc_and_configured_snippets_never_share_a_worker(tmp_path: Path) -> None:
    """Needs POOL's tenant domains: with one worker and no spare, the worker that served the
    mapper is recycled (a new process) before it runs an ad-hoc snippet."""
    config = load_config(write_config(tmp_path, {}), environ={})
    with WorkerPool(config=PoolConfig(size=1, spares=0)) as pool:

        async def main() -> tuple[set[int], set[int]]:
            async with in_process(create_app(config, pool=pool)) as client:
                mapped = await client.post("/v1/mappers/m", json={"claims": GITHUB_CLAIMS})
                assert mapped.status_code == 200
                served_mapper = set(pool.stats().worker_pids)
                assert (await client.post("/v1/evaluate", json={"snippet": "1"})).json() == 1
                return served_mapper, set(pool.stats().worker_pids)

        served_mapper, served_adhoc = asyncio.run(main())
    assert served_mapper.isdisjoint(served_adhoc)


def test_a_snippet_that_does_not_check_stops_the_start(tmp_path: Path) -> None:
    """Needs POOL's acheck and ENGINE's check action."""
    config = write_config(tmp_path, {})
    (tmp_path / "mapper.jsonnet").write_text("{\n  a: ,\n}\n")
    with pytest.raises(AssertionError, match=r"exited \(3\)[\s\S]*mapper 'm'[\s\S]*mapper"):
        with running_service(config, tmp_path):
            pass
