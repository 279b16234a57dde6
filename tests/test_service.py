"""The reference service (``jsonnet-worker serve``): the real server started with uvicorn on
127.0.0.1 in a subprocess, called over real HTTP with httpx."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import jsonnet_worker
from conftest import DATA, load_cases
from servicekit import GITHUB_CLAIMS, GITHUB_EXPECT, ServiceProcess, pid_alive, running_service

CONFIG = DATA / "service" / "config.yaml"
MAX_BODY = 262144
JSON = {"content-type": "application/json"}  # what httpx's json= sends; content= sends none
# About half a second of go-jsonnet work, and little memory: a request that is "in flight".
SLOW = "std.foldl(function(a, b) a + b, std.range(1, {n}), 0)"
SLOW_N = 400000


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with running_service(CONFIG, tmp_path_factory.mktemp("service")) as running:
        yield running


@pytest.fixture(scope="module")
def client(service: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.base_url, timeout=30) as shared:
        yield shared


def error_of(answer: httpx.Response, status: int, kind: str) -> str:
    """Assert the JSON error shape; return its message."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.json()["error"]
    assert error["kind"] == kind and error["status"] == status, error
    assert "Traceback" not in answer.text and 'File "' not in answer.text
    message: str = error["message"]
    return message


# -- /v1/mappers and /v1/templates: Kratos' snippets as Kratos calls them -------------------

ENDPOINTS = {
    "kratos/oidc-github.jsonnet": "/v1/mappers/github",
    "kratos/oidc-facebook.jsonnet": "/v1/mappers/facebook",
    "kratos/oidc-linkedin.jsonnet": "/v1/mappers/linkedin",
    "kratos/oidc-hydra.jsonnet": "/v1/mappers/hydra",
    "kratos/oidc-invalid-mapper.jsonnet": "/v1/mappers/invalid",
    "kratos/oidc-missing-subject.jsonnet": "/v1/mappers/missing-subject",
    "kratos/courier-http-mailer.jsonnet": "/v1/templates/http",
    "kratos/courier-http-twilio.jsonnet": "/v1/templates/sms",
    "kratos/webhook-body.jsonnet": "/v1/templates/registration-after-0",
    "kratos/webhook-test-body.jsonnet": "/v1/templates/test-body",
    "kratos/webhook-bad-template.jsonnet": "/v1/templates/bad-template",
}
CASES = [case for case in load_cases() if case["file"] in ENDPOINTS]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['file']}-{i}" for i, c in enumerate(CASES)])
def test_kratos_snippets_through_the_api(client: httpx.Client, case: dict[str, Any]) -> None:
    path = ENDPOINTS[case["file"]]
    if path.startswith("/v1/mappers/"):
        body = {
            key: case["ext_vars"][key] for key in ("claims", "identity") if key in case["ext_vars"]
        }
    else:
        body = {"ctx": case["tla_vars"]["ctx"]}
    answer = client.post(path, json=body)
    if "expect" in case:
        assert answer.status_code == 200, answer.text
        assert answer.json() == case["expect"]
    else:
        assert case["error"].lower() in error_of(answer, 422, "jsonnet_error").lower()


def test_mapper_and_template_errors(client: httpx.Client) -> None:
    assert "mapper named 'nope'" in error_of(
        client.post("/v1/mappers/nope", json={"claims": {}}), 404, "unknown_mapper"
    )
    error_of(client.post("/v1/templates/nope", json={"ctx": {}}), 404, "unknown_template")
    error_of(client.post("/v1/mappers/github", json={}), 400, "bad_request")
    error_of(client.post("/v1/mappers/github", json={"claims": [1]}), 400, "bad_request")
    error_of(
        client.post("/v1/mappers/github", json={"claims": {}, "identity": "x"}), 400, "bad_request"
    )
    error_of(client.post("/v1/templates/sms", json={"ctx": "x"}), 400, "bad_request")
    assert "unknown fields ['extra']" in error_of(
        client.post("/v1/templates/sms", json={"ctx": {}, "extra": 1}), 400, "bad_request"
    )


# -- /v1/evaluate -------------------------------------------------------------------------


def test_evaluate_all_variable_kinds(client: httpx.Client) -> None:
    answer = client.post(
        "/v1/evaluate",
        json={
            "snippet": "function(t, c) {e: std.extVar('e'), ec: std.extVar('ec'), t: t, c: c}",
            "ext_vars": {"e": "text"},
            "ext_codes": {"ec": "1 + 1"},
            "tla_vars": {"t": {"n": [1, None, True]}},
            "tla_codes": {"c": "std.length('abc')"},
            "timeout": 5,
        },
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"e": "text", "ec": 2, "t": {"n": [1, None, True]}, "c": 3}


def test_evaluate_jsonnet_errors_are_422_with_the_message(client: httpx.Client) -> None:
    message = error_of(
        client.post("/v1/evaluate", json={"snippet": "error 'boom'"}), 422, "jsonnet_error"
    )
    assert "boom" in message
    message = error_of(client.post("/v1/evaluate", json={"snippet": "{"}), 422, "jsonnet_error")
    assert "snippet.jsonnet" in message
    message = error_of(
        client.post("/v1/evaluate", json={"snippet": "importstr '/etc/passwd'"}),
        422,
        "jsonnet_error",
    )
    assert "root:" not in message
    error_of(
        client.post("/v1/evaluate", json={"snippet": "std.makeArray(100000, function(i) i)"}),
        422,
        "output_too_large",
    )


REFUSED_BY_THE_POOL = [
    b'{"snippet": "1", "ext_vars": {"a": NaN}}',
    b'{"snippet": "1", "ext_vars": {"a": 1}, "ext_codes": {"a": "1"}}',
]
BAD_BODIES = [
    b"",
    b"{",
    b"[1, 2]",
    b'"snippet"',
    b"\xff\xfe",
    b"[" * 100000,
    b'{"snippet": 1}',
    b'{"snippet": "1", "unknown": 1}',
    b'{"snippet": "1", "ext_vars": [1]}',
    b'{"snippet": "1", "ext_codes": {"a": 1}}',
    b'{"snippet": "1", "timeout": 0}',
    b'{"snippet": "1", "timeout": -1}',
    b'{"snippet": "1", "timeout": 11}',
    b'{"snippet": "1", "timeout": true}',
    b'{"snippet": "1", "timeout": "1"}',
]


def test_bad_input_is_400_and_costs_no_worker(
    service: ServiceProcess, client: httpx.Client
) -> None:
    before = service.health()["pool"]
    for body in BAD_BODIES:
        error_of(client.post("/v1/evaluate", content=body, headers=JSON), 400, "bad_request")
    for body in REFUSED_BY_THE_POOL:  # the library's InvalidArgument: its own kind
        error_of(client.post("/v1/evaluate", content=body, headers=JSON), 400, "invalid_argument")
    after = service.health()["pool"]
    assert after["worker_pids"] == before["worker_pids"]
    assert after["respawns"] == before["respawns"]
    assert client.post("/v1/evaluate", json={"snippet": "1 + 1"}).json() == 2


def test_body_size_limit_is_413(client: httpx.Client) -> None:
    big = json.dumps({"snippet": "'" + "x" * MAX_BODY + "'"}).encode()
    assert "262144" in error_of(
        client.post("/v1/evaluate", content=big, headers=JSON), 413, "too_large"
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"snippet": "\''
        for _ in range(MAX_BODY // 4096 + 2):
            yield b"x" * 4096
        yield b"'\"}"

    error_of(client.post("/v1/evaluate", content=chunks(), headers=JSON), 413, "too_large")
    # Just under the limit is fine.
    fits = json.dumps({"snippet": "std.length('" + "x" * (MAX_BODY - 100) + "')"}).encode()
    assert len(fits) <= MAX_BODY
    assert client.post("/v1/evaluate", content=fits, headers=JSON).json() == MAX_BODY - 100


def test_timeout_is_504_and_the_next_call_succeeds(
    service: ServiceProcess, client: httpx.Client
) -> None:
    before = service.health()["pool"]
    loop = "local f(n) = f(n + 1) tailstrict; f(0)"
    message = error_of(
        client.post("/v1/evaluate", json={"snippet": loop, "timeout": 0.2}), 504, "timeout"
    )
    assert "0.2 s" in message
    assert client.post("/v1/mappers/github", json={"claims": GITHUB_CLAIMS}).json() == GITHUB_EXPECT
    deadline = time.monotonic() + 10
    while (after := service.health()["pool"])["alive"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after["timeouts"] == before["timeouts"] + 1
    assert after["alive"] == 2 and after["respawns"] >= before["respawns"] + 1


def test_unknown_route_and_method(client: httpx.Client) -> None:
    error_of(client.get("/v1/nothing"), 404, "not_found")
    answer = client.get("/v1/evaluate")
    error_of(answer, 405, "method_not_allowed")
    assert answer.headers["allow"] == "POST"


# -- /healthz, /metrics, /openapi.json ----------------------------------------------------


def test_healthz(client: httpx.Client) -> None:
    answer = client.get("/healthz")
    assert answer.status_code == 200
    health = answer.json()
    assert health["status"] == "ok"
    assert health["pool"]["size"] == 2 and health["pool"]["alive"] >= 1
    assert all(pid_alive(pid) for pid in health["pool"]["worker_pids"])
    workers = health["sandbox"]["workers"]
    assert workers["enforced"] is True and "Landlock ABI" in workers["summary"]
    host = health["sandbox"]["host"]
    assert host["applied"] is True and host["disabled"] is False and host["skipped"] == 0
    assert "Landlock ABI" in host["summary"] and host["allowed"]["exec_paths"] >= 1
    assert health["mappers"] == sorted(
        ["facebook", "github", "hydra", "invalid", "linkedin", "missing-subject"]
    )
    assert health["templates"] == sorted(
        ["bad-template", "http", "registration-after-0", "sms", "test-body"]
    )


def metric_values(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            values[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return values


def test_metrics_count_what_happened(client: httpx.Client) -> None:
    before = metric_values(client)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    client.post("/v1/mappers/github", json={"claims": GITHUB_CLAIMS})
    client.post("/v1/evaluate", json={"snippet": "error 'x'"})
    client.post(
        "/v1/evaluate", json={"snippet": "local f(n) = f(n + 1) tailstrict; f(0)", "timeout": 0.1}
    )
    client.post("/v1/evaluate", content=b"{not json", headers=JSON)
    after = metric_values(client)
    # one vocabulary: the library's Error.kind in every label, every outcome counted
    assert delta("jsonnet_worker_evaluations_total", endpoint="mapper", outcome="ok") == 1
    for outcome in ("jsonnet_error", "timeout", "bad_request"):
        assert delta("jsonnet_worker_evaluations_total", endpoint="evaluate", outcome=outcome) == 1
    assert delta("jsonnet_worker_errors_total", kind="jsonnet_error") == 1
    assert delta("jsonnet_worker_errors_total", kind="timeout") == 1
    assert ("jsonnet_worker_timeouts_total", ()) not in after  # errors_total{kind} says it
    assert delta("jsonnet_worker_http_requests_total", endpoint="evaluate", status="400") == 1
    assert after["jsonnet_worker_sandbox_enforced", ()] == 1
    assert after["jsonnet_worker_sandbox_complete", ()] in (0, 1)
    build = [key for key in after if key[0] == "jsonnet_worker_build_info"]
    assert len(build) == 1 and dict(build[0][1])["version"] == jsonnet_worker.__version__
    assert delta("jsonnet_worker_http_requests_total", endpoint="mapper", status="200") == 1
    assert delta("jsonnet_worker_http_requests_total", endpoint="evaluate", status="422") == 1
    assert delta("jsonnet_worker_http_requests_total", endpoint="evaluate", status="504") == 1
    assert delta("jsonnet_worker_request_duration_seconds_count", endpoint="evaluate") == 3
    assert (
        delta("jsonnet_worker_request_duration_seconds_bucket", endpoint="mapper", le="+Inf") == 1
    )
    for name in ("crashes_total", "respawns_total", "queue_depth", "pool_size"):
        assert (f"jsonnet_worker_{name}", ()) in after
    assert after["jsonnet_worker_pool_size", ()] == 2
    assert ("jsonnet_worker_workers", (("state", "idle"),)) in after


def test_metrics_per_tenant_with_bounded_cardinality(client: httpx.Client) -> None:
    """Per-tenant series for the pool's tracked tenants and "other": 40 tenant names make
    at most 32 + 1 label values, and the newest tenant is one of them."""
    for index in range(40):
        client.post("/v1/evaluate", json={"snippet": "1", "tenant": f"t{index}"})
    client.post("/v1/evaluate", json={"snippet": "error 'x'", "tenant": "t39"})
    after = metric_values(client)
    labels = {
        dict(labels)["tenant"]
        for name, labels in after
        if name.startswith("jsonnet_worker_tenant_")
    }
    assert len(labels) <= 33 and "other" in labels
    newest = (("tenant", "adhoc:t39"),)
    assert after["jsonnet_worker_tenant_calls_total", newest] == 2
    errors = (("kind", "jsonnet_error"), ("tenant", "adhoc:t39"))
    assert after["jsonnet_worker_tenant_errors_total", errors] == 1
    assert ("jsonnet_worker_tenant_cpu_seconds_total", newest) in after
    assert after["jsonnet_worker_tenant_run_time_seconds_count", newest] == 2
    quantile = (("quantile", "0.99"), ("tenant", "adhoc:t39"))
    assert after["jsonnet_worker_tenant_queue_wait_seconds", quantile] >= 0.0


def test_openapi_describes_every_route_and_error(
    service: ServiceProcess, client: httpx.Client
) -> None:
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {
        "/v1/evaluate",
        "/v1/mappers/{name}",
        "/v1/templates/{name}",
        "/livez",
        "/readyz",
        "/healthz",
        "/metrics",
        "/openapi.json",
    }
    evaluate = document["paths"]["/v1/evaluate"]["post"]["responses"]
    assert {"200", "400", "403", "413", "415", "422", "429", "502", "503", "504"} <= set(evaluate)
    assert "401" in document["paths"]["/metrics"]["get"]["responses"]
    mapper = document["paths"]["/v1/mappers/{name}"]["post"]
    assert "404" in mapper["responses"] and mapper["requestBody"]["content"]["application/json"]


# -- a second service: ad-hoc snippets off, one worker, a queue of one --------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    folder = tmp_path_factory.mktemp("limited")
    (folder / "slow.jsonnet").write_text(
        "local c = std.extVar('claims'); {n: std.foldl(function(a, b) a + b, std.range(1, c.n), 0)}"
    )
    config = {
        "serve": {"evaluate": {"enabled": False}, "max_request_timeout": 10},
        "security": {"landlock": {"disabled": True}},
        "pool": {"size": 1, "queue_limit": 1, "queue_timeout": 0.3, "timeout": 10.0},
        "selfservice": {
            "methods": {
                "oidc": {
                    "config": {"providers": [{"id": "slow", "mapper_url": "file://slow.jsonnet"}]}
                }
            }
        },
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with running_service(folder / "config.yaml", folder) as running:
        yield running


def wait_busy(
    service: ServiceProcess, busy: int, queued: int = 0, in_pool: int = 0
) -> dict[str, Any]:
    """Until ``busy`` workers are busy, ``queued`` calls wait in the pool's queue and
    ``in_pool`` calls are in the pool (busy and waiting together)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pool: dict[str, Any] = service.health()["pool"]
        held = pool["busy"] + pool["queue_depth"]
        if pool["busy"] >= busy and pool["queue_depth"] >= queued and held >= in_pool:
            return pool
        time.sleep(0.01)
    raise AssertionError("the slow requests never reached the pool")


def test_disabled_evaluate_is_403(limited: ServiceProcess) -> None:
    answer = httpx.post(f"{limited.base_url}/v1/evaluate", json={"snippet": "1"})
    error_of(answer, 403, "evaluate_disabled")
    assert limited.health()["evaluate_enabled"] is False


def test_host_sandbox_opt_out_is_reported(limited: ServiceProcess) -> None:
    host = limited.health()["sandbox"]["host"]
    assert host["applied"] is False and host["disabled"] is True
    assert "security.landlock.disabled" in host["reason"]
    assert "Landlock filesystem sandbox is not active" in limited.log()


def test_start_order_pool_then_sandbox_then_listen(service: ServiceProcess) -> None:
    log = service.log()
    collected = log.index("Landlock: granting ")  # the path lists themselves are DEBUG
    order = [
        log.index("Waiting for application startup"),  # the pool starts in the lifespan
        collected,
        log.index("Landlock filesystem sandbox is active.", collected),  # the host's layer
        log.index("Uvicorn running on"),
    ]
    assert order == sorted(order), log


def test_overloaded_is_503_and_a_full_tenant_queue_429_with_retry_after(
    limited: ServiceProcess,
) -> None:
    url = f"{limited.base_url}/v1/mappers/slow"
    with concurrent.futures.ThreadPoolExecutor(4) as threads:
        slow = threads.submit(httpx.post, url, json={"claims": {"n": SLOW_N * 2}}, timeout=30)
        wait_busy(limited, 1)
        quick = [
            threads.submit(httpx.post, url, json={"claims": {"n": 1}}, timeout=30) for _ in range(3)
        ]
        answers = [future.result() for future in quick]
        assert slow.result().status_code == 200
    # queue_limit=1: one quick call waits (503 at its queue timeout, or served), the others
    # find their tenant's queue full (429).
    full_queue = [answer for answer in answers if answer.status_code == 429]
    assert full_queue, [answer.text for answer in answers]
    for answer in full_queue:
        assert "queue_limit=1" in error_of(answer, 429, "tenant_overloaded")
        assert answer.headers["retry-after"] == "1"
    for answer in answers:
        if answer.status_code == 503:
            error_of(answer, 503, "overloaded")
            assert answer.headers["retry-after"] == "1"
    assert httpx.post(url, json={"claims": {"n": 3}}).json() == {"n": 6}


def test_worker_killed_mid_call_is_502_and_replaced(limited: ServiceProcess) -> None:
    url = f"{limited.base_url}/v1/mappers/slow"
    with concurrent.futures.ThreadPoolExecutor(1) as threads:
        slow = threads.submit(httpx.post, url, json={"claims": {"n": SLOW_N * 4}}, timeout=30)
        pool = wait_busy(limited, 1)
        for pid in pool["worker_pids"]:
            os.kill(pid, signal.SIGKILL)
        message = error_of(slow.result(), 502, "worker_crashed")
    assert "SIGKILL" in message or "signal 9" in message or "killed" in message
    killed = set(pool["worker_pids"])  # the spare too: wait until every one is replaced
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = limited.health()["pool"]
        if now["alive"] >= 1 and not killed & set(now["worker_pids"]):
            break
        time.sleep(0.05)
    assert httpx.post(url, json={"claims": {"n": 2}}).json() == {"n": 3}


# -- start and stop -----------------------------------------------------------------------


def test_embedded_default_config(tmp_path: Path) -> None:
    with running_service(None, tmp_path) as running:
        claims = {"sub": "1", "email": "a@example.com", "email_verified": True}
        answer = httpx.post(f"{running.base_url}/v1/mappers/github", json={"claims": claims})
        assert answer.json() == {"identity": {"traits": {"email": "a@example.com"}}}
        ctx = {"recipient": "+1555", "template_data": {"code": "042"}}
        answer = httpx.post(f"{running.base_url}/v1/templates/sms", json={"ctx": ctx})
        assert answer.json() == {"To": "+1555", "Body": "Your code is: 042"}
        health = running.health()
        assert health["mappers"] == ["github", "google"]
        assert health["templates"] == ["registration-audit", "sms"]


def test_bad_config_exits_before_listening(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("pool:\n  size: 0\n")
    with pytest.raises(AssertionError, match=r"exited \(2\)[\s\S]*pool.size"):
        with running_service(config, tmp_path):
            pass


def test_sigterm_lets_requests_in_flight_finish_then_reaps_workers(tmp_path: Path) -> None:
    with running_service(CONFIG, tmp_path) as running:
        pids = running.health()["pool"]["worker_pids"]
        assert pids and all(pid_alive(pid) for pid in pids)
        url = f"{running.base_url}/v1/evaluate"
        # CPU only, about a second each: long enough that all four requests are in the
        # pool (two running, two queued) before the signal, however the threads start.
        snippet = (
            "local d(i) = if i == 0 then 0 else 1 + d(i - 1); "
            "std.foldl(function(a, b) a + d(400), std.range(1, 2000), 0)"
        )
        expected = 400 * 2000
        with concurrent.futures.ThreadPoolExecutor(4) as threads:
            calls = [
                threads.submit(
                    httpx.post, url, json={"snippet": snippet, "timeout": 10}, timeout=60
                )
                for _ in range(4)
            ]
            # All four in the pool, running or queued, before the signal (a request still
            # connecting when SIGTERM lands is refused, as it should be). How many run at
            # once is the pool's business: the start-up check's worker stays warm for its
            # own domain for a second (state.RESERVE_WINDOW) while the ad-hoc calls wait.
            wait_busy(running, 1, in_pool=4)
            running.process.send_signal(signal.SIGTERM)
            answers = [call.result() for call in calls]
        assert [answer.status_code for answer in answers] == [200] * 4, [a.text for a in answers]
        assert all(answer.json() == expected for answer in answers)
        # uvicorn re-raises the SIGTERM it caught once shut down: the conventional status.
        assert running.process.wait(30) == -signal.SIGTERM
        assert not any(pid_alive(pid) for pid in pids)
        log = running.log()
        assert "pool closed, workers reaped" in log
        assert "Traceback" not in log
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{running.base_url}/healthz", timeout=2)
