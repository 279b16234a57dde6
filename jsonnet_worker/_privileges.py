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

Plan:
  * In the parent, ``WorkerIdentities(worker_user)`` turns ``worker_user`` into identities,
    only when the parent is root: a user name (default ``nobody``) is one identity every
    worker shares; a uid range (``range(FIRST, LAST + 1)`` or the string ``"FIRST-LAST"``)
    hands each live worker a uid of its own (``acquire()`` when it starts, ``release()``
    once it is reaped), with the gid of the same number. The worker cannot read
    /etc/passwd once restricted, so the numbers travel on its command line.
  * In the worker, while still root and before the drop, ``new_ipc_namespace()`` unshares
    the IPC namespace (defence in depth: the seccomp filter refuses every System V and
    POSIX queue call already). Then ``set_task_and_file_limits`` counts the tasks the target
    uid already has (RLIMIT_NPROC counts every task, threads included, of a real uid) and
    allows ``TASK_HEADROOM`` more, and caps the fd table at ``FILE_LIMIT`` (the loop needs
    about ten fds). Then ``drop_to()`` clears supplementary groups and sets the real,
    effective and saved gid and uid, and proves it cannot get root back. The caller re-arms
    PR_SET_PDEATHSIG afterwards: the kernel clears it when credentials change.
  * ``new_ipc_namespace`` and ``uid_status`` report both as layers: active, or missing and
    why (a non-root parent: the workers share the host application's uid and IPC
    namespace).

Weak spots: with one shared user (``nobody``, the default because it exists everywhere)
the task headroom is shared by every process of that uid, so a thread bomb in one worker
can briefly starve another worker's new Go threads (that worker then crashes and is
replaced); a uid range removes that. RLIMIT_NPROC does not bind uid 0, so a worker left as
root (``worker_user=None``) reports the limits layer missing. A uid range is refused if any
of its uids or gids names an existing user or group, but processes that run under such
numbers without a passwd entry cannot be seen from here: choose a range nothing else uses.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import os
import pwd
import re
import resource
import threading
from dataclasses import dataclass

from ._errors import InvalidArgument
from ._status import LayerState, LayerStatus

DEFAULT_WORKER_USER = "nobody"
NOBODY_ID = 65534  # the overflow uid/gid: nobody's number where /etc/passwd lacks it
TASK_HEADROOM = 256  # a Go worker runs ~8 threads (GOMAXPROCS=2), a C++ one 2
# Where /proc is refused (under restrict_host) the uid's tasks cannot be counted: a fixed cap,
# high enough for a host's other ``nobody`` processes, still bounds a fork or thread bomb.
TASK_LIMIT_UNCOUNTED = 4096
FILE_LIMIT = 64
CLONE_NEWIPC = 0x08000000
_UID_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_LAST_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to the set*id calls


@dataclass(frozen=True)
class WorkerIdentity:
    """The unprivileged user a root parent's worker runs as. ``own_uid``: this uid belongs
    to this one worker while it lives (it came from a uid range)."""

    user: str
    uid: int
    gid: int
    own_uid: bool = False


def parse_worker_user(value: str | range | None) -> str | range | None:
    """``worker_user`` as given (config, CLI, keyword): a user name, a uid range, the string
    ``"FIRST-LAST"`` (inclusive) for a range, or None. Raises InvalidArgument for a bad range."""
    if isinstance(value, str) and (match := _UID_RANGE.match(value)):
        value = range(int(match[1]), int(match[2]) + 1)
    if isinstance(value, range):
        if value.step != 1 or len(value) == 0:
            raise InvalidArgument(
                f"worker_user range must be FIRST-LAST with FIRST <= LAST: {value}"
            )
        if value.start < 1 or value.stop - 1 > _LAST_ID:
            raise InvalidArgument(f"worker_user range must lie within 1-{_LAST_ID}: {value}")
    return value


def _range_text(ids: range) -> str:
    return f"{ids.start}-{ids.stop - 1}"


class WorkerIdentities:
    """Whom a pool's workers drop to: one shared identity, a uid per live worker from a
    range, or nobody at all (the parent is not root, or ``worker_user`` is None).

    ``acquire()`` is called when a worker is started and ``release()`` once it is reaped;
    both are thread-safe. A range raises ``OSError(EUSERS)`` from ``acquire()`` when every
    uid is held by a live worker (the pool reports a start failure and retries).
    """

    def __init__(self, worker_user: str | range | None = DEFAULT_WORKER_USER) -> None:
        self.worker_user = parse_worker_user(worker_user)
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._shared: WorkerIdentity | None = None
        self.uids: range | None = None
        if self.worker_user is None or os.geteuid() != 0:
            return
        if isinstance(self.worker_user, range):
            _check_unused(self.worker_user)
            self.uids = self.worker_user
            self._free = list(reversed(self.worker_user))
        else:
            self._shared = resolve_identity(self.worker_user)

    @property
    def drops(self) -> bool:
        """Whether workers change uid at all."""
        return self.uids is not None or self._shared is not None

    def acquire(self) -> WorkerIdentity | None:
        if self.uids is None:
            return self._shared
        with self._lock:
            if not self._free:
                raise OSError(
                    errno.EUSERS,
                    f"every uid of worker_user {_range_text(self.uids)} is held by a live "
                    "worker: give a range larger than size + spares",
                )
            uid = self._free.pop()
        return WorkerIdentity(f"uid {uid}", uid, uid, own_uid=True)

    def release(self, identity: WorkerIdentity | None) -> None:
        if identity is None or not identity.own_uid or self.uids is None:
            return
        with self._lock:
            if identity.uid in self.uids and identity.uid not in self._free:
                self._free.append(identity.uid)

    def in_use(self) -> int:
        """How many uids of the range live workers hold (0 without a range)."""
        with self._lock:
            return 0 if self.uids is None else len(self.uids) - len(self._free)


def _check_unused(ids: range) -> None:
    """Refuse a range that names an existing user or group: its processes and files would
    share a uid or gid with a worker."""
    users = sorted(entry.pw_name for entry in pwd.getpwall() if entry.pw_uid in ids)
    groups = sorted(entry.gr_name for entry in grp.getgrall() if entry.gr_gid in ids)
    if users or groups:
        raise InvalidArgument(
            f"worker_user range {_range_text(ids)} includes existing "
            + ", ".join(
                part
                for part in (
                    f"users {', '.join(users)}" if users else "",
                    f"groups {', '.join(groups)}" if groups else "",
                )
                if part
            )
            + ": choose uids no user or group has"
        )


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


def new_ipc_namespace() -> LayerStatus:
    """In the worker, while root and before the drop: a System V IPC and POSIX message queue
    namespace of its own. Best effort: a container without CAP_SYS_ADMIN refuses it."""
    if os.geteuid() != 0:
        return LayerStatus(
            "ipc_namespace",
            LayerState.MISSING,
            reason="the parent is not root, so the host's IPC namespace (seccomp refuses IPC)",
        )
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
    if identity is not None:
        return LayerStatus(
            "uid",
            LayerState.MISSING,
            reason=f"uid {uid} ({identity.user}) is shared by every worker; a uid range "
            "as worker_user gives each its own",
        )
    if os.geteuid() == 0:
        return LayerStatus("uid", LayerState.MISSING, reason="root parent and worker_user=None")
    return LayerStatus(
        "uid", LayerState.MISSING, reason=f"the parent is not root, so workers run as its uid {uid}"
    )
