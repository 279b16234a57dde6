"""Each worker's tasks bounded on its own: a cgroup per worker whose ``pids.max`` caps the
threads and processes it may have at once (issue 22).

Goals: one worker's thread bomb ends in that worker, never in its neighbours' or its fork
server's next fork. ``RLIMIT_NPROC`` cannot give that: it counts every task of a *real uid*,
and forked workers share their fork server's uid (``nobody`` by default), so a worker that
fills its uid's headroom makes the fork server's next ``clone`` fail with ``EAGAIN`` and the
pool falls back to slow re-exec workers for every tenant. A cgroup's ``pids.max`` counts the
tasks in that cgroup whatever their uid: one cgroup per worker is a per-worker bound under a
shared uid. Every cgroup the pool makes is owned by one object that removes it, nothing is
left behind after ``close``, and leftovers of a crashed pool never break a new one. Where no
pids controller is writable, the pool says so (the ``tasks`` entry of ``pool.sandbox``, and
one log line: a WARNING where a root parent could have had it) and keeps ``RLIMIT_NPROC``
alone, as before: never silently.

Plan: ``find_hierarchy`` reads ``/proc/self/mountinfo`` and ``/proc/self/cgroup``: cgroup v2
where this process's cgroup has the ``pids`` controller available (it must be enabled for
the children too: a delegated subtree, whose own processes live in a leaf), else the cgroup
v1 ``pids`` hierarchy. ``TaskLimits`` (one per pool, made with its supervisor) makes
``jsonnet-worker/<pool-pid>-<n>/`` under this process's own cgroup of that hierarchy and
checks it is a pids cgroup; ``place`` then makes, per worker, a leaf ``w<k>`` with
``pids.max`` = ``task_limit`` and moves the worker's whole thread group into it
(``cgroup.procs``: the threads it has started, the Go runtime's ~7, move with it). The
supervisor places a new worker, forked or re-executed, right after the fork server's (or
Popen's) answer gave its pid and before it reads the worker's hello: that is before any
untrusted code runs, since a worker evaluates only once a caller writes a request to it, which
needs it greeted, IDLE and checked out (docs/DESIGN.md, "Call flow"). The pid cannot be reused
meanwhile: the worker is an unreaped child of this process. Each fork server gets a leaf
``f<k>`` too, with ``task_limit + 1``: a forked worker is born in its fork server's cgroup and
stays there until the pool moves it (one fork at a time), so that cgroup holds the fork server,
one child and what that child starts before the move (measured: 8 tasks), never untrusted
code; and the fork server is bounded like its workers. ``TaskCgroup.remove`` removes a
worker's cgroup once the worker is reaped (a cgroup can be removed only once its tasks are
gone); ``TaskLimits.close`` removes the pool's directory once its last cgroup is gone (a
worker a caller still holds at ``terminate()``: with that one), and a new pool removes the
directories of pools whose process is gone (a crash: their workers died with them,
PR_SET_PDEATHSIG). ``restrict_host`` grants the pool's directory (what is beneath it) to the
host's Landlock layer. ``TaskCgroup.limit_reached`` reads ``pids.events``: a worker that died
after its cgroup refused it a task (the Go runtime then aborts: "pthread_create failed")
ended of its task limit, which the pool reports as such (``WorkerCrashed``, not a memory
error). Measured here (cgroup v1): mkdir, the two writes and the rmdir cost ~0.2-0.3 ms per
worker, 5-10% of the fork server's answer to a fork (~3 ms), ~4% of a fork to its hello.

Weak spots: the per-worker bound is not a bound on the pool: several workers bombing at once
each take up to ``task_limit`` tasks of their uid's ``RLIMIT_NPROC`` headroom (256 above what
the uid had when the fork server started), so more than 256 / ``task_limit`` workers bombing
together can still make a fork fail (the pool then re-executes until the fork server is back,
as before); a uid range (``worker_user="FIRST-LAST"``) removes that. cgroup v2 was exercised
only through ``find_hierarchy`` here (this machine's pids controller is on v1). A worker whose
placement fails (no cgroup can be made, e.g. the controller's cgroup count is exhausted) is
refused like any start-up failure: fail closed. Under ``restrict_host`` the pool's own
(empty) directory cannot be removed at close (its layer grants what is beneath it): the next
pool started after this process has gone removes it. The ``jsonnet-worker`` directory itself
is shared by every pool of the host and stays.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import threading
from dataclasses import dataclass

from .._wire.layers import LayerState, LayerStatus
from . import cgroupfs

logger = logging.getLogger("jsonnet_worker")

# The layer's name in ``pool.sandbox``.
LAYER = "tasks"
POOLS_DIR = "jsonnet-worker"
_POOL_NAME = re.compile(r"^(\d+)-(\d+)$")
# Names tried for a pool's directory before giving up (a name is taken only by a stale
# directory of a process that had this pid before).
_NAME_TRIES = 64
_pool_numbers = itertools.count(1)
FALLBACK = (
    "each worker is bounded by RLIMIT_NPROC only, which every worker of its uid shares: a "
    "thread bomb in one can make the fork server's next fork fail (re-exec workers until "
    "it is back); a uid range as worker_user gives each worker its own"
)


@dataclass(frozen=True)
class Hierarchy:
    """Where a pool's task cgroups go: under ``base`` (``<this process's cgroup>/jsonnet-worker``)
    of a cgroup ``version`` 1 or 2 hierarchy with the pids controller."""

    version: int
    base: str


def find_hierarchy(mountinfo: str, cgroups: str) -> Hierarchy | str:
    """The pids hierarchy a pool can use, from the text of ``/proc/self/mountinfo`` and
    ``/proc/self/cgroup``; or why there is none. cgroup v2 first, where this process's cgroup
    has the ``pids`` controller; else the v1 ``pids`` hierarchy. Reads the v2 cgroup's
    ``cgroup.controllers``; writes nothing."""
    v2_mount, v1_mount = cgroupfs.mounts(mountinfo, "pids")
    v2_path, v1_path = cgroupfs.own_cgroups(cgroups, "pids")
    reasons = []
    if v2_mount is not None and v2_path is not None:
        own = cgroupfs.inside(v2_mount, v2_path)
        if own is None:
            reasons.append(f"cgroup v2: this process's cgroup {v2_path} is outside the mount")
        elif "pids" in cgroupfs.read_words(os.path.join(own, "cgroup.controllers")):
            return Hierarchy(2, os.path.join(own, POOLS_DIR))
        else:
            reasons.append(f"cgroup v2: the pids controller is not enabled for {own}")
    if v1_mount is not None and v1_path is not None:
        own = cgroupfs.inside(v1_mount, v1_path)
        if own is not None:
            return Hierarchy(1, os.path.join(own, POOLS_DIR))
        reasons.append(f"cgroup v1: this process's pids cgroup {v1_path} is outside the mount")
    elif not reasons:
        reasons.append("no cgroup hierarchy with the pids controller is mounted")
    return "; ".join(reasons)


def _remove_tree(path: str) -> bool:
    """Remove a cgroup directory and the cgroups below it, deepest first (each only once its
    tasks are gone: rmdir refuses a populated cgroup with EBUSY). Whether it is gone."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return True
    except OSError:
        return False
    gone = all(_remove_tree(entry.path) for entry in entries if entry.is_dir(follow_symlinks=False))
    if not gone:
        return False
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


class TaskCgroup:
    """One worker's (or one fork server's) cgroup: made and owned by ``TaskLimits.place``,
    removed by ``remove`` once the process in it is reaped."""

    def __init__(self, owner: TaskLimits, path: str, limit: int) -> None:
        self.owner = owner
        self.path = path
        self.limit = limit
        self._removed = False

    def __repr__(self) -> str:
        return f"<TaskCgroup {self.path} pids.max={self.limit}>"

    def limit_reached(self) -> bool:
        """Whether a fork or a thread in it was refused at its ``pids.max`` (``pids.events``
        ``max``, counted by the kernel). Read before ``remove``."""
        try:
            with open(os.path.join(self.path, "pids.events")) as events:
                for line in events:
                    name, _, count = line.partition(" ")
                    if name == "max":
                        return int(count) > 0
        except (OSError, ValueError):
            pass
        return False

    def remove(self) -> None:
        """Remove the cgroup: call once its process is reaped (its tasks are gone then). A
        cgroup that cannot be removed yet stays for ``TaskLimits.close``. Idempotent."""
        if self._removed:
            return
        self._removed = True
        self.owner.release(self)


class TaskLimits:
    """One pool's task cgroups (see the module docstring): its directory, a ``TaskCgroup``
    per worker and per fork server, and the ``tasks`` entry of ``pool.sandbox``.

    ``place`` is called from the supervisor thread; ``TaskCgroup.remove`` and ``close`` from
    any thread (a caller closes the worker it holds)."""

    def __init__(self, limit: int | None, hierarchy: Hierarchy | str | None = None) -> None:
        self.limit = limit
        self.directory: str | None = None
        self._owner_pid = os.getpid()  # a fork of the application removes nothing of ours
        self._lock = threading.Lock()
        self._live = 0
        self._closed = False
        self._names = itertools.count(1)
        if limit is None:
            self.status = LayerStatus(LAYER, LayerState.OFF, reason=f"task_limit=None: {FALLBACK}")
            return
        if hierarchy is None:
            hierarchy = host_hierarchy()
        if isinstance(hierarchy, str):
            self.status = self._missing(hierarchy)
            return
        try:
            self.directory = self._make_directory(hierarchy)
        except OSError as exc:
            self.status = self._missing(
                f"cannot make cgroups under {hierarchy.base} ({exc.strerror or exc}; a "
                "non-root parent needs a delegated cgroup v2 subtree with the pids controller)"
            )
            return
        self.status = LayerStatus(
            LAYER,
            LayerState.ACTIVE,
            detail=(
                f"cgroup v{hierarchy.version} pids.max {limit} per worker, under {self.directory}"
            ),
        )
        self._version = hierarchy.version

    @property
    def active(self) -> bool:
        return self.directory is not None

    @staticmethod
    def _missing(reason: str) -> LayerStatus:
        return LayerStatus(LAYER, LayerState.MISSING, reason=f"{reason}: {FALLBACK}")

    def _make_directory(self, hierarchy: Hierarchy) -> str:
        """Make this pool's directory (and the pools' directory), cleaning up those of pools
        whose process is gone; on cgroup v2 enable the pids controller below each level."""
        parent = os.path.dirname(hierarchy.base)
        if hierarchy.version == 2:
            _enable_pids(parent)
        os.makedirs(hierarchy.base, exist_ok=True)
        if hierarchy.version == 2:
            _enable_pids(hierarchy.base)
        _clean_stale(hierarchy.base)
        me = os.getpid()
        for _ in range(_NAME_TRIES):
            path = os.path.join(hierarchy.base, f"{me}-{next(_pool_numbers)}")
            try:
                os.mkdir(path)
            except FileExistsError:
                _remove_tree(path)  # a process with our pid before us left it: never ours
                continue
            try:
                if hierarchy.version == 2:
                    _enable_pids(path)
                if not os.path.exists(os.path.join(path, "pids.max")):
                    raise OSError(errno.ENOTSUP, f"{path} is not a pids cgroup")
            except OSError:
                os.rmdir(path)
                raise
            return path
        raise OSError(errno.EEXIST, f"{_NAME_TRIES} names taken under {hierarchy.base}")

    def place(self, pid: int, *, fork_server: bool = False) -> TaskCgroup | None:
        """Put process ``pid`` (a new worker, or a fork server: ``task_limit + 1``, see the
        module docstring), every thread of it, in a new cgroup of its own. None when the
        limits are not active; raises OSError (nothing is left made) when a cgroup cannot be
        made or the process moved."""
        if self.directory is None or self.limit is None:
            return None
        limit = self.limit + 1 if fork_server else self.limit
        path = os.path.join(self.directory, f"{'f' if fork_server else 'w'}{next(self._names)}")
        os.mkdir(path)
        try:
            cgroupfs.write(os.path.join(path, "pids.max"), str(limit))
            # The whole thread group, with the threads it has already started.
            cgroupfs.write(os.path.join(path, "cgroup.procs"), str(pid))
        except BaseException:
            _remove_tree(path)
            raise
        with self._lock:
            self._live += 1
        return TaskCgroup(self, path, limit)

    def release(self, cgroup: TaskCgroup) -> None:
        """``cgroup.remove``: its process is reaped; remove it (and the pool's directory
        after the last one, once the pool is closing)."""
        if os.getpid() != self._owner_pid:
            return
        if not _remove_tree(cgroup.path):
            logger.debug("jsonnet_worker: cgroup %s not removed yet (tasks left)", cgroup.path)
        with self._lock:
            self._live -= 1
            last = self._closed and self._live == 0
        if last:
            self._remove_directory()

    def close(self) -> None:
        """The pool is closing: its directory is removed now if its cgroups are gone, else
        with the last one (a worker a caller still holds). Idempotent."""
        with self._lock:
            self._closed = True
            last = self._live == 0
        if last:
            self._remove_directory()

    def _remove_directory(self) -> None:
        directory = self.directory
        if directory is None or os.getpid() != self._owner_pid:
            return
        if not _remove_tree(directory):
            # A process left in it, or a host under restrict_host (its layer grants what is
            # beneath this directory, not the directory itself): harmless, empty cgroups.
            logger.info(
                "jsonnet_worker: the pool's task cgroups %s could not all be removed; a pool "
                "started once this process is gone removes them",
                directory,
            )


def _enable_pids(directory: str) -> None:
    """cgroup v2: the pids controller for the children of ``directory`` (refused with EBUSY
    where processes live in it: the no-internal-process rule; delegate a subtree)."""
    if "pids" not in cgroupfs.read_words(os.path.join(directory, "cgroup.subtree_control")):
        cgroupfs.write(os.path.join(directory, "cgroup.subtree_control"), "+pids")


def _clean_stale(base: str) -> None:
    """Remove the directories of pools whose process is gone (a crash, a SIGKILL): their
    workers died with them (PR_SET_PDEATHSIG); one still exiting is left for the next pool."""
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    for entry in entries:
        match = _POOL_NAME.match(entry.name)
        gone = match is not None and not _alive(int(match[1]))
        if gone and entry.is_dir(follow_symlinks=False) and _remove_tree(entry.path):
            logger.info("jsonnet_worker: removed the task cgroups of a gone pool %s", entry.path)


def host_hierarchy() -> Hierarchy | str:
    """This process's pids hierarchy (``find_hierarchy`` on its own /proc files), or why
    there is none."""
    try:
        return find_hierarchy(*cgroupfs.read_own())
    except OSError as exc:
        return f"cannot read this process's cgroups ({exc.strerror or exc})"
