"""The ways a user can evaluate Jsonnet, behind one small interface, for side-by-side runs."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
from typing import Any, Protocol

import _gojsonnet
import _jsonnet

from benchmarks.workloads import Workload
from jsonnet_worker import WorkerPool


class Contender(Protocol):
    name: str

    def call(self, workload: Workload) -> str: ...

    def close(self) -> None: ...


def evaluate_go(snippet: str, ext_codes: dict[str, str], tla_codes: dict[str, str]) -> str:
    """Runs inside executor worker processes (module level, so spawn can import it)."""
    result: str = _gojsonnet.evaluate_snippet(
        "bench.jsonnet", snippet, ext_codes=ext_codes, tla_codes=tla_codes
    )
    return result


class InProcess:
    """The binding called directly: no isolation at all."""

    def __init__(self, engine: str) -> None:
        self.name = f"in-process _{'gojsonnet' if engine == 'go' else 'jsonnet'}"
        self.module: Any = _gojsonnet if engine == "go" else _jsonnet

    def call(self, workload: Workload) -> str:
        return workload.evaluate_in_process(self.module)

    def close(self) -> None:
        pass


class Pool:
    def __init__(self, engine: str, size: int = 2) -> None:
        self.name = f"jsonnet_worker pool ({engine}, {size})"
        self.pool = WorkerPool(size, engine=engine, timeout=30)
        # Measure a settled pool: the spare starts after the first workers and would take
        # CPU from the first measurements.
        deadline = time.monotonic() + 10
        while self.pool.stats().spares < self.pool.spares and time.monotonic() < deadline:
            time.sleep(0.005)

    def call(self, workload: Workload) -> str:
        return self.pool.evaluate_json(
            workload.snippet,
            ext_codes=workload.ext_codes,
            tla_codes=workload.tla_codes,
            filename=workload.filename,
        )

    def close(self) -> None:
        self.pool.close()


class ProcessPool:
    """concurrent.futures.ProcessPoolExecutor, spawn context (fork can deadlock go-jsonnet)."""

    def __init__(self, size: int = 2) -> None:
        self.name = f"ProcessPoolExecutor (spawn, {size})"
        context = multiprocessing.get_context("spawn")
        self.executor = concurrent.futures.ProcessPoolExecutor(size, mp_context=context)
        list(self.executor.map(evaluate_go, ["1"] * size, [{}] * size, [{}] * size))

    def call(self, workload: Workload) -> str:
        return self.executor.submit(
            evaluate_go, workload.snippet, workload.ext_codes, workload.tla_codes
        ).result()

    def close(self) -> None:
        self.executor.shutdown()


class PebblePool:
    """pebble.ProcessPool with a per-task timeout (it polls every 0.1 s)."""

    def __init__(self, size: int = 2) -> None:
        import pebble

        self.name = f"pebble ProcessPool ({size}, timeout)"
        context = multiprocessing.get_context("spawn")
        self.pool = pebble.ProcessPool(max_workers=size, context=context)
        for _ in range(size):
            self.pool.schedule(evaluate_go, args=("1", {}, {})).result()

    def call(self, workload: Workload) -> str:
        future = self.pool.schedule(
            evaluate_go, args=(workload.snippet, workload.ext_codes, workload.tla_codes), timeout=5
        )
        result: str = future.result()
        return result

    def close(self) -> None:
        self.pool.close()
        self.pool.join()
