"""Long calls yield the CPU (issue 21, item 3): a call past ``interactive_budget`` has every
thread of its worker moved to SCHED_IDLE (nice 19 where that is refused), read from outside
with ``sched_getscheduler``/``getpriority`` per tid; the worker is recycled after its call;
a compromised worker cannot undo it; a non-root parent demotes its same-uid workers too.

No timed assertions: each test waits (generously) for a state and then checks it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import seams
from conftest import harness_command, proc_stat, wait_until
from jsonnet_worker import EvaluationTimeout, WorkerPool
from jsonnet_worker._pool import idlegroup, scheduling
from jsonnet_worker._pool.identities import resolve_identity

ROOT = os.geteuid() == 0
NOBODY = 65534
# CPU only, a flat heap: seconds of work (HEAVY_GO), a few hundred milliseconds (MEDIUM_GO).
HEAVY_GO = (
    "local depth(i) = if i == 0 then 0 else 1 + depth(i - 1); "
    "std.foldl(function(a, b) a + depth(400), std.range(1, 1000000), 0)"
)
MEDIUM_GO = (
    "local depth(i) = if i == 0 then 0 else 1 + depth(i - 1); "
    "std.foldl(function(a, b) a + depth(40), std.range(1, 40000), 0)"
)


def all_threads(pid: int, predicate: Callable[[scheduling.ThreadPolicy], bool]) -> bool:
    policies = scheduling.thread_policies(pid)
    return bool(policies) and all(predicate(p) for p in policies)


def idle(policy: scheduling.ThreadPolicy) -> bool:
    return policy.policy == os.SCHED_IDLE


class Running:
    """One call on a thread of its own (``aevaluate`` on an event loop there if ``use_async``),
    with the pid of the worker that runs it."""

    def __init__(
        self, pool: WorkerPool, snippet: str, timeout: float, use_async: bool = False
    ) -> None:
        self.outcome: dict[str, Any] = {}
        busy_before = set(seams.worker_pids(pool, "busy"))

        def run() -> None:
            try:
                if use_async:
                    value = asyncio.run(pool.aevaluate(snippet, timeout=timeout))
                else:
                    value = pool.evaluate(snippet, timeout=timeout)
                self.outcome["value"] = value
            except Exception as exc:
                self.outcome["error"] = exc

        self.thread = threading.Thread(target=run)
        self.thread.start()
        wait_until(lambda: bool(set(seams.worker_pids(pool, "busy")) - busy_before))
        (self.pid,) = set(seams.worker_pids(pool, "busy")) - busy_before

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def join(self) -> dict[str, Any]:
        self.thread.join(60)
        assert not self.thread.is_alive()
        return self.outcome


NO_AUTOGROUPS = "autogroups are not in use (CONFIG_SCHED_AUTOGROUP, kernel.sched_autogroup_enabled)"


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    with WorkerPool(2, spares=0, interactive_budget=0.05) as shared:
        yield shared


@pytest.mark.parametrize("use_async", [False, True], ids=["blocking", "asyncio"])
def test_a_long_call_has_every_thread_of_its_worker_at_sched_idle(
    pool: WorkerPool, use_async: bool
) -> None:
    call = Running(pool, HEAVY_GO, timeout=8.0, use_async=use_async)
    wait_until(lambda: all_threads(call.pid, idle))
    assert call.running  # demoted mid-call, not after
    assert len(scheduling.thread_policies(call.pid)) > 1  # the Go runtime's threads too
    stop(pool, call)


def stop(pool: WorkerPool, call: Running) -> None:
    os.kill(call.pid, signal.SIGKILL)  # no need to wait for its deadline
    call.join()
    wait_until(lambda: call.pid not in pool.stats().worker_pids)


IDLE_GROUP = idlegroup.IdleGroup.find() if ROOT else idlegroup.IdleGroup(unavailable="not root")


@pytest.mark.skipif(not ROOT, reason="the cgroup file system is root's")
@pytest.mark.skipif(bool(IDLE_GROUP.unavailable), reason=IDLE_GROUP.unavailable)
@pytest.mark.parametrize("use_async", [False, True], ids=["blocking", "asyncio"])
def test_a_long_calls_worker_goes_to_the_idle_cpu_cgroup_under_the_applications(
    pool: WorkerPool, use_async: bool
) -> None:
    ours = idlegroup.cgroup_of(os.getpid())
    call = Running(pool, HEAVY_GO, timeout=8.0, use_async=use_async)
    wait_until(lambda: all_threads(call.pid, idle))
    assert call.running
    expected = os.path.join(ours, idlegroup.IDLE_GROUP)
    assert idlegroup.cgroup_of(call.pid) == expected  # every thread: cgroup.procs
    for tid in os.listdir(f"/proc/{call.pid}/task"):
        with open(f"/proc/{call.pid}/task/{tid}/cgroup") as cgroups:
            assert f":{expected}\n" in cgroups.read()
    assert idlegroup.cgroup_of(os.getpid()) == ours  # the application stays where it was
    assert os.path.dirname(IDLE_GROUP.directory).endswith(ours.rstrip("/"))
    with open(os.path.join(IDLE_GROUP.directory, "cpu.idle")) as setting:
        assert setting.read().strip() == "1"
    stop(pool, call)


@pytest.mark.parametrize("use_async", [False, True], ids=["blocking", "asyncio"])
def test_without_an_idle_cgroup_a_long_calls_autogroup_goes_to_nice_19(
    use_async: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    no_group = idlegroup.IdleGroup(unavailable="none here (the test)")
    monkeypatch.setattr(idlegroup.IdleGroup, "find", lambda: no_group)
    caplog.set_level(logging.INFO, logger="jsonnet_worker")
    ours = scheduling.autogroup_nice(os.getpid())
    ours_cgroup = idlegroup.cgroup_of(os.getpid())
    with WorkerPool(2, spares=0, interactive_budget=0.05) as pool:
        call = Running(pool, HEAVY_GO, timeout=8.0, use_async=use_async)
        wait_until(lambda: all_threads(call.pid, idle))
        assert idlegroup.cgroup_of(call.pid) == ours_cgroup
        said = [r for r in caplog.records if "no idle cpu cgroup" in r.getMessage()]
        assert [r.levelname for r in said] == ["INFO"]
        assert "none here (the test)" in said[0].getMessage()
        if scheduling.autogroups_enabled():
            if ROOT:  # an unprivileged parent may meet the kernel's rate limit (logged)
                assert scheduling.autogroup_nice(call.pid) == scheduling.LOWEST_NICE
            assert scheduling.autogroup_nice(os.getpid()) == ours  # not the application's
        stop(pool, call)


@pytest.mark.parametrize("use_async", [False, True], ids=["blocking", "asyncio"])
def test_a_demoted_worker_is_recycled_after_its_call(use_async: bool) -> None:
    with WorkerPool(1, spares=0, interactive_budget=0.01) as pool:
        (pid,) = pool.stats().worker_pids
        call = Running(pool, MEDIUM_GO, timeout=20.0, use_async=use_async)
        assert call.pid == pid
        assert "value" in call.join()
        assert pool.stats().recycles == 1
        assert pid not in pool.stats().worker_pids
        wait_until(lambda: len(pool.stats().worker_pids) == 1)
        assert pool.evaluate("1 + 1") == 2


def test_a_light_calls_worker_is_never_demoted() -> None:
    # A budget no light call comes near on a loaded machine, so that the test says what
    # it means: calls that answer within the budget leave their worker alone.
    with WorkerPool(1, spares=0, interactive_budget=0.5) as pool:
        (pid,) = pool.stats().worker_pids
        for _ in range(20):
            assert pool.evaluate("{a: [x * 2 for x in std.range(1, 100)]}")["a"][0] == 2
            assert all_threads(pid, lambda p: p.policy == os.SCHED_OTHER and p.nice == 0)
        asyncio.run(pool.aevaluate("1"))
        assert pool.stats().worker_pids == (pid,)
        assert pool.stats().recycles == 0
        assert all_threads(pid, lambda p: p.policy == os.SCHED_OTHER and p.nice == 0)


@pytest.mark.parametrize("use_async", [False, True], ids=["blocking", "asyncio"])
def test_a_call_slowed_down_but_not_using_cpu_is_not_demoted(use_async: bool) -> None:
    """The budget is the call's CPU: a worker that cannot run (stopped here, as a worker
    waiting for a CPU on a busy machine is) for many budgets' worth of wall time, then
    answers a light call, keeps its priority and its place in the pool."""
    with WorkerPool(1, spares=0, interactive_budget=0.02) as pool:
        assert pool.evaluate("1") == 1  # warm: the engine and its snippet cache
        (pid,) = pool.stats().worker_pids
        os.kill(pid, signal.SIGSTOP)
        resume = threading.Timer(0.3, os.kill, (pid, signal.SIGCONT))
        resume.start()
        try:
            snippet = "{a: [x * 2 for x in std.range(1, 100)]}"
            if use_async:
                value = asyncio.run(pool.aevaluate(snippet, timeout=10.0))
            else:
                value = pool.evaluate(snippet, timeout=10.0)
        finally:
            resume.join()
            os.kill(pid, signal.SIGCONT)
        assert value["a"][0] == 2
        assert all_threads(pid, lambda p: p.policy == os.SCHED_OTHER and p.nice == 0)
        assert pool.stats().worker_pids == (pid,)
        assert pool.stats().recycles == 0


def test_without_a_budget_nothing_is_demoted() -> None:
    with WorkerPool(1, spares=0, interactive_budget=None) as pool:
        call = Running(pool, HEAVY_GO, timeout=1.0)
        seen: list[scheduling.ThreadPolicy] = []
        while call.running:
            try:
                seen += scheduling.thread_policies(call.pid)
            except FileNotFoundError:  # killed at its deadline
                break
        assert isinstance(call.join()["error"], EvaluationTimeout)
        assert seen and not any(p.demoted for p in seen)


def test_where_sched_idle_is_refused_every_thread_gets_nice_19(
    pool: WorkerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(tid: int, policy: int, param: os.sched_param) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refused)
    call = Running(pool, HEAVY_GO, timeout=8.0)
    wait_until(lambda: all_threads(call.pid, lambda p: p.nice == scheduling.LOWEST_NICE))
    assert call.running
    assert all_threads(call.pid, lambda p: p.policy == os.SCHED_OTHER)
    os.kill(call.pid, signal.SIGKILL)
    call.join()


def test_a_demotion_that_falls_short_says_why_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As under ``restrict_host`` (no /proc): the whole process group gets nice 19, and the
    shortfall is logged at WARNING once, then at DEBUG."""
    listdir = os.listdir

    def no_proc(path: str) -> list[str]:
        if str(path).startswith("/proc/"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return listdir(path)

    with WorkerPool(1, spares=0, interactive_budget=0.01) as pool:
        caplog.set_level("DEBUG", logger="jsonnet_worker")
        monkeypatch.setattr(os, "listdir", no_proc)
        for _ in range(2):
            call = Running(pool, MEDIUM_GO, timeout=20.0)
            assert "value" in call.join()
        monkeypatch.undo()
        shortfalls = [r for r in caplog.records if "demotion fell short" in r.getMessage()]
        assert [r.levelname for r in shortfalls] == ["WARNING", "DEBUG"]
        assert "unreadable" in shortfalls[0].getMessage()
        assert "process group to nice 19" in shortfalls[0].getMessage()
        assert pool.stats().recycles == 2  # demoted (nice 19) all the same


def test_the_autogroup_of_a_process_without_a_session_of_its_own_is_left_alone() -> None:
    """An autogroup is a session's: a process in ours (a fork, no setsid) shares our group,
    which ``demote`` must not renice. Its threads are demoted all the same."""
    if not scheduling.autogroups_enabled():
        pytest.skip(NO_AUTOGROUPS)
    ours = scheduling.autogroup_nice(os.getpid())  # None in the root group (PID 1's session)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(write)
        os.read(read, 1)  # until the test is done
        os._exit(0)
    os.close(read)
    try:
        demotion = scheduling.demote(child)
        assert scheduling.autogroup_nice(os.getpid()) == ours
        assert not demotion.autogroup and demotion.idle == 1
        assert "leads no session of its own" in demotion.shortfall
    finally:
        if ours is not None and scheduling.autogroup_nice(os.getpid()) != ours:  # put it back
            with open(f"/proc/{os.getpid()}/autogroup", "w") as autogroup:
                autogroup.write(str(ours))
        os.close(write)
        os.waitpid(child, 0)


@pytest.mark.skipif(not ROOT, reason="switching autogroups off is root's (a sysctl)")
@pytest.mark.skipif(not scheduling.autogroups_enabled(), reason=NO_AUTOGROUPS)
def test_an_autogroup_is_left_alone_where_autogroups_are_switched_off() -> None:
    """With ``kernel.sched_autogroup_enabled`` at 0 a session's autogroup still takes a nice
    value, and weighs nothing: ``demote`` must not report it as applied."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.setsid()  # a session, so an autogroup, of its own: as a worker's
        os.close(write)
        os.read(read, 1)  # until the test is done
        os._exit(0)
    os.close(read)
    switch = "/proc/sys/kernel/sched_autogroup_enabled"
    try:
        wait_until(lambda: os.getsid(child) == child)
        with open(switch, "w") as enabled:
            enabled.write("0")
        demotion = scheduling.demote(child)
        assert not demotion.autogroup and demotion.idle == 1 and demotion.shortfall == ""
        assert scheduling.autogroup_nice(child) == 0
    finally:
        with open(switch, "w") as enabled:
            enabled.write("1")
        os.close(write)
        os.waitpid(child, 0)


def test_a_worker_whose_cgroup_or_autogroup_alone_was_demoted_is_recycled() -> None:
    """Where every thread refused but its process went into the idle cgroup, or its
    autogroup to nice 19, the worker is demoted all the same: ``applied`` (the state then
    recycles it after its call), never served again at full priority as if untouched."""
    assert scheduling.Demotion(cgroup=True, shortfall="threads refused").applied
    assert scheduling.Demotion(autogroup=True, shortfall="threads refused").applied
    assert not scheduling.Demotion(shortfall="everything refused").applied


def test_demote_leaves_alone_what_is_gone() -> None:
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    assert scheduling.demote(child) == scheduling.Demotion()


# -- the threat model: who can undo it --------------------------------------------------------

UNDO = """
import os, resource, time
deadline = time.monotonic() + 20
while os.sched_getscheduler(0) != os.SCHED_IDLE and time.monotonic() < deadline:
    pass
result = {"demoted": os.sched_getscheduler(0) == os.SCHED_IDLE, "nice": os.getpriority(0, 0)}

def attempt(name, function, *args):
    try:
        function(*args)
        result[name] = "done"
    except OSError as exc:
        result[name] = exc.errno
    except ValueError as exc:
        result[name] = str(exc)

attempt("this thread", os.sched_setscheduler, 0, os.SCHED_OTHER, os.sched_param(0))
attempt("main thread", os.sched_setscheduler, os.getpid(), os.SCHED_OTHER, os.sched_param(0))
attempt("nice 0", os.setpriority, os.PRIO_PROCESS, 0, 0)
attempt("RLIMIT_NICE", resource.setrlimit, resource.RLIMIT_NICE, (40, 40))
attempt("parent", os.sched_setscheduler, os.getppid(), os.SCHED_IDLE, os.sched_param(0))

def autogroup_nice_0():
    with open("/proc/self/autogroup", "w") as autogroup:
        autogroup.write("0")

attempt("autogroup", autogroup_nice_0)

def leave_the_idle_cgroup():
    with open(PARENT_CGROUP_PROCS, "w") as procs:
        procs.write(str(os.getpid()))

attempt("cgroup", leave_the_idle_cgroup)
result["after"] = [os.sched_getscheduler(0), os.getpriority(0, 0)]
spin = time.monotonic() + 0.5  # a moment for the test to look from outside
while time.monotonic() < spin:
    pass
"""


def compromised_pool(**options: Any) -> WorkerPool:
    """Workers whose engine runs a request's Python after the full start-up (the harness's
    model of a compromised engine), as a root parent's (dropped to nobody) or, run
    unprivileged (.ci/isolation-as-user), a non-root parent's."""
    identity = resolve_identity("nobody") if ROOT else None
    command = harness_command("python", identity=identity)
    return seams.pool_of(seams.re_exec(command), 1, spares=0, **options)


def exiting(pid: int) -> bool:
    """``pid`` has begun to exit (the kernel's PF_EXITING, set before its cgroups are
    left), or is gone."""
    try:
        fields = proc_stat(pid)
    except FileNotFoundError:
        return True
    return fields[0] in "ZX" or bool(int(fields[6]) & 0x4)


def undo() -> str:
    """``UNDO``, told where the idle cgroup's parent is (the application's cgroup)."""
    parent = os.path.dirname(IDLE_GROUP.directory or "/sys/fs/cgroup/cpu/x")
    return f"PARENT_CGROUP_PROCS = {os.path.join(parent, 'cgroup.procs')!r}\n{UNDO}"


def test_a_compromised_worker_cannot_undo_its_demotion() -> None:
    with compromised_pool(interactive_budget=0.05, timeout=30.0) as pool:
        call = Running(pool, undo(), timeout=30.0)
        wait_until(lambda: all_threads(call.pid, idle), timeout=20)
        while call.running:  # and it stays so, seen from outside, until the call ends
            try:
                policies = scheduling.thread_policies(call.pid)
                cgroup = idlegroup.cgroup_of(call.pid)
            except FileNotFoundError:
                break
            if exiting(call.pid):  # its cgroup may already be undone: it was not alive
                break
            assert all(idle(p) for p in policies), policies
            if IDLE_GROUP.directory:  # and in the idle cgroup
                assert cgroup.endswith("/" + idlegroup.IDLE_GROUP), cgroup
        result = call.join()["value"]
    assert result["demoted"] and result["nice"] == 0
    assert result["this thread"] == errno.EPERM  # RLIMIT_NICE 0, no CAP_SYS_NICE
    assert result["main thread"] == errno.EPERM
    assert result["nice 0"] == "done"  # nice 0 is no raise: it stays SCHED_IDLE
    assert result["RLIMIT_NICE"] != "done"  # its hard limit is 0
    assert result["parent"] == errno.EPERM  # seccomp: only the worker itself
    assert result["autogroup"] == errno.EACCES  # Landlock: no file to write, /proc's neither
    assert result["cgroup"] == errno.EACCES  # nor a cgroup's
    assert result["after"] == [os.SCHED_IDLE, 0]


def test_a_compromised_worker_at_nice_19_cannot_lower_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(tid: int, policy: int, param: os.sched_param) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    snippet = (
        undo()
        .replace("os.sched_getscheduler(0) != os.SCHED_IDLE", "os.getpriority(0, 0) != 19")
        .replace('"demoted": os.sched_getscheduler(0) == os.SCHED_IDLE', '"demoted": True')
    )
    with compromised_pool(interactive_budget=0.05, timeout=30.0) as pool:
        monkeypatch.setattr(os, "sched_setscheduler", refused)
        call = Running(pool, snippet, timeout=30.0)
        result = call.join()["value"]
    assert result["nice"] == scheduling.LOWEST_NICE
    assert result["nice 0"] == errno.EACCES  # lowering a nice value takes RLIMIT_NICE
    assert result["after"] == [os.SCHED_OTHER, scheduling.LOWEST_NICE]


# -- a non-root parent ------------------------------------------------------------------------


def _as_nobody() -> None:
    if ROOT:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)


def _burner() -> int:
    """A child that burns CPU on three threads as nobody (or as us, unprivileged), in a
    session of its own, as a worker."""
    child = os.fork()
    if child == 0:
        try:
            os.setsid()
            _as_nobody()

            def spin() -> None:
                while True:
                    pass

            for _ in range(2):
                threading.Thread(target=spin, daemon=True).start()
            spin()
        finally:
            os._exit(1)
    return child


def test_a_non_root_parent_demotes_its_same_uid_worker_but_cannot_promote_it() -> None:
    """The mechanism with a real non-root caller: a process of the worker's uid (nobody,
    or this unprivileged user) demotes every thread of it, and is refused the way back;
    which is why a demoted worker is recycled, not promoted. (Under
    .ci/isolation-as-user the pool tests above run with a non-root parent for real.)"""
    burner = _burner()
    read, write = os.pipe()
    try:
        wait_until(lambda: len(scheduling.thread_policies(burner)) == 3)
        parent = os.fork()
        if parent == 0:
            try:
                _as_nobody()
                demotion = scheduling.demote(burner)
                report: dict[str, Any] = {
                    "idle": demotion.idle,
                    "autogroup": demotion.autogroup,
                    "shortfall": demotion.shortfall,
                }
                tid = scheduling.thread_policies(burner)[-1].tid
                try:
                    os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                    report["promote"] = "done"
                except OSError as exc:
                    report["promote"] = exc.errno
                os.write(write, json.dumps(report).encode())
            finally:
                os._exit(0)
        os.waitpid(parent, 0)
        report = json.loads(os.read(read, 4096))
        # Its autogroup too, unless another unprivileged change came within 0.1 s (EAGAIN).
        # Run as root, the burner became nobody by setresuid, which left it non-dumpable:
        # its /proc files are root's, so the nobody parent may not write them (a real
        # non-root parent's workers keep its uid, as under .ci/isolation-as-user).
        allowed = ["", "autogroup nice 19: rate-limited by the kernel (EAGAIN)"]
        if ROOT:
            allowed.append("autogroup nice 19: Permission denied")
        assert report["shortfall"] in allowed
        assert report["autogroup"] is (report["shortfall"] == "")
        if report["autogroup"]:
            assert scheduling.autogroup_nice(burner) == scheduling.LOWEST_NICE
        assert (report["idle"], report["promote"]) == (3, errno.EPERM)
        assert all_threads(burner, idle)
    finally:
        os.kill(burner, signal.SIGKILL)
        os.waitpid(burner, 0)
        os.close(read)
        os.close(write)
