"""Open files of live processes, seen from outside: what each fd is (/proc/PID/fd and
fdinfo) and whether two fds of two processes are one open file description
(``kcmp(KCMP_FILE)``). For tests/test_open_files.py and the matrix's ``shared-open-file`` row
(tests/test_isolation_matrix.py). The caller must be allowed to inspect both processes
(root, or their uid and outside their Landlock domain)."""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
from dataclasses import dataclass

from jsonnet_worker._sandbox import seccomp

KCMP_FILE = 0
_TABLE = seccomp.table_for_machine()
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class OpenFile:
    """One fd of a process, as /proc shows it: what it points to and its status flags."""

    fd: int
    target: str  # the /proc/PID/fd link: "/dev/null", "socket:[N]", "pipe:[N]", ...
    flags: int  # fdinfo's "flags:" (octal in /proc), O_CLOEXEC included

    @property
    def access(self) -> int:
        return self.flags & os.O_ACCMODE


def open_files(pid: int) -> dict[int, OpenFile]:
    files = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            with open(f"/proc/{pid}/fdinfo/{name}") as info:
                fields = dict(line.split(":", 1) for line in info if ":" in line)
        except FileNotFoundError:  # closed meanwhile (this process's own listing fd)
            continue
        files[int(name)] = OpenFile(int(name), target, int(fields["flags"].strip(), 8))
    return files


def same_open_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool | None:
    """kcmp(KCMP_FILE): whether the two fds are one open file description (None: one of
    them is closed by now)."""
    assert _TABLE is not None
    ctypes.set_errno(0)
    answer = _LIBC.syscall(
        ctypes.c_long(_TABLE.number("kcmp")),
        ctypes.c_long(pid1),
        ctypes.c_long(pid2),
        ctypes.c_long(KCMP_FILE),
        ctypes.c_long(fd1),
        ctypes.c_long(fd2),
    )
    if answer < 0:
        err = ctypes.get_errno()
        if err == errno.EBADF:
            return None
        raise OSError(err, f"kcmp({pid1}, {pid2}, KCMP_FILE, {fd1}, {fd2})")
    return bool(answer == 0)


def shared_open_files(pids: dict[str, int], involving: str | None = None) -> list[str]:
    """Every pair of fds of two different processes (named) that is one open file
    description; with ``involving``, only the pairs with a fd of that process."""
    files = {name: open_files(pid) for name, pid in pids.items()}
    shared = []
    for (first, pid1), (second, pid2) in itertools.combinations(pids.items(), 2):
        if involving is not None and involving not in (first, second):
            continue
        for fd1, fd2 in itertools.product(files[first], files[second]):
            if same_open_file(pid1, fd1, pid2, fd2):
                target = files[first][fd1].target
                shared.append(f"{first} fd {fd1} is {second} fd {fd2} ({target})")
    return shared


def held_elsewhere(target: str, pid: int, others: list[int]) -> list[str]:
    """Where else ``target`` (an inode such as "pipe:[N]") is open, among ``others``."""
    return [
        f"pid {other} fd {file.fd}"
        for other in others
        if other != pid
        for file in open_files(other).values()
        if file.target == target
    ]
