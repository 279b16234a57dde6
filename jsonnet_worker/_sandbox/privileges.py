"""Who a worker runs as, what it shares with other workers, and how many tasks and files it
may have.

Goals: a worker started by a root parent holds no root powers (no capabilities, no
supplementary groups, no uid 0 that Landlock or seccomp would be the only thing standing
against); where the parent can grant it, each live worker has a uid of its own, so no
same-uid path (signals, prlimit, ptrace, /proc) exists between two workers at all and
``RLIMIT_NPROC`` counts one worker; a root parent's worker also gets an IPC namespace of its
own; a fork or thread bomb and an fd leak end in a typed error (EAGAIN / EMFILE, which
Python raises as ``OSError``/``RuntimeError``) instead of exhausting the host; both runtimes
keep working in a pool of several workers.

Plan (in the worker; whom it drops to is decided by the parent, ``_pool.identities``):
  * In the worker, while still root and before the drop, ``new_ipc_namespace()`` unshares
    the IPC namespace (defence in depth: the seccomp filter refuses every System V and
    POSIX queue call already). Then ``set_task_and_file_limits`` counts the tasks the target
    uid already has (RLIMIT_NPROC counts every task, threads included, of a real uid) and
    allows ``TASK_HEADROOM`` more, and caps the fd table at ``FILE_LIMIT`` (the loop needs
    about ten fds). Then ``drop_to()`` clears supplementary groups and sets the real,
    effective and saved gid and uid, and proves it cannot get root back. The caller re-arms
    PR_SET_PDEATHSIG afterwards: the kernel clears it when credentials change.
  * ``new_ipc_namespace`` and ``uid_status`` report both as layers: active, missing and
    why (a non-root parent: the workers share the host application's uid and IPC
    namespace), or off (one ``worker_user`` shared by every worker: the configuration's
    choice).

Weak spots: with one shared user (``nobody``, the default because it exists everywhere)
the task headroom is shared by every process of that uid. A root parent bounds each
worker's tasks on its own too, with a pids cgroup per worker (``_pool/tasklimit.py``), so
one worker's thread bomb ends at its own limit; where no pids cgroup is writable (a
non-root parent), a bomb can still briefly starve another worker's new Go threads and the
fork server's next fork (that worker then crashes and is replaced); a uid range removes
that. RLIMIT_NPROC does not bind uid 0, so a worker left as root (``worker_user=None``)
reports the limits layer missing.

Its values are ``_wire.values.valueclass``es, not dataclasses: every worker imports this
module, and ``dataclasses`` (with ``inspect``) would cost each worker's start ~18 ms.
"""

from __future__ import annotations

import errno
import os
import resource

from .._wire.layers import LayerState, LayerStatus
from .._wire.values import valueclass

TASK_HEADROOM = 256  # a Go worker runs ~8 threads (GOMAXPROCS=2), a C++ one 2
# Where /proc is refused (under restrict_host) the uid's tasks cannot be counted: a fixed cap,
# high enough for a host's other ``nobody`` processes, still bounds a fork or thread bomb.
TASK_LIMIT_UNCOUNTED = 4096
FILE_LIMIT = 64
CLONE_NEWIPC = 0x08000000


@valueclass
class WorkerIdentity:
    """The unprivileged user a root parent's worker runs as. ``own_uid``: this uid belongs
    to this one worker while it lives (it came from a uid range)."""

    user: str
    uid: int
    gid: int
    own_uid: bool = False


def count_tasks(uid: int) -> int | None:
    """Tasks (threads) whose real uid is ``uid``, as RLIMIT_NPROC counts them; None where
    /proc cannot be listed (a host restricted with ``restrict_host`` forbids it)."""
    try:
        entries = os.listdir("/proc")
    except PermissionError:
        return None
    tasks = 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as status:
                data = status.read(4096)
        except OSError:
            continue  # exited meanwhile
        uid_at, threads_at = data.find(b"\nUid:"), data.find(b"\nThreads:")
        if uid_at < 0 or threads_at < 0:
            continue
        if int(data[uid_at + 5 :].split(None, 1)[0]) == uid:
            tasks += int(data[threads_at + 9 :].split(None, 1)[0])
    return tasks


def highest_open_fd() -> int:
    """From /proc/self/fd, or by probing where /proc is refused (the worker holds a dozen
    fds, all low)."""
    try:
        return max(int(fd) for fd in os.listdir("/proc/self/fd"))
    except PermissionError:
        highest = 2
        for fd in range(3, 1024):
            try:
                os.fstat(fd)
            except OSError:
                continue
            highest = fd
        return highest


def set_task_and_file_limits(uid: int) -> LayerStatus:
    """RLIMIT_NPROC and RLIMIT_NOFILE for a worker that will run as ``uid``."""
    tasks = count_tasks(uid)
    if tasks is None:
        task_limit = TASK_LIMIT_UNCOUNTED
        counted = "fixed: the uid's tasks cannot be counted without /proc"
    else:
        task_limit = tasks + TASK_HEADROOM
        counted = f"{tasks} + {TASK_HEADROOM}"
    file_limit = max(FILE_LIMIT, highest_open_fd() + 16)
    resource.setrlimit(resource.RLIMIT_NPROC, (task_limit, task_limit))
    resource.setrlimit(resource.RLIMIT_NOFILE, (file_limit, file_limit))
    detail = f"RLIMIT_NPROC {task_limit} ({counted}), RLIMIT_NOFILE {file_limit}"
    if uid == 0:
        return LayerStatus(
            "limits",
            LayerState.MISSING,
            detail=detail,
            reason="RLIMIT_NPROC does not bind root",
        )
    return LayerStatus("limits", LayerState.ACTIVE, detail=detail)


def drop_to(identity: WorkerIdentity) -> None:
    """Become ``identity`` for good: no supplementary groups, real/effective/saved ids set.

    Runs while the process has one thread (glibc broadcasts set*id to every thread anyway).
    Raises OSError if any step fails or root can be regained."""
    os.setgroups([])
    os.setresgid(identity.gid, identity.gid, identity.gid)
    os.setresuid(identity.uid, identity.uid, identity.uid)
    if os.getresuid() != (identity.uid,) * 3 or os.getresgid() != (identity.gid,) * 3:
        raise OSError(errno.EPERM, "the uid/gid did not change")
    if os.getgroups() not in ([], [identity.gid]):
        raise OSError(errno.EPERM, f"supplementary groups remain: {os.getgroups()}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise OSError(errno.EPERM, "setuid(0) succeeded after the drop")


def privilege_status(identity: WorkerIdentity | None) -> LayerStatus:
    """What the worker runs as, after ``drop_to`` (or without it)."""
    uid, gid = os.getuid(), os.getgid()
    groups = os.getgroups()
    who = f"uid {uid}, gid {gid}, groups {groups or 'none'}"
    if identity is not None:
        return LayerStatus("privileges", LayerState.ACTIVE, f"{identity.user}: {who}")
    if os.geteuid() == 0:
        return LayerStatus(
            "privileges",
            LayerState.MISSING,
            detail=who,
            reason="root parent and worker_user=None",
        )
    return LayerStatus("privileges", LayerState.ACTIVE, f"not root, nothing to drop: {who}")


def new_ipc_namespace() -> LayerStatus:
    """In the worker, while root and before the drop: a System V IPC and POSIX message queue
    namespace of its own. Best effort: a container without CAP_SYS_ADMIN refuses it."""
    if os.geteuid() != 0:
        return LayerStatus(
            "ipc_namespace",
            LayerState.MISSING,
            reason="the parent is not root, so the host's IPC namespace (seccomp refuses IPC)",
        )
    # Imported here: the pool side reads this module for ``WorkerIdentity`` only (ctypes
    # costs ``eval`` ~4 ms); a worker has imported ctypes long before it gets here.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ctypes.set_errno(0)
    if libc.unshare(ctypes.c_int(CLONE_NEWIPC)) != 0:
        err = ctypes.get_errno()
        return LayerStatus(
            "ipc_namespace",
            LayerState.MISSING,
            reason=f"unshare(CLONE_NEWIPC): {os.strerror(err)} (errno {err})",
        )
    return LayerStatus("ipc_namespace", LayerState.ACTIVE, "a new IPC namespace")


def uid_status(identity: WorkerIdentity | None) -> LayerStatus:
    """Whether this worker's uid is its own, after ``drop_to`` (or without it)."""
    uid = os.getuid()
    if identity is not None and identity.own_uid and uid == identity.uid:
        return LayerStatus("uid", LayerState.ACTIVE, f"uid {uid}, this worker's alone")
    if identity is not None:  # worker_user names one user: the configuration's choice
        return LayerStatus(
            "uid",
            LayerState.OFF,
            reason=f"worker_user {identity.user!r}: uid {uid} is shared by every worker; a "
            "uid range as worker_user gives each its own",
        )
    if os.geteuid() == 0:
        return LayerStatus("uid", LayerState.MISSING, reason="root parent and worker_user=None")
    return LayerStatus(
        "uid", LayerState.MISSING, reason=f"the parent is not root, so workers run as its uid {uid}"
    )
