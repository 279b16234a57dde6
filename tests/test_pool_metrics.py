"""A Prometheus collector for any pool (``jsonnet_worker.metrics``, issue 23, item 8): an
application that embeds a pool gets the service's metric names from its own registry."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from jsonnet_worker import JsonnetError, WorkerPool
from jsonnet_worker.metrics import PoolCollector


def test_an_embedded_pools_metrics_under_the_services_names() -> None:
    registry = CollectorRegistry()
    with WorkerPool(2) as pool:
        registry.register(PoolCollector.of(pool))
        assert pool.evaluate("1", tenant="acme") == 1
        with contextlib.suppress(JsonnetError):
            pool.evaluate("error 'no'", tenant="acme")
        text = generate_latest(registry).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("jsonnet_worker_pool_size", ())] == 2
    assert samples[("jsonnet_worker_errors_total", (("kind", "jsonnet_error"),))] == 1
    assert samples[("jsonnet_worker_tenant_calls_total", (("tenant", "acme"),))] == 2
    assert samples[("jsonnet_worker_sandbox_enforced", ())] == 1
    assert ("jsonnet_worker_workers", (("state", "idle"),)) in samples


def test_a_pool_not_started_yet_shows_nothing() -> None:
    registry = CollectorRegistry()
    registry.register(PoolCollector(lambda: None, lambda: None))
    assert b"jsonnet_worker_" not in generate_latest(registry)
