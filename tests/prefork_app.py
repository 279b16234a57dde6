"""A tiny WSGI app for tests/test_prefork.py and benchmarks/bench_prefork.py, run by
``gunicorn --preload``: it evaluates at import time (so the master process has a default
pool before it forks its workers) and starts an explicit pool (whose processes' pids it
writes to the file named by ``PREFORK_MASTER_PIDS``, if set), then answers ``/?n=N`` with
the mapper's answer for N and the serving process's pid, ``/pool`` with the serving
process's default pool size, and ``/explicit`` with what an explicit pool created at import
does in a forked worker."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import jsonnet_worker

MAPPER = "local c = std.extVar('claims'); {id: c.sub, n: c.n * 2}"

assert jsonnet_worker.evaluate("1 + 1") == 2  # the master's default pool
INHERITED = jsonnet_worker.WorkerPool(1, spares=0)  # created before the fork: the master's
if os.environ.get("PREFORK_MASTER_PIDS"):  # the explicit pool's processes (no spare)
    _stats = INHERITED.stats()
    with open(os.environ["PREFORK_MASTER_PIDS"], "w") as _out:
        json.dump([*_stats.worker_pids, _stats.template_pid], _out)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if environ.get("PATH_INFO") == "/explicit":
        try:
            INHERITED.evaluate("1")
            body: dict[str, Any] = {"error": None}
        except jsonnet_worker.Error as exc:
            body = {"error": exc.kind}
    elif environ.get("PATH_INFO") == "/pool":
        body = {"size": jsonnet_worker.get_default_pool().size, "pid": os.getpid()}
    else:
        n = int(query["n"][0])
        value = jsonnet_worker.evaluate(MAPPER, {"claims": {"sub": f"u{n}", "n": n}})
        body = {"value": value, "pid": os.getpid()}
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [data]
