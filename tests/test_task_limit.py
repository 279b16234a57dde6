"""One worker cannot exhaust the tasks its fork server needs (issue 22): each worker is in a
cgroup of its own whose ``pids.max`` bounds its threads and processes, under the shared uid
of the fork server's workers; a thread bomb ends in that worker (typed, logged once) and the
fork server's next fork still succeeds. Real pools, real workers from the template harness
(a fully compromised engine: each request's snippet is Python), the real kernel; what the
pool did is read from outside (its stats, /proc, the cgroup files)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import seams
from conftest import wait_until
from jsonnet_worker import WorkerCrashed, WorkerPool, WorkerStartError
from jsonnet_worker._config import DEFAULT_TASK_LIMIT, PoolConfig
from jsonnet_worker._pool import tasklimit
from jsonnet_worker._pool.forking import fork_server_command
from jsonnet_worker._pool.identities import resolve_identity
from jsonnet_worker._pool.processes import settings_for
from jsonnet_worker._pool.tasklimit import Hierarchy, TaskLimits, find_hierarchy
from jsonnet_worker._wire.layers import LayerState

HARNESS = Path(__file__).parent / "harness" / "template_harness.py"
ROOT = os.geteuid() == 0


def _host() -> Hierarchy | str:
    hierarchy = tasklimit.host_hierarchy()
    if isinstance(hierarchy, Hierarchy) and not os.access(os.path.dirname(hierarchy.base), os.W_OK):
        return f"{os.path.dirname(hierarchy.base)} is not writable"
    return hierarchy


HOST = _host()
needs_cgroups = pytest.mark.skipif(
    not isinstance(HOST, Hierarchy), reason=f"no writable pids cgroup here: {HOST}"
)
needs_root = pytest.mark.skipif(not ROOT, reason="a shared worker uid needs a root parent")

# A thread bomb as a compromised engine would run it: threads (small stacks: the memory limit
# alone would allow thousands) until the kernel refuses one. ``{then}`` runs once refused.
BOMB = """
import ctypes, threading
release = threading.Event()
started = []
threading.stack_size(65536)
for _ in range(2000):
    thread = threading.Thread(target=release.wait)
    try:
        thread.start()
    except RuntimeError:  # "can't start new thread": clone said EAGAIN
        break
    started.append(thread)
threading.stack_size(0)
{then}
"""
# Hold the threads, and say so from outside: this thread's name (/proc/PID/task/TID/comm).
HOLD = """
ctypes.CDLL(None).prctl(15, b"bomb-full", 0, 0, 0)  # PR_SET_NAME
release.wait(60)
result = len(started)
"""
# What the Go runtime does when the kernel refuses it a thread: print, then abort.
ABORT_AS_GO_DOES = """
import os
os.write(2, b"runtime/cgo: pthread_create failed: Resource temporarily unavailable\\n")
os.abort()
"""


# About 10^8 steps with small arrays and a shallow stack: runs until terminate() kills it.
LONG_CALL = (
    "local r = std.range(1, 10000); "
    "std.foldl(function(a, i) a + std.foldl(function(b, j) b + j, r, 0), r, 0)"
)


def template_harness() -> list[str]:
    """The template harness in ``python`` mode, dropping to ``nobody`` as the real template
    does under a root parent: every worker it forks shares that uid and its RLIMIT_NPROC."""
    real = fork_server_command(settings_for(PoolConfig(size=1)), resolve_identity("nobody"))
    assert real[3] == "-c" and real[5] == "_template"
    return [sys.executable, "-I", str(HARNESS), "python", *real[6:]]


def pool_directory(pool: WorkerPool) -> str:
    """The pool's task cgroup directory, as ``pool.sandbox`` states it."""
    assert pool.sandbox is not None and pool.sandbox.tasks is not None
    assert pool.sandbox.tasks.state is LayerState.ACTIVE, pool.sandbox.tasks
    return pool.sandbox.tasks.detail.rsplit("under ", 1)[1]


def pids_cgroup(pid: int) -> str:
    """The pids cgroup of process ``pid``, as a path below the hierarchy's mount."""
    assert isinstance(HOST, Hierarchy)
    with open(f"/proc/{pid}/cgroup") as cgroups:
        for line in cgroups:
            number, controllers, path = line.rstrip("\n").split(":", 2)
            if (HOST.version == 1 and "pids" in controllers.split(",")) or (
                HOST.version == 2 and number == "0"
            ):
                return path
    raise AssertionError(f"no pids cgroup for {pid}")


def cgroups_in(directory: str) -> list[str]:
    return [entry.name for entry in os.scandir(directory) if entry.is_dir()]


def thread_names(pid: int) -> list[str]:
    names = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/comm") as comm:
                names.append(comm.read().strip())
    except OSError:
        pass  # gone meanwhile
    return names


def holding_bomb(pool: WorkerPool) -> int:
    """The pid of the worker whose thread bomb holds every thread it could start."""
    found: list[int] = []

    def bomb_full() -> bool:
        found[:] = [pid for pid in seams.pids_in_call(pool) if "bomb-full" in thread_names(pid)]
        return bool(found)

    wait_until(bomb_full, timeout=30)
    return found[0]


def call_in_background(pool: WorkerPool, snippet: str, **options: object) -> Background:
    """``pool.evaluate(snippet, **options)`` on a thread of its own; its value or error
    lands in ``Background.ended``."""
    ended: list[object] = []

    def call() -> None:
        try:
            ended.append(pool.evaluate(snippet, **options))  # type: ignore[arg-type]
        except Exception as exc:
            ended.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    return Background(thread, ended)


@dataclass
class Background:
    thread: threading.Thread
    ended: list[object]


@pytest.fixture
def harness_pool() -> Iterator[WorkerPool]:
    origin = seams.forked_from(template_harness())
    with seams.pool_of(origin, 2, spares=1, max_calls_per_worker=1, timeout=60) as pool:
        wait_until(lambda: pool.stats().spares == 1 and pool.stats().starting == 0, 20)
        yield pool


@needs_cgroups
@needs_root
def test_a_thread_bomb_leaves_the_fork_server_its_forks(harness_pool: WorkerPool) -> None:
    """While one tenant's worker holds every thread it could start, another tenant's calls
    are served by forked workers: each call recycles its worker (max_calls_per_worker=1), so
    each asks the fork server for a fork, and none falls back to a re-exec worker."""
    pool = harness_pool
    bomb = call_in_background(pool, BOMB.format(then=HOLD), tenant="evil")
    try:
        bomber = holding_bomb(pool)
        with open(f"/proc/{bomber}/status") as status:
            threads = next(int(line.split()[1]) for line in status if line.startswith("Threads:"))
        assert threads <= DEFAULT_TASK_LIMIT  # its cgroup refused the rest
        before = pool.stats()
        for call in range(4):
            assert pool.evaluate(f"result = {call} * 3", tenant="good") == call * 3
        wait_until(lambda: pool.stats().starting == 0 and pool.stats().spares == 1, 20)
        after = pool.stats()
        assert after.forks >= before.forks + 4, after  # every replacement a fork ...
        assert after.fork_fallbacks == 0, after  # ... none a re-exec
        assert after.template_starts == 1, after  # and the fork server never failed
    finally:
        for pid in seams.pids_in_call(pool):  # the bomb: the test's own doing
            os.kill(pid, signal.SIGKILL)
        bomb.thread.join(30)
    assert len(bomb.ended) == 1 and isinstance(bomb.ended[0], WorkerCrashed), bomb.ended


@needs_cgroups
@needs_root
def test_a_bomb_that_aborts_as_go_does_is_typed_and_logged_once(
    harness_pool: WorkerPool, caplog: pytest.LogCaptureFixture
) -> None:
    """The Go runtime aborts when a thread is refused ("pthread_create failed"), which
    would read as running out of memory; the pool says the worker reached its task limit,
    once, and the next call gets a forked worker."""
    pool = harness_pool
    caplog.set_level(logging.INFO, logger="jsonnet_worker")
    with pytest.raises(WorkerCrashed, match="reached its task limit") as raised:
        pool.evaluate(BOMB.format(then=ABORT_AS_GO_DOES), tenant="evil")
    assert raised.value.signal == signal.SIGABRT
    assert f"({DEFAULT_TASK_LIMIT} threads and processes" in str(raised.value)
    assert "pthread_create failed" in raised.value.stderr_tail
    logged = [r for r in caplog.records if "task limit" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING, logged
    assert pool.evaluate("result = 7", tenant="good") == 7
    wait_until(lambda: pool.stats().starting == 0 and pool.stats().spares == 1, 20)
    stats = pool.stats()
    assert stats.fork_fallbacks == 0 and stats.template_starts == 1, stats
    assert stats.errors.get("worker_crashed") == 1, stats


@needs_cgroups
def test_each_worker_and_the_fork_server_have_a_cgroup_and_none_is_left() -> None:
    with WorkerPool(2, spares=1) as pool:
        assert pool.evaluate("1 + 1") == 2
        wait_until(lambda: pool.stats().spares == 1 and pool.stats().starting == 0, 20)
        directory = pool_directory(pool)
        assert isinstance(HOST, Hierarchy)
        relative = "/" + os.path.relpath(directory, os.path.dirname(HOST.base))
        stats = pool.stats()
        workers = {pid: pids_cgroup(pid) for pid in stats.worker_pids}
        assert len(set(workers.values())) == len(workers) == 3  # one cgroup each
        for path in workers.values():
            assert os.path.dirname(path).endswith(relative), (path, relative)
            assert os.path.basename(path)[0] == "w"
            with open(f"{directory}/{os.path.basename(path)}/pids.max") as limit:
                assert limit.read().strip() == str(DEFAULT_TASK_LIMIT)
        assert stats.template_pid is not None
        fork_server = pids_cgroup(stats.template_pid)
        assert os.path.basename(fork_server)[0] == "f"
        with open(f"{directory}/{os.path.basename(fork_server)}/pids.max") as limit:
            assert limit.read().strip() == str(DEFAULT_TASK_LIMIT + 1)
        for _ in range(3):  # recycled workers' cgroups go with them
            pool.evaluate("2", tenant="a")
            pool.evaluate("3", tenant="b")
        wait_until(lambda: len(cgroups_in(directory)) == 4, 20)  # 3 workers, 1 fork server
    assert not os.path.exists(directory)


@needs_cgroups
def test_re_exec_workers_are_bounded_too() -> None:
    with seams.pool_of(seams.re_exec(), 1, spares=0) as pool:
        assert pool.evaluate("4") == 4
        directory = pool_directory(pool)
        (pid,) = pool.stats().worker_pids
        assert os.path.basename(os.path.dirname(pids_cgroup(pid))) == os.path.basename(directory)
    assert not os.path.exists(directory)


@needs_cgroups
def test_a_terminated_pool_with_a_busy_worker_leaves_nothing() -> None:
    """terminate() kills a worker a caller holds; that caller closes it, and the pool's
    directory goes with that worker's cgroup."""
    pool = WorkerPool(1, spares=0, timeout=30)
    pool.evaluate("1")
    directory = pool_directory(pool)
    caller = call_in_background(pool, LONG_CALL)
    wait_until(lambda: bool(seams.pids_in_call(pool)))
    pool.terminate()
    caller.thread.join(30)
    assert len(caller.ended) == 1 and isinstance(caller.ended[0], Exception), caller.ended
    assert not os.path.exists(directory)


@needs_cgroups
def test_the_cgroups_of_a_gone_pool_are_removed_and_a_live_ones_kept() -> None:
    assert isinstance(HOST, Hierarchy)
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid names no process now
    stale = os.path.join(HOST.base, f"{gone.pid}-1")
    live = os.path.join(HOST.base, f"{os.getppid()}-424242")
    for path in (os.path.join(stale, "w1"), os.path.join(stale, "f2"), live):
        os.makedirs(path, exist_ok=True)
    try:
        limits = TaskLimits(DEFAULT_TASK_LIMIT)
        assert limits.active
        assert not os.path.exists(stale)
        assert os.path.isdir(live)  # another live process's: not ours to remove
        limits.close()
        assert limits.directory is not None and not os.path.exists(limits.directory)
    finally:
        for path in (live, os.path.join(stale, "w1"), os.path.join(stale, "f2"), stale):
            if os.path.isdir(path):
                os.rmdir(path)


def test_without_a_writable_pids_cgroup_the_pool_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where no pids controller is writable (a non-root parent without delegation), the
    pool runs on RLIMIT_NPROC alone and says why, once: in pool.sandbox and the log."""
    reason = "cgroup v2: the pids controller is not enabled for /sys/fs/cgroup/user.slice"
    monkeypatch.setattr(tasklimit, "host_hierarchy", lambda: reason)
    caplog.set_level(logging.INFO, logger="jsonnet_worker")
    with WorkerPool(1, spares=0) as pool:
        assert pool.evaluate("5") == 5
        tasks = pool.sandbox.tasks if pool.sandbox else None
        assert tasks is not None and tasks.state is LayerState.MISSING
        assert tasks.reason.startswith(reason) and "RLIMIT_NPROC" in tasks.reason
        assert "tasks: MISSING" in pool.sandbox.summary()  # type: ignore[union-attr]
    logged = [r for r in caplog.records if "task limit missing" in r.getMessage()]
    assert len(logged) == 1, logged
    # a root parent could have had it; a non-root one needs a delegated subtree (usual)
    assert logged[0].levelno == (logging.WARNING if ROOT else logging.INFO)


def test_a_directory_that_cannot_be_made_is_a_stated_reason(tmp_path: Path) -> None:
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o500)
    hierarchy = Hierarchy(1, str(read_only / "not-a-cgroup" / tasklimit.POOLS_DIR))
    limits = TaskLimits(16, hierarchy)
    assert not limits.active and limits.place(os.getpid()) is None
    reason = limits.status.reason
    assert reason.startswith(f"cannot make cgroups under {hierarchy.base} ("), reason
    # root writes anywhere, but a plain directory is not a cgroup; others may not write
    assert ("is not a pids cgroup" if ROOT else "Permission denied") in reason, reason
    assert "RLIMIT_NPROC" in reason  # the fallback, stated
    off = TaskLimits(None)
    assert not off.active and off.status.reason.startswith("task_limit=None")
    assert off.place(os.getpid()) is None


def test_task_limit_is_an_option() -> None:
    assert PoolConfig().task_limit == DEFAULT_TASK_LIMIT
    assert PoolConfig(task_limit=None).task_limit is None
    with pytest.raises(ValueError, match="task_limit must be at least 1"):
        PoolConfig(task_limit=0)


# -- finding the hierarchy ------------------------------------------------------------------

HYBRID = textwrap.dedent(
    """\
    31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
    32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
    39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
    """
)


def test_cgroup_v1_hybrid_uses_the_pids_hierarchy(tmp_path: Path) -> None:
    cgroups = "8:pids:/\n1:cpu:/\n0::/\n"
    found = find_hierarchy(HYBRID.replace("/sys/fs/cgroup/unified", str(tmp_path)), cgroups)
    assert found == Hierarchy(1, "/sys/fs/cgroup/pids/jsonnet-worker")  # v2 has no pids here
    nested = find_hierarchy(HYBRID, "8:pids:/app/web\n0::/\n")
    assert nested == Hierarchy(1, "/sys/fs/cgroup/pids/app/web/jsonnet-worker")


def test_cgroup_v2_with_pids_is_preferred(tmp_path: Path) -> None:
    own = tmp_path / "service.slice"
    own.mkdir()
    (own / "cgroup.controllers").write_text("cpu io memory pids\n")
    mountinfo = f"30 23 0:26 / {tmp_path} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    v1 = "39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n"
    found = find_hierarchy(v1 + mountinfo, "0::/service.slice\n8:pids:/\n")
    assert found == Hierarchy(2, f"{own}/jsonnet-worker")
    (own / "cgroup.controllers").write_text("cpu io memory\n")
    only_v2 = find_hierarchy(mountinfo, "0::/service.slice\n")
    assert isinstance(only_v2, str) and "pids controller is not enabled" in only_v2


def test_a_container_mount_and_no_mount() -> None:
    # Without a cgroup namespace a container sees the host's paths below its mount's root.
    mountinfo = "39 31 0:36 /docker/abc /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
    found = find_hierarchy(mountinfo, "8:pids:/docker/abc/app\n")
    assert found == Hierarchy(1, "/sys/fs/cgroup/pids/app/jsonnet-worker")
    outside = find_hierarchy(mountinfo, "8:pids:/elsewhere\n")
    assert isinstance(outside, str) and "outside the mount" in outside
    none = find_hierarchy("31 23 0:28 / /sys rw - sysfs sysfs rw\n", "0::/\n")
    assert none == "no cgroup hierarchy with the pids controller is mounted"


@needs_cgroups
def test_a_worker_that_cannot_be_placed_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fail closed: a worker whose cgroup cannot be made is refused like a start-up
    failure (back-off, WARNING), and the next one, placed, serves."""
    place = TaskLimits.place
    placed: list[int] = []

    def refuse_the_second_worker(
        self: TaskLimits, pid: int, *, fork_server: bool = False
    ) -> tasklimit.TaskCgroup | None:
        if not fork_server:
            placed.append(pid)
            if len(placed) == 2:
                raise OSError(28, "No space left on device")
        return place(self, pid, fork_server=fork_server)

    monkeypatch.setattr(TaskLimits, "place", refuse_the_second_worker)
    caplog.set_level(logging.WARNING, logger="jsonnet_worker")
    with WorkerPool(1, spares=0) as pool:
        assert pool.evaluate("6", tenant="a") == 6
        with pytest.raises(WorkerStartError, match="cannot put it in its task cgroup"):
            pool.evaluate("7", tenant="b")  # its fresh worker, the second, was refused
        wait_until(lambda: pool.stats().idle == 1)  # the third, after the back-off
        assert pool.evaluate("7", tenant="b") == 7
        directory = pool_directory(pool)
        (pid,) = pool.stats().worker_pids
        assert len(placed) == 3 and pid == placed[2], placed
        assert os.path.basename(os.path.dirname(pids_cgroup(pid))) == os.path.basename(directory)
        assert pool.stats().start_failures == 1
    assert not os.path.exists(f"/proc/{placed[1]}")  # killed and reaped
    assert any("cannot put it in its task cgroup" in r.getMessage() for r in caplog.records)
