"""Helpers for the service tests and benchmark: the real server in a subprocess, and a
bounded load generator over real HTTP (httpx) on 127.0.0.1.

Weak spot: the free port is found by binding port 0 and closing it, so another process could
take it before the server binds; the server then fails to start and the test says why.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import proc_stat

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def write_config(folder: Path, extra: Mapping[str, Any] | None = None) -> Path:
    """A service config in ``folder``: a pool of one, one mapper ``m`` (its file beside it),
    and the sections of ``extra`` on top."""
    (folder / "mapper.jsonnet").write_text(
        "local c = std.extVar('claims'); {identity: {traits: {email: c.email}}}"
    )
    config: dict[str, Any] = {
        "pool": {"size": 1, "spares": 0},
        "selfservice": {
            "methods": {
                "oidc": {
                    "config": {"providers": [{"id": "m", "mapper_url": "file://mapper.jsonnet"}]}
                }
            }
        },
        **(extra or {}),
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class ServiceProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict[str, Any]:
        answer = httpx.get(f"{self.base_url}/healthz", timeout=10)
        body: dict[str, Any] = answer.json()
        return body

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then wait; SIGKILL only if it does not exit in time (and say so)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the service ignored SIGTERM:\n{self.log()}") from None


@contextmanager
def running_service(
    config: Path | None,
    log_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
) -> Iterator[ServiceProcess]:
    """``python -m jsonnet_worker serve`` (with ``args``) on a free port of 127.0.0.1, ready
    when /readyz answers 200; stopped with SIGTERM at the end."""
    port = free_port()
    command = [sys.executable, "-m", "jsonnet_worker", "serve", "--port", str(port), *args]
    if config is not None:
        command += ["--config", str(config)]
    log_path = log_dir / f"service-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=None if env is None else {**os.environ, **env},
        )
    service = ServiceProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the service exited ({process.returncode}):\n{service.log()}")
            try:
                if httpx.get(f"{service.base_url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the service did not start:\n{service.log()}")
            time.sleep(0.05)
        yield service
    finally:
        if process.poll() is None:
            service.stop()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return proc_stat(pid)[0] != "Z"
    except FileNotFoundError:
        return False


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (the kernel's children lists, thread by thread:
    a process's children are listed under the thread that started them)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:  # gone meanwhile
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as listing:
                    kids = [int(kid) for kid in listing.read().split()]
            except OSError:
                continue
            found += kids
            pending += kids
    return found


# -- the load -----------------------------------------------------------------------------

GITHUB_CLAIMS = {"sub": "1", "email": "dev@example.com", "email_verified": True, "raw_claims": {}}
GITHUB_EXPECT = {"identity": {"traits": {"email": "dev@example.com"}}}
MAILER_CTX = {"recipient": "to@example.com", "template_type": "recovery_code"}


@dataclass(frozen=True)
class Call:
    """One request of the load: where, what, and what a correct answer is."""

    path: str
    body: bytes
    hostile: bool
    expect_status: int
    expect_json: Any = None


def _call(path: str, body: Any, status: int = 200, expect: Any = None) -> Call:
    return Call(path, json.dumps(body).encode(), status != 200, status, expect)


def benign_calls() -> list[Call]:
    return [
        _call("/v1/mappers/github", {"claims": GITHUB_CLAIMS}, expect=GITHUB_EXPECT),
        _call(
            "/v1/templates/http",
            {"ctx": MAILER_CTX},
            expect={
                "recipient": "to@example.com",
                "template_type": "recovery_code",
                **dict.fromkeys(
                    [
                        "to",
                        "recovery_code",
                        "recovery_url",
                        "verification_url",
                        "verification_code",
                        "subject",
                        "body",
                        "html_body",
                    ]
                ),
            },
        ),
        _call(
            "/v1/evaluate",
            {"snippet": "{sum: std.extVar('a') + std.extVar('b')}", "ext_vars": {"a": 2, "b": 3}},
            expect={"sum": 5},
        ),
    ]


def hostile_calls(max_body: int) -> list[Call]:
    loop = "local f(n) = f(n + 1) tailstrict; f(0)"
    # The snippets that fail on their own get the longest timeout a request may ask for
    # (serve.max_request_timeout), so that a loaded machine cannot turn their 422 into a 504.
    patient = 10.0
    return [
        _call("/v1/evaluate", {"snippet": loop, "timeout": 0.2}, 504),
        _call("/v1/evaluate", {"snippet": "error 'hostile'", "timeout": patient}, 422),
        _call("/v1/evaluate", {"snippet": "importstr '/etc/passwd'", "timeout": patient}, 422),
        _call(
            "/v1/evaluate",
            {"snippet": "std.makeArray(100000, function(i) i)", "timeout": patient},
            422,
        ),
        _call(
            "/v1/evaluate", {"snippet": "local f(n) = f(n + 1) + 1; f(0)", "timeout": patient}, 422
        ),
        _call("/v1/mappers/github", {"claims": "not an object"}, 400),
        Call("/v1/evaluate", b'{"snippet": ', True, 400),
        Call("/v1/evaluate", b'{"snippet": "' + b"x" * max_body + b'"}', True, 413),
    ]


@dataclass
class LoadResult:
    benign_latencies: list[float] = field(default_factory=list)
    sent: int = 0
    hostile: int = 0
    failures: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.benign_latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _load(
    base_url: str, total: int, concurrency: int, hostile_every: int, max_body: int
) -> LoadResult:
    benign, hostile = benign_calls(), hostile_calls(max_body)
    plan: list[Call] = []
    benign_cycle, hostile_cycle = itertools.cycle(benign), itertools.cycle(hostile)
    for index in range(total):
        hostile_turn = hostile_every > 0 and index % hostile_every == 0
        plan.append(next(hostile_cycle) if hostile_turn else next(benign_cycle))
    result = LoadResult(sent=len(plan), hostile=sum(call.hostile for call in plan))
    queue: asyncio.Queue[Call] = asyncio.Queue()
    for call in plan:
        queue.put_nowait(call)
    # Connections idle longer than this are not reused; the server keeps them far longer
    # (serve.keep_alive_timeout), so none is reused while the server closes it.
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=5.0
    )
    headers = {"content-type": "application/json"}

    async def client_task(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            call = queue.get_nowait()
            started = time.perf_counter()
            try:
                answer = await client.post(call.path, content=call.body, headers=headers)
            except httpx.HTTPError as exc:
                if not call.hostile:
                    result.failures.append(f"{call.path}: {type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - started
            if answer.status_code != call.expect_status:
                result.failures.append(
                    f"{call.path}: {answer.status_code} (wanted {call.expect_status}) "
                    f"{answer.text[:200]}"
                )
            elif call.hostile:
                if "error" not in answer.json():
                    result.failures.append(f"{call.path}: no error body: {answer.text[:200]}")
            elif answer.json() != call.expect_json:
                result.failures.append(f"{call.path}: wrong answer {answer.text[:200]}")
            else:
                result.benign_latencies.append(elapsed)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:
        await asyncio.gather(*(client_task(client) for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - started
    return result


def run_load(
    base_url: str,
    total: int = 5000,
    concurrency: int = 32,
    hostile_every: int = 25,
    max_body: int = 262144,
    time_limit: float = 600.0,
) -> LoadResult:
    """Send ``total`` requests, ``concurrency`` at a time, every ``hostile_every``-th one
    hostile (0: none); stops (with a TimeoutError) after ``time_limit`` seconds."""
    return asyncio.run(
        asyncio.wait_for(_load(base_url, total, concurrency, hostile_every, max_body), time_limit)
    )


# -- serve --workers N: its log, its server processes, their metrics --------------------

READY_TIMEOUT = 60.0
MAX_CONNECTIONS = 200  # fresh connections tried before giving up on reaching every process


def wait_for_log(service: ServiceProcess, text: str) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    while text not in (log := service.log()):
        assert service.process.poll() is None, f"the service exited:\n{log}"
        assert time.monotonic() < deadline, f"never logged {text!r}:\n{log}"
        time.sleep(0.05)
    return log


def server_pids_and_dir(log: str) -> tuple[set[int], Path]:
    found = re.search(r"server processes on one socket \(pids ([\d ]+)\), metrics in (\S+)", log)
    assert found, log
    return {int(pid) for pid in found.group(1).split()}, Path(found.group(2))


@contextmanager
def pinned_clients(base_url: str, wanted: set[int]) -> Iterator[dict[int, httpx.Client]]:
    """One keep-alive connection to each server process: a connection stays with the process
    that accepted it, so what is sent on it is served there (its /healthz says which)."""
    found: dict[int, httpx.Client] = {}
    try:
        for _ in range(MAX_CONNECTIONS):
            client = httpx.Client(base_url=base_url, limits=httpx.Limits(max_connections=1))
            pid = client.get("/healthz").json()["server"]["pid"]
            if pid in found:
                client.close()
            else:
                found[pid] = client
            if set(found) == wanted:
                break
        assert set(found) == wanted, f"reached {sorted(found)} of {sorted(wanted)}"
        yield found
    finally:
        for client in found.values():
            client.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
