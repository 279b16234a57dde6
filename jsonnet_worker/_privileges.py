"""Who a worker runs as, and how many tasks and files it may have.

Goals: a worker started by a root parent holds no root powers (no capabilities, no
supplementary groups, no uid 0 that Landlock or seccomp would be the only thing standing
against); a fork or thread bomb and an fd leak end in a typed error (EAGAIN / EMFILE, which
Python raises as ``OSError``/``RuntimeError``) instead of exhausting the host; both runtimes
keep working in a pool of several workers.

Plan:
  * In the parent, ``resolve_identity()`` turns ``worker_user`` (default ``nobody``) into a
    uid and gid, only when the parent is root: the worker cannot read /etc/passwd once
    restricted, so the numbers travel on its command line.
  * In the worker, before any untrusted input and before Landlock, ``set_task_and_file_limits``
    counts the tasks the target uid already has (RLIMIT_NPROC counts every task, threads
    included, of a real uid: all ``nobody`` processes on the host) and allows
    ``TASK_HEADROOM`` more, and caps the fd table at ``FILE_LIMIT`` (the loop needs about ten
    fds). Then ``drop_to()`` clears supplementary groups and sets the real, effective and
    saved gid and uid, and proves it cannot get root back. The caller re-arms
    PR_SET_PDEATHSIG afterwards: the kernel clears it when credentials change.

Weak spots: the headroom is shared by every process of the uid, so a thread bomb in one
worker can briefly starve another worker's new Go threads (that worker then crashes and is
replaced; the bomb ends with its caller's timeout). RLIMIT_NPROC does not bind uid 0, so a
worker left as root (``worker_user=None``) reports the limits layer missing. A dedicated uid
per pool would isolate better; ``nobody`` is the default because it exists everywhere.
"""

from __future__ import annotations

import errno
import os
import pwd
import resource
from dataclasses import dataclass

from ._status import LayerState, LayerStatus

DEFAULT_WORKER_USER = "nobody"
NOBODY_ID = 65534  # the overflow uid/gid: nobody's number where /etc/passwd lacks it
TASK_HEADROOM = 256  # a Go worker runs ~8 threads (GOMAXPROCS=2), a C++ one 2
# Where /proc is refused (under restrict_host) the uid's tasks cannot be counted: a fixed cap,
# high enough for a host's other ``nobody`` processes, still bounds a fork or thread bomb.
TASK_LIMIT_UNCOUNTED = 4096
FILE_LIMIT = 64


@dataclass(frozen=True)
class WorkerIdentity:
    """The unprivileged user a root parent's workers run as."""

    user: str
    uid: int
    gid: int


def resolve_identity(user: str | None) -> WorkerIdentity | None:
    """In the parent: whom workers drop to, or None (not root, or ``user`` is None).

    Raises ValueError for an unknown user (other than ``nobody``, which falls back to the
    overflow id 65534) or for a user that is root itself.
    """
    if user is None or os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        if user == DEFAULT_WORKER_USER:
            return WorkerIdentity(user, NOBODY_ID, NOBODY_ID)
        raise ValueError(f"worker_user {user!r}: no such user") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise ValueError(f"worker_user {user!r} is root or in group root: nothing is dropped")
    return WorkerIdentity(user, entry.pw_uid, entry.pw_gid)


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
