"""Whom a pool's workers run as, decided in the parent: the worker user or a uid range turned
into identities, one handed to each worker it starts (the worker's own drop to it is
``_sandbox.privileges``).

Plan: ``WorkerIdentities(worker_user)`` turns ``worker_user`` into identities, only when the
parent is root: a user name (default ``nobody``) is one identity every worker shares; a uid
range (``range(FIRST, LAST + 1)`` or the string ``"FIRST-LAST"``) hands each live worker a uid
of its own (``acquire()`` when it starts, ``release()`` once it is reaped), with the gid of the
same number. The worker cannot read /etc/passwd once restricted, so the numbers travel on its
command line.

Weak spots: a uid range is refused if any of its uids or gids names an existing user or
group, but processes that run under such numbers without a passwd entry cannot be seen from
here: choose a range nothing else uses.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import re
import threading

from .._errors import InvalidArgument
from .._sandbox.privileges import WorkerIdentity

DEFAULT_WORKER_USER = "nobody"
NOBODY_ID = 65534  # the overflow uid/gid: nobody's number where /etc/passwd lacks it
_UID_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_LAST_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to the set*id calls


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

    Raises InvalidArgument (a ``jsonnet_worker.Error``, also a ValueError) for an unknown
    user (other than ``nobody``, which falls back to the overflow id 65534) or for a user
    that is root itself.
    """
    if user is None or os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        if user == DEFAULT_WORKER_USER:
            return WorkerIdentity(user, NOBODY_ID, NOBODY_ID)
        raise InvalidArgument(f"worker_user {user!r}: no such user") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise InvalidArgument(f"worker_user {user!r} is root or in group root: nothing is dropped")
    return WorkerIdentity(user, entry.pw_uid, entry.pw_gid)
