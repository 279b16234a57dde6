"""Per-tenant metrics with several server processes (``serve --workers N``): each process
writes its pool's tenants to a file of its own, and whichever process answers /metrics
merges them, bounded like the pool's own tallies (``service/_metrics.py``).

The merge alone with made-up rows, then real server processes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import httpx

from conftest import wait_until
from jsonnet_worker import TenantStats
from jsonnet_worker.metrics import OTHER_TENANTS, TenantRow, tenant_families
from jsonnet_worker.service._metrics import merged_tenants, read_tenant_files
from servicekit import (
    pinned_clients,
    running_service,
    samples,
    server_pids_and_dir,
    wait_for_log,
    write_config,
)


def row(label: str, calls: int, cpu: float, errors: dict[str, int] | None = None) -> TenantRow:
    return TenantRow(label, calls, errors or {}, cpu, calls, 0.001 * calls, 0.002 * calls)


def test_rows_of_several_processes_are_summed_by_tenant() -> None:
    first = [row("config:a", 3, 0.3, {"timeout": 1}), row("adhoc", 1, 0.1)]
    second = [
        row("config:a", 5, 0.5, {"timeout": 2, "jsonnet_error": 1}),
        row(OTHER_TENANTS, 2, 0.0),
    ]
    merged = {r.label: r for r in merged_tenants([first, second])}
    assert merged["config:a"].calls == 8 and merged["config:a"].ran == 8
    assert merged["config:a"].errors == {"timeout": 3, "jsonnet_error": 1}
    assert merged["config:a"].cpu_seconds == 0.8
    assert merged["config:a"].quantiles is None  # quantiles do not merge
    assert list(merged) == ["config:a", "adhoc", OTHER_TENANTS]  # most CPU first, other last


def test_the_merge_stays_bounded_however_many_tenants_the_processes_saw() -> None:
    """Two processes that each tallied different tenants (each within its own bound): the
    merge exports at most ``limit`` of them one by one and folds the rest into other, with
    no call or CPU second lost."""
    first = [row(f"config:p1-{i}", 1, 0.01 * i) for i in range(30)]
    second = [row(f"config:p2-{i}", 1, 0.02 * i) for i in range(30)] + [row(OTHER_TENANTS, 7, 0.5)]
    merged = merged_tenants([first, second], limit=32)
    assert len(merged) == 33 and merged[-1].label == OTHER_TENANTS
    assert sum(r.calls for r in merged) == 67
    assert (
        abs(sum(r.cpu_seconds for r in merged) - sum(r.cpu_seconds for r in first + second)) < 1e-9
    )
    kept = [r.cpu_seconds for r in merged[:-1]]
    assert kept == sorted(kept, reverse=True)


def test_merged_summaries_have_a_sum_and_a_count_but_no_quantile() -> None:
    single = TenantRow.of(
        TenantStats("t", False, 2, {}, 0.1, 2, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5)
    )
    families = {f.name: f for f in tenant_families([single])}
    assert any(
        "quantile" in s.labels for s in families["jsonnet_worker_tenant_run_time_seconds"].samples
    )
    merged = merged_tenants([[single], [single]])
    families = {f.name: f for f in tenant_families(merged)}
    runs = families["jsonnet_worker_tenant_run_time_seconds"].samples
    assert not any("quantile" in s.labels for s in runs)
    assert {s.name: s.value for s in runs} == {
        "jsonnet_worker_tenant_run_time_seconds_count": 4,
        "jsonnet_worker_tenant_run_time_seconds_sum": 1.0,
    }


def test_two_server_processes_export_their_tenants_merged(tmp_path: Path) -> None:
    """Calls of two tenants on each of two server processes: whichever process answers
    /metrics, each tenant's calls are the sum of both processes'."""
    config = write_config(tmp_path)
    with running_service(config, tmp_path, "--workers", "2") as service:
        log = wait_for_log(service, "all 2 server processes are ready")
        server_pids, metrics_dir = server_pids_and_dir(log)
        with pinned_clients(service.base_url, server_pids) as clients:
            for client in clients.values():
                for tenant, count in (("alpha", 2), ("beta", 3)):
                    for _ in range(count):
                        answer = client.post(
                            "/v1/evaluate", json={"snippet": "1 + 1", "tenant": tenant}
                        )
                        assert answer.status_code == 200, answer.text
            # Each process copies its tenants to its file every REFRESH_INTERVAL (and when
            # it answers a scrape): wait for both copies, on either process.
            for client in clients.values():
                wait_until(functools.partial(scraped_both, client))
        assert merged_calls(httpx.get(f"{service.base_url}/metrics").text) == EXPECTED
        assert len(list(read_tenant_files(str(metrics_dir)))) == 2  # one per server process


EXPECTED = {"alpha": 4.0, "beta": 6.0}


def scraped_both(client: httpx.Client) -> bool:
    return merged_calls(client.get("/metrics").text) == EXPECTED


def merged_calls(text: str) -> dict[str, float]:
    """The tenant_calls_total of the tenants named alpha and beta (whatever prefix the
    service gives an ad-hoc tenant), from one scrape."""
    calls: dict[str, float] = {}
    for (name, labels), value in samples(text).items():
        tenant = dict(labels).get("tenant", "")
        if name == "jsonnet_worker_tenant_calls_total" and tenant.endswith(("alpha", "beta")):
            calls[tenant.rsplit(":", 1)[-1]] = value
    return calls
