"""A worker's command line, environment and channels, written in one place and cheap to import.

Goals: ``eval`` starts its worker before it imports anything heavy (``_cli.early``), from the
same command line, environment and channels a pool's worker gets (``processes``); so this
module imports only ``os`` and ``sys`` and what the interpreter has loaded anyway: no
``socket`` (its enums), no ``subprocess``, no ``importlib.util``, no dataclass, no
``typing``. On a 2-CPU VM those cost a command about 20 ms before its worker could start.

Plan: ``worker_command`` takes the settings that shape a worker as plain values (engine,
memory limit, largest frame, the identity it drops to, its CPU budget) and
``worker_environment`` the memory limit; ``processes`` calls both with a pool's
``WorkerSettings``, ``_cli.early`` with what it read from the command line.
``one_way_channel`` makes a channel from ``_socket`` (what ``socket.socketpair`` wraps).

Weak spots: the package's runtime dependencies are found the way the worker itself imports
them, on ``sys.path`` through the path finders; a module only a meta-path hook of this
process could import (none of msgpack, ``_gojsonnet``, ``_jsonnet`` is one) adds no path.
"""

from __future__ import annotations

import _socket
import os
import sys
from importlib.machinery import PathFinder

from .._wire.modes import WORKER_COMMAND

# The package's directory (this module is jsonnet_worker/_pool/workerline.py).
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The worker imports only what it needs: no ``site`` (-S; the paths it needs are given) and
# not the package's ``__init__`` (which pulls in the pool, asyncio and logging): a stand-in
# package module makes ``jsonnet_worker._worker.bootstrap`` importable on its own (the
# ``__init__`` of ``_worker``, ``_sandbox`` and ``_wire`` are empty).
BOOTSTRAP = (
    "import sys, types; sys.path[:0] = {paths!r}; sys.argv[0] = 'jsonnet_worker'; "
    "package = types.ModuleType('jsonnet_worker'); package.__path__ = [{package!r}]; "
    "sys.modules['jsonnet_worker'] = package; "
    "from jsonnet_worker._worker.bootstrap import run; run()"
)


def package_paths() -> list[str]:
    """Where this package and its runtime dependencies are imported from, for ``sys.path``
    of a worker started with ``-I`` (which ignores PYTHONPATH)."""
    roots = [os.path.dirname(PACKAGE_DIR)]
    for name in ("msgpack", "_gojsonnet", "_jsonnet"):
        spec = PathFinder.find_spec(name)
        if spec is not None and spec.origin:
            origin = os.path.dirname(spec.origin)
            roots.append(os.path.dirname(origin) if name == "msgpack" else origin)
    return list(dict.fromkeys(roots))


def worker_command(
    engine: str,
    memory_limit: int,
    max_frame: int,
    drop: tuple[str, int, int, bool] | None = None,
    cpu_budget: float | None = None,
) -> list[str]:
    """The command line of one worker; ``drop``: (user, uid, gid, own uid) it drops to."""
    options = []
    if drop is not None:
        user, uid, gid, own_uid = drop
        options += ["--user", user, "--uid", str(uid), "--gid", str(gid)]
        if own_uid:
            options.append("--own-uid")
    if cpu_budget is not None:
        options += ["--cpu-budget", repr(float(cpu_budget))]
    return [
        sys.executable,
        "-I",
        "-S",
        "-c",
        BOOTSTRAP.format(paths=package_paths(), package=PACKAGE_DIR),
        WORKER_COMMAND,
        "--engine",
        engine,
        "--memory-limit",
        str(memory_limit),
        "--parent-pid",
        str(os.getpid()),
        "--max-frame",
        str(max_frame),
        *options,
    ]


def worker_environment(memory_limit: int) -> dict[str, str]:
    """A minimal environment: nothing of the host's secrets reaches a snippet's process.

    The Go runtime settings were measured on the light mapper (benchmarks/RESULTS.md):
    GOMAXPROCS=2 lets the collector run beside the evaluation instead of inside it, and
    GOGC=400 collects a fifth as often (the live heap between calls is a few MB, so the
    heap stays small); together they cut the worker's p50 by ~25% and raise a pool of two's
    throughput by ~45% against GOMAXPROCS=1 and the default GOGC.
    """
    return {
        "GOMAXPROCS": "2",
        "GOGC": "400",
        # The collector works harder as the heap nears the memory limit, before an mmap
        # failure makes the runtime abort.
        "GOMEMLIMIT": str(memory_limit * 3 // 4),
        "LC_ALL": "C.UTF-8",
    }


def one_way_channel(child_reads: bool) -> tuple[int, int]:
    """A unix socket pair that carries bytes one way; returns (child end, parent end).

    Both fds are close-on-exec (a spawn's dup2 onto 0/1/2 clears that for the child's copy)."""
    parent, child = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        parent.shutdown(_socket.SHUT_RD if child_reads else _socket.SHUT_WR)
        child.shutdown(_socket.SHUT_WR if child_reads else _socket.SHUT_RD)
    except OSError:
        parent.close()
        child.close()
        raise
    return child.detach(), parent.detach()


def worker_channels() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A worker's three one-way channels, requests, responses and stderr: the child's ends
    (its stdin, stdout, stderr) and ours."""
    child_ends: list[int] = []
    parent_ends: list[int] = []
    try:
        for child_reads in (True, False, False):
            child_end, parent_end = one_way_channel(child_reads)
            child_ends.append(child_end)
            parent_ends.append(parent_end)
    except BaseException:
        for fd in child_ends + parent_ends:
            os.close(fd)
        raise
    stdin, stdout, stderr = child_ends
    ours_in, ours_out, ours_err = parent_ends
    return (stdin, stdout, stderr), (ours_in, ours_out, ours_err)
