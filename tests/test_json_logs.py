"""The service's JSON log lines keep what a record's ``extra`` carried (issue 23, item 8): the
pool logs each worker event with ``worker_pid`` and ``tenant``, and an operator's log
pipeline filters on them."""

from __future__ import annotations

import json
import logging

from jsonnet_worker import WorkerPool
from jsonnet_worker.service._server import JsonFormatter

LOOP = "std.foldl(function(a, b) a + b, std.range(1, 100000000), 0)"


def test_extra_fields_are_kept_and_standard_ones_are_not_repeated() -> None:
    record = logging.LogRecord(
        "jsonnet_worker", logging.WARNING, __file__, 1, "worker %d", (7,), None
    )
    record.worker_pid = 7
    record.tenant = "acme"
    record.odd = object()  # not JSON: written as its str
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "worker 7"
    assert (entry["worker_pid"], entry["tenant"]) == (7, "acme")
    assert entry["odd"].startswith("<object object")
    for standard in ("args", "msg", "levelno", "pathname", "lineno", "created", "thread"):
        assert standard not in entry, entry


def test_a_pool_records_worker_pid_and_tenant_in_json() -> None:
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("jsonnet_worker")
    logger.addHandler(handler)
    try:
        with WorkerPool(1, spares=0, timeout=0.2, interactive_budget=None) as pool:
            try:
                pool.evaluate(
                    "std.foldl(function(a, b) a + b, std.range(1, 100000000), 0)", tenant="acme"
                )
            except Exception:
                pass
    finally:
        logger.removeHandler(handler)
    entries = [json.loads(line) for line in lines]
    timeout = [e for e in entries if "deadline" in e["message"]]
    assert timeout and timeout[0]["tenant"] == "acme" and isinstance(timeout[0]["worker_pid"], int)
