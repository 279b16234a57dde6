"""A host process that restricts itself with restrict_host and then answers probes.

Usage: python sandboxed_host.py CONFIG.yml (working directory: the config's layout);
HOST_PRIVATE_DIR in the environment names a directory passed as ``private_dirs``.
It loads the YAML config, starts a pool of two workers, calls restrict_host with the config
file and the pool, prints one JSON line (the HostSandbox and the log records), then answers
one JSON command per stdin line with one JSON line, until EOF. Restriction is irrevocable,
which is why tests run this in a process of its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import yaml

from jsonnet_worker import Error, WorkerPool, restrict_host

HEAVY = (
    # CPU only (seconds of work, a flat heap): a memory bomb could end in
    # MemoryLimitExceeded before the deadline.
    "local depth(i) = if i == 0 then 0 else 1 + depth(i - 1); "
    "std.foldl(function(a, b) a + depth(400), std.range(1, 1000000), 0)"
)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def outcome(action: Any) -> dict[str, Any]:
    try:
        return {"ok": True, "value": action()}
    except Error as exc:  # before OSError: EvaluationTimeout is a TimeoutError too
        return {"ok": False, "error": type(exc).__name__}
    except OSError as exc:
        return {"ok": False, "errno": exc.errno, "error": str(exc)}


def read(path: str) -> int:
    with open(path, "rb") as file:
        return len(file.read())


def write_in(directory: str) -> int:
    path = os.path.join(directory, "probe.tmp")
    with open(path, "w") as file:
        file.write("written")
    os.unlink(path)
    return 1


def sqlite_write(database: str) -> int:
    connection = sqlite3.connect(database)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE IF NOT EXISTS identities (id INTEGER PRIMARY KEY)")
        connection.execute("INSERT INTO identities DEFAULT VALUES")
        connection.commit()
        return int(connection.execute("SELECT count(*) FROM identities").fetchone()[0])
    finally:
        connection.close()


def kill_a_worker(pool: WorkerPool) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    # Every first worker and spare started first: a replacement is counted in ``respawns``
    # only past them (a kill before the spare's start would be replaced as the spare).
    while (before := pool.stats()).spares < pool.spares or before.starting:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the pool did not start in 10 s: {before}")
        time.sleep(0.02)
    victim = before.worker_pids[0]
    os.kill(victim, 9)
    while time.monotonic() < deadline:
        now = pool.stats()
        if victim not in now.worker_pids and now.idle == pool.size:
            return {"victim": victim, "pids": list(now.worker_pids), "respawns": now.respawns}
        time.sleep(0.02)
    raise TimeoutError(f"no replacement within 10 s: {pool.stats()}")


# Operations on a path alone: the answer is what the operation returns, or its error.
PATH_OPS: dict[str, Callable[[str], Any]] = {
    "read": read,
    "write_in": write_in,
    "list": lambda path: len(os.listdir(path)),
    "sqlite": sqlite_write,
}


def handle(command: dict[str, Any], pool: WorkerPool, records: Records, config_path: str) -> Any:
    op: str = command["op"]
    arg: Any = command.get("arg")
    if op in PATH_OPS:
        answer = outcome(lambda: PATH_OPS[op](arg))
    elif op == "evaluate":
        answer = outcome(lambda: pool.evaluate(arg, command.get("ext_vars")))
    elif op == "timeout_then_evaluate":
        answer = {
            "slow": outcome(lambda: pool.evaluate(HEAVY, timeout=0.2)),
            "next": outcome(lambda: pool.evaluate("{next: 1 + 1}")),
        }
    elif op == "long_call":  # past the interactive budget: its worker is demoted
        records.lines.clear()
        answer = {
            "call": outcome(lambda: pool.evaluate(HEAVY, timeout=1.0)),
            "records": list(records.lines),
        }
    elif op == "kill_a_worker":
        answer = outcome(lambda: kill_a_worker(pool))
    elif op == "new_pool":
        with WorkerPool(1) as fresh:
            answer = outcome(lambda: fresh.evaluate(arg))
    elif op == "child_reads":
        child = subprocess.run(
            [sys.executable, "-I", "-S", "-c", f"open({arg!r}).close()"],
            capture_output=True,
            text=True,
        )
        answer = {"ok": child.returncode == 0, "stderr": child.stderr[-300:]}
    elif op == "interpreter":
        import select

        answer = outcome(
            lambda: {"executable": sys.executable, "select_file": getattr(select, "__file__", None)}
        )
    elif op == "supervisor_reads":
        answer = outcome(lambda: pool.run_on_supervisor(lambda: read(arg)))
    elif op == "restrict_again":
        records.lines.clear()
        again = restrict_host(arg, config_files=[config_path], pool=pool)
        answer = {"sandbox": dataclasses.asdict(again), "records": list(records.lines)}
    else:
        answer = {"ok": False, "error": f"unknown op {op!r}"}
    return answer


def shown(value: object) -> object:
    """What JSON cannot hold as it is: a worker-side value (``LandlockStatus``, not a
    dataclass, so ``asdict`` leaves it whole) as its ``to_dict``, anything else as text."""
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else str(value)


def main() -> None:
    records = Records()
    logger = logging.getLogger("jsonnet_worker")
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)  # the path lists are DEBUG records
    config_path = sys.argv[1]
    with open(config_path) as file:
        config = yaml.safe_load(file)
    pool = WorkerPool(2, timeout=2.0)
    private = os.environ.get("HOST_PRIVATE_DIR")  # a read-write run-time directory
    sandbox = restrict_host(
        config, config_files=[config_path], pool=pool, private_dirs=[private] if private else []
    )
    first = {"sandbox": dataclasses.asdict(sandbox), "records": list(records.lines)}
    print(json.dumps(first, default=shown), flush=True)
    for line in sys.stdin:
        answer = handle(json.loads(line), pool, records, config_path)
        print(json.dumps(answer, default=shown), flush=True)
    pool.close()


if __name__ == "__main__":
    main()
