"""Each call measured, on a real pool: ``last_call()`` on both call paths (successes,
errors, a timeout's CPU, a call refused in the queue), ``stats().tenants``, and the
OpenTelemetry attributes on the caller's span (the SDK's tracer, spans kept in memory)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import jsonnet_worker
from jsonnet_worker import (
    CallInfo,
    EvaluationTimeout,
    JsonnetError,
    Overloaded,
    WorkerPool,
    last_call,
)

# About 20-100 ms of CPU in the worker (go-jsonnet), far over a light call's.
BUSY = "std.foldl(function(a, b) a + b, std.range(1, 300000), 0)"
LOOP = (  # seconds of CPU, a flat heap (tests/test_pool.py's HEAVY_GO)
    "local depth(i) = if i == 0 then 0 else 1 + depth(i - 1); "
    "std.foldl(function(a, b) a + depth(400), std.range(1, 1000000), 0)"
)


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    # No interactive budget: these tests read the worker that served a call afterwards, and
    # a call past the budget has its worker demoted and then recycled.
    with WorkerPool(2, engine="go", timeout=5.0, interactive_budget=None) as shared:
        yield shared


def test_last_call_on_the_blocking_path(pool: WorkerPool) -> None:
    assert pool.evaluate(BUSY, tenant="acme") == sum(range(1, 300001))
    info = last_call()
    assert isinstance(info, CallInfo)
    assert info.tenant == "acme"
    assert info.worker_pid in pool.stats().worker_pids
    assert info.error is None
    assert info.queue_wait >= 0.0
    assert info.run_time > 0.0
    assert info.worker_cpu > 0.0  # the CPU clock's resolution is far finer than this call


def test_last_call_is_per_thread(pool: WorkerPool) -> None:
    pool.evaluate("1", tenant="mine")
    seen: list[CallInfo | None] = []
    thread = threading.Thread(target=lambda: seen.append(last_call()))
    thread.start()
    thread.join()
    assert seen == [None]  # a thread that made no call sees none
    mine = last_call()
    assert mine is not None and mine.tenant == "mine"


def test_last_call_on_the_asyncio_path_per_task(pool: WorkerPool) -> None:
    async def one(tenant: str) -> CallInfo | None:
        await pool.aevaluate(BUSY, tenant=tenant)
        return last_call()

    async def main() -> list[CallInfo | None]:
        return list(await asyncio.gather(one("left"), one("right")))

    infos = asyncio.run(main())
    assert [i.tenant if i else None for i in infos] == ["left", "right"]
    for info in infos:
        assert info is not None and info.worker_cpu > 0.0 and info.worker_pid is not None


def test_an_error_is_measured_too(pool: WorkerPool) -> None:
    with pytest.raises(JsonnetError):
        pool.evaluate("error 'no'", tenant="failing")
    info = last_call()
    assert info is not None
    assert (info.tenant, info.error) == ("failing", "jsonnet_error")
    assert info.worker_pid is not None

    async def main() -> CallInfo | None:
        with pytest.raises(JsonnetError):
            await pool.aevaluate("error 'no'", tenant="failing-async")
        return last_call()

    info = asyncio.run(main())
    assert info is not None and info.error == "jsonnet_error"


def test_a_timeout_charges_its_cpu_to_its_tenant() -> None:
    with WorkerPool(1, engine="go", timeout=0.3, spares=0) as small:
        with pytest.raises(EvaluationTimeout):
            small.evaluate(LOOP, tenant="looper")
        info = last_call()
        assert info is not None and info.error == "timeout"
        assert info.worker_cpu > 0.0  # read before the kill
        (looper,) = small.stats().tenants
        assert (looper.tenant, looper.calls, looper.errors) == ("looper", 1, {"timeout": 1})
        assert looper.cpu_seconds == pytest.approx(info.worker_cpu)


def test_a_call_refused_in_the_queue_is_counted_without_a_worker() -> None:
    with WorkerPool(1, engine="go", queue_timeout=0.05, spares=0) as small:

        def hold() -> None:
            with pytest.raises(EvaluationTimeout):
                small.evaluate(LOOP, tenant="late", timeout=1.0)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            with pytest.raises(Overloaded):
                while True:  # until the holder has the worker and this call must queue
                    small.evaluate("1", tenant="late")
        finally:
            holder.join()
        info = last_call()
        assert info is not None
        assert (info.tenant, info.error, info.worker_pid, info.run_time) == (
            "late",
            "overloaded",
            None,
            0.0,
        )
        (late,) = small.stats().tenants
        assert late.errors == {"overloaded": 1, "timeout": 1}
        assert late.calls == late.ran + 1  # the refused call has no queue or run sample


def test_stats_tenants_most_cpu_first(pool: WorkerPool) -> None:
    # No interactive budget: a demoted call could starve on a loaded machine (SCHED_IDLE),
    # and this test is about the accounting, not the demotion.
    with WorkerPool(2, engine="go", interactive_budget=None) as fresh:
        for _ in range(3):
            fresh.evaluate(BUSY, tenant="heavy")
        fresh.evaluate("1", tenant="light")
        fresh.evaluate("1")
        tenants = fresh.stats().tenants
    heavy = tenants[0]
    assert heavy.tenant == "heavy"
    assert {t.tenant for t in tenants} == {"heavy", "light", None}
    assert (heavy.calls, heavy.ran, heavy.errors, heavy.other) == (3, 3, {}, False)
    assert 0.0 < heavy.run_time_p50 <= heavy.run_time_p99
    assert heavy.cpu_seconds > 0.0


def test_span_attributes_with_opentelemetry(pool: WorkerPool) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("evaluate"):
        pool.evaluate(BUSY, tenant="traced")
    info = last_call()

    async def main() -> None:
        with tracer.start_as_current_span("aevaluate"):
            with pytest.raises(JsonnetError):
                await pool.aevaluate("error 'x'")

    asyncio.run(main())
    spans = {span.name: dict(span.attributes or {}) for span in exporter.get_finished_spans()}
    provider.shutdown()
    blocking = spans["evaluate"]
    assert info is not None
    assert blocking["jsonnet_worker.tenant"] == "traced"
    assert blocking["jsonnet_worker.worker_pid"] == info.worker_pid
    assert blocking["jsonnet_worker.worker_cpu_ms"] == pytest.approx(info.worker_cpu * 1000)
    assert blocking["jsonnet_worker.queue_wait_ms"] == pytest.approx(info.queue_wait * 1000)
    assert blocking["jsonnet_worker.run_time_ms"] == pytest.approx(info.run_time * 1000)
    failed = spans["aevaluate"]
    assert "jsonnet_worker.tenant" not in failed  # no tenant: no attribute (never None)
    assert failed["jsonnet_worker.error"] == "jsonnet_error"
    run_time = failed["jsonnet_worker.run_time_ms"]
    assert isinstance(run_time, float) and run_time > 0.0


def test_the_public_names() -> None:
    assert jsonnet_worker.last_call is last_call
    assert {"CallInfo", "TenantStats", "last_call"} <= set(jsonnet_worker.__all__)
