"""Demotion: every thread of a worker moved to ``SCHED_IDLE`` (or nice 19), from outside.

Goals: a call that runs past the pool's ``interactive_budget`` yields the CPU to every call
that has not: the kernel runs a ``SCHED_IDLE`` thread only when no normal thread wants the
CPU (measured here, docs/SANDBOX.md: a light call's p99 beside four CPU burners went from
8.0 ms to 1.6 ms once they were idle). Pure mechanism: when to demote, and that a demoted
worker is recycled after its call, are the facade's and ``state``'s.

Plan: ``demote(pid)`` lists ``/proc/<pid>/task`` and moves each thread with
``sched_setscheduler(tid, SCHED_IDLE)``; where that is refused (EPERM, EACCES: a kernel or
a security module that says no), ``setpriority(PRIO_PROCESS, tid, 19)``. It lists again
until no new thread appears (at most ``MAX_ROUNDS``): a thread born of a demoted thread is
born demoted, but one born of a thread not yet reached is not. A thread that vanished on
the way (ESRCH) is fine. Where ``/proc`` cannot be read (a host under ``restrict_host``:
its Landlock layer allows no ``/proc``), every thread gets nice 19 at once through its
process group (``setpriority(PRIO_PGRP)``: each worker leads a process group of its own,
``start_new_session`` or the fork server's ``setsid``, and it cannot fork). The result, a
``Demotion``, says what was applied and why not more; ``Demoter`` logs the first shortfall
of a pool once, at WARNING, and the rest at DEBUG: never silently.

Its autogroup too: with ``CONFIG_SCHED_AUTOGROUP`` (on in most distributions' kernels, and
here), each session is a task group of its own, and a policy or a nice value only weighs
against the threads of the same group. A worker leads a session of its own, so at the top
level its group weighs as much as the application's whole session, whatever its threads'
policy: ``SCHED_IDLE`` alone left the victim's light calls over 3 ms in 6-8% of them beside
two demoted looping calls, a scheduler tick's wait on a run queue (tails run on a quiet
machine, 3 runs of 500 calls: 40/34/29 such calls). So ``demote`` first sets the worker's
autogroup to nice 19 (``/proc/<pid>/autogroup``; 18/17/14 in the same runs), and only for a
session leader: another session's group would hold more than this worker. Without
autogroups (no such file, or ``kernel.sched_autogroup_enabled`` at 0, where the write would
change nothing) there is nothing to do. An application that never started a session of its
own (a process tree under PID 1's, as some CI runners' and containers' are) is in the root
group and has no autogroup to compare: its worker's still gets nice 19. An unprivileged
parent is allowed 10 autogroup changes a second, system-wide (EAGAIN past it): that
shortfall is logged too. Not kept in the application's session instead (``setpgid``
without ``setsid``): that halved the same tails, but made the application and all its
workers one group against every other session on the machine (beside another session's
load, the victim's p99 went from 9-21 ms to 44-84 ms).

Best of all, where there is one (root, a kernel with ``cpu.idle``: ``idlegroup``), ``demote``
first moves the worker into an idle cpu cgroup under the application's own, which any
waking thread of another group preempts at once; a process in a cgroup other than the root
one is in no autogroup, so its autogroup is then left alone. ``Demoter`` finds that group at
a pool's first demotion and says once, at INFO, why there is none.

Why the worker cannot undo it: it runs as an unprivileged uid (``nobody``, or a non-root
parent's uid) without CAP_SYS_NICE, with RLIMIT_NICE 0 (hard, so it cannot raise it), and
the kernel lets such a thread leave ``SCHED_IDLE`` or lower its nice value only within
RLIMIT_NICE: ``sched_setscheduler(0, SCHED_OTHER)`` and ``setpriority(PRIO_PROCESS, 0, 0)``
answer EPERM (tests/test_scheduling.py tries both from inside a compromised worker), and its
Landlock layer refuses it ``/proc/self/autogroup`` for writing, as every file.
Seccomp lets those calls through only for the worker itself, so it cannot reach the
parent's or another worker's scheduling either. ``SCHED_RESET_ON_FORK`` resets only
real-time policies and negative nice values, so new threads stay demoted.

Why the right process: the pid is a worker of the pool, a child of this process, held by
the caller that demotes it; a child is reaped only by its ``ChildProcess`` owner (through
its caller, or the supervisor once the caller gives it up), so while it is demoted its pid
cannot be reused. Its thread ids are in its own ``/proc/<pid>/task``, which lists only its
threads.

What a non-root parent can do: move its workers (its own uid) to ``SCHED_IDLE`` and raise
their nice value, but not move them back (only root, CAP_SYS_NICE or RLIMIT_NICE can). That
is why a demoted worker is recycled after its call rather than promoted.

Weak spots: a worker that creates threads faster than we list them could keep a thread at
normal priority past ``MAX_ROUNDS`` (RLIMIT_NPROC bounds how many; the shortfall is logged);
the nice fallback still leaves the worker a share of the CPU (about 1.5% of a nice-0
thread's per thread), where ``SCHED_IDLE`` leaves it almost none; an autogroup at nice 19
still runs its slice once picked (only ``SCHED_IDLE`` within one group is preempted at once
by a waking thread), so about half of those tails remain; the listing and the calls take
tens of microseconds per thread, on the caller's thread (or event loop).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from .idlegroup import IdleGroup

logger = logging.getLogger("jsonnet_worker")

__all__ = [
    "LOWEST_NICE",
    "MAX_ROUNDS",
    "Demoter",
    "Demotion",
    "ThreadPolicy",
    "autogroup_nice",
    "demote",
    "thread_policies",
]

LOWEST_NICE = 19
# Listings of /proc/<pid>/task before we give up on threads that keep appearing.
MAX_ROUNDS = 8
_REFUSED = (errno.EPERM, errno.EACCES)


@dataclass(frozen=True, slots=True)
class Demotion:
    """What ``demote`` applied: threads moved to ``SCHED_IDLE`` (``idle``), given nice 19
    where that was refused (``niced``; ``group``: the whole process group at once, /proc
    being unreadable), and ``shortfall``: why some or all threads were not demoted (empty
    when every thread was)."""

    idle: int = 0
    niced: int = 0
    group: bool = False
    cgroup: bool = False  # the process moved into the idle cpu cgroup (``idlegroup``)
    autogroup: bool = False  # its autogroup (its session's) set to nice 19
    shortfall: str = ""

    @property
    def applied(self) -> bool:
        """Something of the worker was demoted (a thread, its process group, its cgroup or
        its autogroup): it must not serve another call at full priority."""
        return bool(self.idle or self.niced or self.group or self.cgroup or self.autogroup)

    def describe(self) -> str:
        parts = []
        if self.idle:
            parts.append(f"{self.idle} thread(s) to SCHED_IDLE")
        if self.niced:
            parts.append(f"{self.niced} thread(s) to nice {LOWEST_NICE}")
        if self.group:
            parts.append(f"its process group to nice {LOWEST_NICE}")
        if self.cgroup:
            parts.append("its process to the idle cpu cgroup")
        if self.autogroup:
            parts.append(f"its autogroup to nice {LOWEST_NICE}")
        return ", ".join(parts) or "nothing"


def demote(pid: int, idle_group: IdleGroup | None = None) -> Demotion:
    """Move process ``pid`` (a child of ours, unreaped) into ``idle_group`` if there is one,
    and every thread of it to ``SCHED_IDLE``, or to nice 19 where that is refused. See the
    module docstring."""
    refused: list[str] = []
    cgroup = autogroup = False
    if idle_group is not None and idle_group.directory:
        why_not = idle_group.admit(pid)
        cgroup = not why_not
        refused += [why_not] if why_not else []
    if not cgroup:  # in a cgroup other than the root one, a process is in no autogroup
        autogroup, why_not = _demote_autogroup(pid)
        refused += [why_not] if why_not else []
    threads = _demote_threads(pid, refused)
    if isinstance(threads, str):
        group = _demote_group(pid, "; ".join([*refused, threads]))
        return replace(group, cgroup=cgroup, autogroup=autogroup)
    idle, niced = threads
    return Demotion(idle, niced, cgroup=cgroup, autogroup=autogroup, shortfall="; ".join(refused))


def _demote_threads(pid: int, refused: list[str]) -> tuple[int, int] | str:
    """Every thread of ``pid``: how many went to ``SCHED_IDLE`` and to nice 19, with why
    some did not added to ``refused``; or, where its threads cannot be listed at all, why."""
    seen: set[int] = set()
    idle = niced = 0
    for _ in range(MAX_ROUNDS):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:  # it has exited: nothing of it runs any more
            return idle, niced
        except OSError as exc:
            if not seen:
                return f"/proc/{pid}/task is unreadable ({exc.strerror})"
            refused.append(f"/proc/{pid}/task: {exc.strerror}")
            return idle, niced
        new = [tid for tid in map(int, tids) if tid not in seen]
        if not new:
            return idle, niced
        for tid in new:
            seen.add(tid)
            how = _demote_thread(tid)
            if how == "idle":
                idle += 1
            elif how == "nice":
                niced += 1
            elif how:
                refused.append(how)
    refused.append(f"new threads kept appearing after {MAX_ROUNDS} listings")
    return idle, niced


def _demote_autogroup(pid: int) -> tuple[bool, str]:
    """The worker's autogroup to nice 19: (applied, why not). Nothing to do, and nothing
    missing, where autogroups do not weigh (a kernel without them, or with them switched off
    by ``kernel.sched_autogroup_enabled``, where a write would succeed and change nothing)
    or once the worker has exited. Only for a session leader: an autogroup is a session's,
    and another session's would hold more than this worker (this process, the fork server)."""
    if not autogroups_enabled():
        return False, ""
    try:
        session = os.getsid(pid)
        if session != pid:
            return False, f"autogroup: it leads no session of its own (session {session})"
        with open(f"/proc/{pid}/autogroup", "w") as autogroup:
            autogroup.write(str(LOWEST_NICE))
        return True, ""
    except (FileNotFoundError, ProcessLookupError):  # no autogroups, or it has exited
        return False, ""
    except OSError as exc:
        if exc.errno == errno.EAGAIN:  # unprivileged: 10 changes a second, system-wide
            return False, f"autogroup nice {LOWEST_NICE}: rate-limited by the kernel (EAGAIN)"
        return False, f"autogroup nice {LOWEST_NICE}: {exc.strerror}"


def autogroups_enabled() -> bool:
    """The kernel schedules sessions as autogroups (``CONFIG_SCHED_AUTOGROUP``, switched on)."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as enabled:
            return enabled.read().strip() != "0"
    except FileNotFoundError:  # a kernel without autogroups
        return False
    except OSError:  # unreadable (a host under restrict_host): the write says what is allowed
        return True


def autogroup_nice(pid: int) -> int | None:
    """The nice value of ``pid``'s autogroup (``/proc/<pid>/autogroup``: "/autogroup-N nice
    V"). None where its session has no autogroup: a kernel without them (no such file), or a
    process tree that never started a session of its own since boot (init's, an empty file:
    its threads are in the root group, as on a machine whose services run under PID 1's
    session). For tests."""
    try:
        with open(f"/proc/{pid}/autogroup") as autogroup:
            fields = autogroup.read().split()
    except FileNotFoundError:
        return None
    return int(fields[-1]) if fields else None


def _demote_thread(tid: int) -> str:
    """One thread: "idle", "nice", "" (it vanished), or why neither was applied."""
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return "idle"
    except ProcessLookupError:
        return ""
    except OSError as exc:
        if exc.errno not in _REFUSED:
            return f"thread {tid}: SCHED_IDLE: {exc.strerror}"
        idle_refused = exc.strerror
    try:
        os.setpriority(os.PRIO_PROCESS, tid, LOWEST_NICE)
        return "nice"
    except ProcessLookupError:
        return ""
    except OSError as exc:
        return f"thread {tid}: SCHED_IDLE: {idle_refused}; nice {LOWEST_NICE}: {exc.strerror}"


def _demote_group(pid: int, why: str) -> Demotion:
    """Without /proc: nice 19 for every thread of the process group ``pid`` leads (the
    kernel walks its threads); not SCHED_IDLE, which takes one thread id at a time."""
    try:
        if os.getpgid(pid) != pid:  # not a group leader: its group holds other processes
            return Demotion(shortfall=f"{why}; it leads no process group of its own")
        os.setpriority(os.PRIO_PGRP, pid, LOWEST_NICE)
    except ProcessLookupError:
        return Demotion()
    except OSError as exc:
        return Demotion(shortfall=f"{why}; nice {LOWEST_NICE} for its group: {exc.strerror}")
    return Demotion(group=True, shortfall=f"{why}: nice {LOWEST_NICE}, not SCHED_IDLE")


class Demoter:
    """``demote`` for one pool, into the idle cgroup it finds at its first demotion (or, if
    none, saying once at INFO why not), logging its first shortfall at WARNING (a host whose
    /proc is refused would otherwise log one per long call) and the rest at DEBUG."""

    def __init__(self, find_idle_group: Callable[[], IdleGroup] | None = None) -> None:
        self._lock = threading.Lock()
        self._warned = False
        self._find_idle_group = find_idle_group or IdleGroup.find
        self._idle_group: IdleGroup | None = None

    def idle_group(self) -> IdleGroup:
        with self._lock:
            if self._idle_group is None:
                self._idle_group = self._find_idle_group()
                if self._idle_group.unavailable:
                    logger.info(
                        "no idle cpu cgroup for demoted workers (%s): they stay in the "
                        "application's, at SCHED_IDLE, their autogroup at nice %d",
                        self._idle_group.unavailable,
                        LOWEST_NICE,
                    )
            return self._idle_group

    def demote(self, pid: int) -> Demotion:
        demotion = demote(pid, self.idle_group())
        if demotion.shortfall:
            with self._lock:
                level = logging.DEBUG if self._warned else logging.WARNING
                self._warned = True
            logger.log(
                level,
                "worker %d: a long call's demotion fell short (%s): %s",
                pid,
                demotion.describe(),
                demotion.shortfall,
                extra={"worker_pid": pid},
            )
        return demotion


@dataclass(frozen=True, slots=True)
class ThreadPolicy:
    """One thread's scheduling as anyone may read it from outside: its policy
    (``os.SCHED_*``) and nice value."""

    tid: int
    policy: int
    nice: int

    @property
    def demoted(self) -> bool:
        return self.policy == os.SCHED_IDLE or self.nice == LOWEST_NICE


def thread_policies(pid: int) -> list[ThreadPolicy]:
    """Every thread of ``pid`` now (``sched_getscheduler`` and ``getpriority`` per tid: no
    permission needed); threads that vanish meanwhile are left out. For tests."""
    policies = []
    for name in os.listdir(f"/proc/{pid}/task"):
        tid = int(name)
        try:
            policies.append(
                ThreadPolicy(tid, os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))
            )
        except ProcessLookupError:
            continue
    return policies
