"""The capability matrix of docs/ISOLATION.md, measured: a fully compromised worker tries
everything, under four stacks of layers, and each row of the document must hold.

A harness worker (tests/harness/worker_harness.py, mode ``python``) runs arbitrary Python
after the complete start-up: a model of an engine an attacker fully controls. Each probe
reports ``allowed`` or the errno that refused it. The columns:

  kratos    Landlock filesystem rights only (what Ory Kratos applies)
  landlock  Landlock with the ABI 4 net rights and the ABI 6 scopes (no seccomp, no new
            limits, no IPC namespace, no privilege drop)
  full      this project's worker under a root parent (dropping to nobody, a new IPC
            namespace)
  nonroot   this project's worker under a non-root parent: it keeps the parent's uid (the
            host application's) and the host's IPC namespace

When the tests run as root, ``nonroot`` is played by a harness that first becomes
``PARENT_UID``, the uid of a stand-in host application; run as an unprivileged user
(.ci/isolation-as-user), the real worker is the ``nonroot`` column and only that column is
asserted (the others describe a root parent).

Each project column has a ``marked`` twin whose seccomp filter answers ENOTRECOVERABLE
instead of EPERM: a probe refused with that errno was refused by seccomp, so a cell naming
seccomp is checked, not assumed. A cell naming another layer is checked by taking layers
away: Landlock refuses the same way without seccomp; the privilege drop and the limits
refuse what the worker without them is allowed; RLIMIT_DATA refuses in every column.
Probes aimed at "another process" aim at a victim of the worker's own uid (another
``nobody`` process for ``full``, the host application for ``nonroot``).

A probe that would leave something host-wide (an abstract unix name bound, a lock on
/dev/null) is also looked at from outside (``LOOKS``): this unsandboxed process must find
what an "allowed" cell's worker took taken, and what a refused one tried free (it binds the
name, takes the flock, queries the byte). The ``shared-open-file`` row is that look alone:
kcmp(KCMP_FILE) of every fd of the worker against every fd of this process and of the other
columns' workers ("private": none is the same open file description).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import harness_command
from fdview import shared_open_files
from jsonnet_worker._config import DEFAULT_TASK_LIMIT
from jsonnet_worker._pool.identities import NOBODY_ID, resolve_identity
from jsonnet_worker._pool.tasklimit import TaskLimits
from jsonnet_worker._sandbox.landlock import probe
from rawworker import RawWorker

pytestmark = pytest.mark.skipif(
    not probe().available or probe().abi < 6,
    reason=f"the matrix is written for Landlock ABI >= 6 (kernel: {probe().state.value})",
)

ISOLATION_DOC = Path(__file__).parent.parent / "docs" / "ISOLATION.md"
SECCOMP_MARKER = errno.ENOTRECOVERABLE
ROOT = os.geteuid() == 0
COLUMNS = ("kratos", "landlock", "full", "nonroot")
# The stand-in host application's uid for the ``nonroot`` column when the tests run as root
# (no passwd entry is needed for a uid).
PARENT_UID = 54321
# Per project column: its marked twin (seccomp answers the marker) and its twin without
# seccomp and the new limits (Landlock alone behind).
MARKED = {"full": "full-marked", "nonroot": "nonroot-marked"}
WITHOUT_SECCOMP = {"full": "landlock", "nonroot": "nonroot-landlock"}
# The columns whose worker a pool would put in a pids cgroup of its own (a root parent's).
PLACED = ("full", "full-marked")
TWO_GIB = 2 << 30  # past every worker's 1 GiB memory limit

# What every probe starts with. ``outcome`` turns an action into "allowed" or an errno name.
PRELUDE = """
import ctypes, errno, os, socket, struct, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
L = ctypes.c_long  # variadic syscall() arguments must be full machine words
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p] + [ctypes.c_size_t] * 2 + [ctypes.c_int, ctypes.c_void_p]
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
FAILED = ctypes.c_void_p(-1).value
def check_pointer(value, what):
    if value in (None, FAILED):
        err = ctypes.get_errno()
        raise OSError(err, what)
    return value
def check(value):
    if value == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return value
def outcome(action):
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "allowed"
def same_outcome(*actions):
    outcomes = [outcome(action) for action in actions]
    return outcomes[0] if len(set(outcomes)) == 1 else "/".join(outcomes)
def lock_stdin(command, kind, start):
    # fcntl(0, command, struct flock {l_type, l_whence, l_start, l_len = 1, l_pid = 0}) on
    # fd 0 (/dev/null): the l_type the kernel wrote back
    request = ctypes.create_string_buffer(struct.pack("hhqqi", kind, 0, start, 1, 0), 32)
    check(libc.fcntl(0, command, request))
    return struct.unpack("hhqqi", request.raw[:28])[0]
"""

# A 64-bit x86 ELF that calls exit(42): header, one PT_LOAD, 12 bytes of code.
_CODE = bytes.fromhex("bf2a000000b83c0000000f05")
_ELF = (
    struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,
        2, 0x3E, 1, 0x400078, 64, 0, 0, 64, 56, 1, 0, 0, 0,
    )
    + struct.pack("<IIQQQQQQ", 1, 5, 0, 0x400000, 0x400000, 120 + 12, 120 + 12, 0x1000)
    + _CODE
)  # fmt: skip


def _held_threads(count: int) -> str:
    """A probe that starts ``count`` threads and holds them all until the last has started
    (or one is refused), then lets them go."""
    return f"""
def bomb():
    release = threading.Event()
    started = []
    threading.stack_size(65536)  # small stacks: RLIMIT_DATA alone would allow thousands
    try:
        for _ in range({count}):
            thread = threading.Thread(target=release.wait)
            try:
                thread.start()
            except RuntimeError:  # "can't start new thread": pthread_create said EAGAIN
                raise OSError(errno.EAGAIN, "thread") from None
            started.append(thread)
    finally:
        threading.stack_size(0)
        release.set()
        for thread in started:
            thread.join()
result = outcome(bomb)
"""


# Each probe: Python run inside the worker after start-up, setting ``result``. Names in
# braces are filled from the ``Targets`` the test opened.
PROBES: dict[str, str] = {
    "read-file": "result = outcome(lambda: open({open_file!r}).read())",
    "write-file": "result = outcome(lambda: os.close(os.open({open_file!r}, os.O_WRONLY)))",
    "create-file": (
        "result = outcome(lambda: os.close(os.open({new_file!r}, os.O_CREAT | os.O_WRONLY)))"
    ),
    "unlink-file": "result = outcome(lambda: os.unlink({victim!r}))",
    "list-dir": "result = outcome(lambda: os.listdir({open_dir!r}))",
    "stat-open": "result = outcome(lambda: os.stat({open_file!r}))",
    "readlink-open": "result = outcome(lambda: os.readlink({link!r}))",
    "stat-private": "result = outcome(lambda: os.stat({private_file!r}))",
    "exec-path": "result = outcome(lambda: os.execv('/bin/true', ['/bin/true']))",
    "memfd-create": "result = outcome(lambda: os.close(os.memfd_create('probe')))",
    "execveat-memfd": """
def run_elf():
    fd = os.memfd_create("elf")
    os.write(fd, {elf!r})
    pid = os.fork()
    if pid == 0:
        libc.syscall(L(322), L(fd), b"", None, None, L(0x1000))  # execveat, AT_EMPTY_PATH
        os._exit(100 + ctypes.get_errno())
    os.close(fd)
    status = os.waitpid(pid, 0)[1]
    if os.WEXITSTATUS(status) != 42:
        raise OSError(os.WEXITSTATUS(status) - 100, "execveat")
result = outcome(run_elf)
""",
    "tcp-connect": """
def connect():
    with socket.socket() as s:
        s.connect(("127.0.0.1", {tcp_port}))
result = outcome(connect)
""",
    "tcp-bind": """
def bind():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
result = outcome(bind)
""",
    "udp-sendto": """
def send():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"probe", ("127.0.0.1", {udp_port}))
result = outcome(send)
""",
    "unix-pathname": """
def connect():
    with socket.socket(socket.AF_UNIX) as s:
        s.connect({unix_path!r})
result = outcome(connect)
""",
    "unix-abstract": """
def connect():
    with socket.socket(socket.AF_UNIX) as s:
        s.connect({unix_abstract!r})
result = outcome(connect)
""",
    "abstract-bind": """
def squat():
    channel = socket.socket(fileno=os.dup(2))  # its stderr channel, a connected socket
    try:
        channel.bind({squat_name!r})
    finally:
        channel.close()  # the dup only: the channel stays open, and bound if it was
result = outcome(squat)
""",
    "listen-accept": """
channel = socket.socket(fileno=os.dup(2))
result = same_outcome(
    lambda: channel.listen(1),
    lambda: check(libc.accept(2, None, None)),
    lambda: check(libc.accept4(2, None, None, 0)),
)
channel.close()
""",
    "channel-connect": """
def connect():
    with socket.socket(fileno=os.dup(2)) as channel:
        channel.connect({unix_abstract!r})
result = outcome(connect)
""",
    "flock": "result = outcome(lambda: check(libc.flock(0, 2 | 4)))  # LOCK_EX|LOCK_NB, fd 0",
    "posix-lock": """
result = same_outcome(  # F_SETLK, F_SETLKW: a read lock on one byte of /dev/null
    lambda: lock_stdin(6, 0, {lock_start}), lambda: lock_stdin(7, 0, {lock_start})
)
""",
    "ofd-lock": """
result = same_outcome(  # F_OFD_SETLK, F_OFD_SETLKW: a read lock on one byte of /dev/null
    lambda: lock_stdin(37, 0, {lock_start}), lambda: lock_stdin(38, 0, {lock_start})
)
""",
    "lock-test": """
def seen(command):  # F_GETLK / F_OFD_GETLK: would a write lock on that byte conflict?
    if lock_stdin(command, 1, {held_start}) == 2:  # F_UNLCK: the test's lock not seen
        raise OSError(errno.ENOENT, "no lock seen")
result = same_outcome(lambda: seen(5), lambda: seen(36))
""",
    # O_NONBLOCK on fd 0: a bit every process sharing its open file description would see
    "shared-open-file": "result = outcome(lambda: os.set_blocking(0, False))",
    "kill-parent": "result = outcome(lambda: os.kill(os.getppid(), 0))",
    "ptrace-parent": """
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
result = outcome(lambda: check(libc.ptrace(0x4206, os.getppid(), None, None)))  # SEIZE
""",
    "process-vm-readv": """
class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buffer = ctypes.create_string_buffer(8)
local, remote = Iovec(ctypes.addressof(buffer), 8), Iovec(0x1000, 8)
def read():
    try:
        check(libc.syscall(
            L(310), L(os.getppid()), ctypes.byref(local), L(1), ctypes.byref(remote), L(1), L(0)
        ))
    except OSError as exc:
        if exc.errno != errno.EFAULT:  # EFAULT: allowed, the address was just unmapped
            raise
result = outcome(read)
""",
    "chmod": "result = outcome(lambda: os.chmod({meta_file!r}, 0o666))",
    "utime": "result = outcome(lambda: os.utime({meta_file!r}))",
    "setxattr": "result = outcome(lambda: os.setxattr({meta_file!r}, 'user.probe', b'1'))",
    "unshare": "result = outcome(lambda: check(libc.unshare(0x04000000)))  # CLONE_NEWUTS",
    "mount": """
def mount():
    check(libc.mount(b"none", {mount_point!r}.encode(), b"tmpfs", 0, None))
    libc.umount2({mount_point!r}.encode(), 0)
result = outcome(mount)
""",
    "fork-bomb": """
def bomb():
    for _ in range(30):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
result = outcome(bomb)
""",
    "thread-bomb": _held_threads(1000),
    "task-limit": _held_threads(100),
    "shm-attach": """
def attach():
    shmid = check(libc.shmget({shm_key}, 0, 0))
    address = check_pointer(libc.shmat(shmid, None, 0), "shmat")
    ctypes.memmove(address, b"worker was here", 15)
    libc.shmdt(ctypes.c_void_p(address))
result = outcome(attach)
""",
    "shm-stat-any": """
def enumerate_segments():
    buffer = ctypes.create_string_buffer(256)
    highest = check(libc.shmctl(0, 14, buffer))  # SHM_INFO: the highest index in use
    found = [libc.shmctl(index, 15, buffer) for index in range(highest + 1)]  # SHM_STAT_ANY
    if not any(shmid >= 0 for shmid in found):
        raise OSError(ctypes.get_errno(), "SHM_STAT_ANY")
result = outcome(enumerate_segments)
""",
    "sem-attach": """
def attach():
    semid = check(libc.semget({sem_key}, 0, 0))
    check(libc.semctl(semid, 0, 12))  # GETVAL
result = outcome(attach)
""",
    "msg-attach": """
def attach():
    queue = check(libc.msgget({msg_key}, 0))
    check(libc.msgctl(queue, 2, ctypes.create_string_buffer(256)))  # IPC_STAT
result = outcome(attach)
""",
    "mq-open": """
def open_queue():
    name = {mq_name!r}.encode()
    queue = check(libc.mq_open(name, os.O_CREAT | os.O_RDWR, 0o600, None))
    libc.mq_close(queue)
    libc.mq_unlink(name)
result = outcome(open_queue)
""",
    "socketpair": """
def pair():
    for end in socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM):
        end.close()
result = outcome(pair)
""",
    "inotify": """
def watch():
    fd = check(libc.inotify_init1(0))
    try:
        check(libc.inotify_add_watch(fd, {open_dir!r}.encode(), 0x100))  # IN_CREATE
    finally:
        os.close(fd)
result = outcome(watch)
""",
    "fanotify": "result = outcome(lambda: os.close(check(libc.fanotify_init(0, os.O_RDONLY))))",
    "prlimit-other": """
import resource
def same_limit():
    current = resource.prlimit({victim_pid}, resource.RLIMIT_NOFILE)
    resource.prlimit({victim_pid}, resource.RLIMIT_NOFILE, current)
result = outcome(same_limit)
""",
    "setpriority-other": """
def renice():
    os.setpriority(os.PRIO_PROCESS, {victim_pid}, os.getpriority(os.PRIO_PROCESS, {victim_pid}))
result = outcome(renice)
""",
    "sched-setaffinity-other": """
result = outcome(lambda: os.sched_setaffinity({victim_pid}, os.sched_getaffinity({victim_pid})))
""",
    "sched-setscheduler-other": """
result = outcome(
    lambda: os.sched_setscheduler({victim_pid}, os.SCHED_OTHER, os.sched_param(0))
)
""",
    "ioprio-set-other": """
def same_ioprio():
    current = check(libc.syscall(L({ioprio_get}), L(1), L({victim_pid})))  # WHO_PROCESS
    check(libc.syscall(L({ioprio_set}), L(1), L({victim_pid}), L(current)))
result = outcome(same_ioprio)
""",
    "kill-other": "result = outcome(lambda: os.kill({victim_pid}, 0))",
    "pidfd-open": "result = outcome(lambda: os.close(os.pidfd_open({victim_pid})))",
    "kcmp": """
def compare():
    check(libc.syscall(L({kcmp}), L(os.getpid()), L({victim_pid}), L(1), L(0), L(0)))  # KCMP_VM
result = outcome(compare)
""",
    "syslog": """
buffer = ctypes.create_string_buffer(4096)
result = outcome(lambda: check(libc.klogctl(3, buffer, 4096)))  # SYSLOG_ACTION_READ_ALL
""",
    "sync": "result = outcome(lambda: check(libc.syscall(L({sync}))))",
    "mmap-shared-anon": """
def shared():
    address = check_pointer(libc.mmap(None, {two_gib}, 3, 0x21, -1, 0), "mmap")  # SHARED|ANON
    libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t({two_gib}))
result = outcome(shared)
""",
    "mmap-growsdown": """
def growsdown():
    flags = 0x22 | 0x100  # PRIVATE|ANONYMOUS|GROWSDOWN
    address = check_pointer(libc.mmap(None, {two_gib}, 3, flags, -1, 0), "mmap")
    libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t({two_gib}))
result = outcome(growsdown)
""",
    "mmap-private-over-limit": """
def private():
    address = check_pointer(libc.mmap(None, {two_gib}, 3, 0x22, -1, 0), "mmap")
    libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t({two_gib}))
result = outcome(private)
""",
    "mremap-stack": """
def grow_main_stack():
    # The main thread sleeps in join(): grow its stack by 2 GiB (in place, or moved where
    # there is no room), then shrink it back where it was.
    low, high = main_thread["stack"]
    grown = check_pointer(libc.mremap(low, high - low, {two_gib}, 1, None), "mremap")
    flags, target = (0, None) if grown == low else (3, low)  # MAYMOVE|FIXED: move it back
    if libc.mremap(grown, {two_gib}, high - low, flags, target) != low:
        os._exit(99)
result = outcome(grow_main_stack)
""",
    "fd-flood": """
def flood():
    fds = []
    try:
        for _ in range(400):
            fds.extend(os.pipe())
    finally:
        for fd in fds:
            os.close(fd)
result = outcome(flood)
""",
}


@dataclass
class Targets:
    """What the test opens for the probes: files, listeners, a mount point, host IPC objects,
    and per column a victim process of the worker's own uid."""

    open_dir: str  # mode 0777 under /tmp: the worker user passes every permission check
    private_dir: str  # mode 0700, owned by the parent's user
    tcp_port: int
    udp_port: int
    unix_path: str
    unix_abstract: str
    ipc_keys: dict[str, int]
    victims: dict[str, int]  # column -> pid

    def fields(self, column: str) -> dict[str, object]:
        x86 = os.uname().machine == "x86_64"
        return {
            "open_dir": self.open_dir,
            "open_file": f"{self.open_dir}/readable",
            "new_file": f"{self.open_dir}/created-by-worker",
            "victim": f"{self.open_dir}/victim",
            "link": f"{self.open_dir}/link",
            "meta_file": f"{self.open_dir}/metadata",
            "mount_point": f"{self.open_dir}/mnt",
            "private_file": f"{self.private_dir}/hidden",
            "tcp_port": self.tcp_port,
            "udp_port": self.udp_port,
            "unix_path": self.unix_path,
            "unix_abstract": self.unix_abstract,
            "elf": _ELF,
            "shm_key": self.ipc_keys["shm"],
            "sem_key": self.ipc_keys["sem"],
            "msg_key": self.ipc_keys["msg"],
            "mq_name": mq_name(column),
            "victim_pid": self.victims[column.removesuffix("-marked").removesuffix("-landlock")],
            "two_gib": TWO_GIB,
            "squat_name": squat_name(column),
            "lock_start": lock_start(column),
            "held_start": HELD_LOCK_START,
            "ioprio_get": 252 if x86 else 31,
            "ioprio_set": 251 if x86 else 30,
            "kcmp": 312 if x86 else 272,
            "sync": 162 if x86 else 81,
        }


def mq_name(column: str) -> str:
    return f"/jsonnet-worker-probe-{os.getpid()}-{column}"


def squat_name(column: str) -> str:
    """The abstract unix name a column's worker tries to bind its stderr channel to."""
    return f"\0jsonnet-worker-squat-{os.getpid()}-{column}"


# Record locks on /dev/null: the byte the test holds an OFD write lock on (for the worker to
# read back), and one byte per column for the worker's own (each column's is looked for).
HELD_LOCK_START = 10
ALL_COLUMNS = (*COLUMNS, *MARKED.values(), *WITHOUT_SECCOMP.values())


def lock_start(column: str) -> int:
    return 100 + ALL_COLUMNS.index(column)


def column_uid(column: str) -> int:
    """The uid a column's worker runs as."""
    if not ROOT:
        return os.getuid()
    return {"kratos": 0, "landlock": 0, "full": NOBODY_ID, "nonroot": PARENT_UID}[column]


class HostIpc:
    """System V objects of "another application" in the host's IPC namespace, mode 0666."""

    IPC_CREAT, IPC_RMID = 0o1000, 0

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        base = 0x4A570000 | (os.getpid() & 0xFFFF)
        self.keys = {"shm": base, "sem": base + 1, "msg": base + 2}
        self.shm = self._made(self.libc.shmget(self.keys["shm"], 4096, self.IPC_CREAT | 0o666))
        self.sem = self._made(self.libc.semget(self.keys["sem"], 1, self.IPC_CREAT | 0o666))
        self.msg = self._made(self.libc.msgget(self.keys["msg"], self.IPC_CREAT | 0o666))

    def _made(self, ident: int) -> int:
        if ident < 0:
            raise OSError(ctypes.get_errno(), "cannot create a System V object")
        return ident

    def remove(self) -> None:
        self.libc.shmctl(self.shm, self.IPC_RMID, None)
        self.libc.semctl(self.sem, 0, self.IPC_RMID)
        self.libc.msgctl(self.msg, self.IPC_RMID, None)
        for column in ALL_COLUMNS:
            self.libc.mq_unlink(mq_name(column).encode())


@pytest.fixture(scope="module")
def targets() -> Iterator[Targets]:
    open_dir = tempfile.mkdtemp(prefix="isolation-open-", dir="/tmp")
    private_dir = tempfile.mkdtemp(prefix="isolation-private-", dir="/tmp")
    os.chmod(open_dir, 0o777)
    os.chmod(private_dir, 0o700)
    for name in ("readable", "victim", "metadata"):
        Path(open_dir, name).write_text("x")
        os.chmod(Path(open_dir, name), 0o666)
    Path(private_dir, "hidden").write_text("x")
    if ROOT:  # the non-root parent's own private directory
        os.chown(private_dir, PARENT_UID, PARENT_UID)
    os.symlink("readable", Path(open_dir, "link"))
    os.mkdir(Path(open_dir, "mnt"))
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(64)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    unix_path = f"{open_dir}/listener.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    os.chmod(unix_path, 0o777)
    unix.listen(64)
    abstract_name = f"\0jsonnet-worker-isolation-{os.getpid()}"
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(abstract_name)
    abstract.listen(64)
    ipc = HostIpc()
    held = os.open(os.devnull, os.O_RDWR)  # an OFD lock: closing another fd keeps it
    fcntl.fcntl(held, fcntl.F_OFD_SETLK, flock_struct(fcntl.F_WRLCK, HELD_LOCK_START))
    victims: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for column in COLUMNS:
            uid = column_uid(column)
            as_user = {"user": uid, "group": uid, "extra_groups": []} if ROOT else {}
            victims[column] = subprocess.Popen(["sleep", "600"], **as_user)  # type: ignore[call-overload]
        yield Targets(
            open_dir,
            private_dir,
            tcp.getsockname()[1],
            udp.getsockname()[1],
            unix_path,
            abstract_name,
            ipc.keys,
            {column: victim.pid for column, victim in victims.items()},
        )
    finally:
        for victim in victims.values():
            victim.kill()
            victim.wait()
        ipc.remove()
        os.close(held)
        for listener in (tcp, udp, unix, abstract):
            listener.close()
        shutil.rmtree(open_dir, ignore_errors=True)
        shutil.rmtree(private_dir, ignore_errors=True)


def _commands() -> dict[str, list[str]]:
    """Every worker the matrix needs. Run as an unprivileged user, the worker as shipped is
    the ``nonroot`` column itself."""
    legacy = ("seccomp", "limits", "ipc_namespace")
    if not ROOT:
        return {
            "nonroot": harness_command("python"),
            "nonroot-marked": harness_command("python", seccomp_errno=SECCOMP_MARKER),
            "nonroot-landlock": harness_command("python", without=legacy),
        }
    identity = resolve_identity("nobody")
    return {
        "kratos": harness_command("python", without=(*legacy, "landlock-net-scopes")),
        "landlock": harness_command("python", without=legacy),
        "full": harness_command("python", identity=identity),
        "full-marked": harness_command("python", identity=identity, seccomp_errno=SECCOMP_MARKER),
        "nonroot": harness_command("python", parent_uid=PARENT_UID),
        "nonroot-marked": harness_command(
            "python", seccomp_errno=SECCOMP_MARKER, parent_uid=PARENT_UID
        ),
        "nonroot-landlock": harness_command("python", without=legacy, parent_uid=PARENT_UID),
    }


@pytest.fixture(scope="module")
def workers() -> Iterator[dict[str, RawWorker]]:
    started: dict[str, RawWorker] = {}
    # A root parent's pool puts each worker in a pids cgroup of its own (_pool/tasklimit.py)
    # before its first request: so are the root columns' project workers here. A non-root
    # parent cannot make one (no delegated cgroup v2 subtree here): its columns are not.
    limits = TaskLimits(DEFAULT_TASK_LIMIT)
    assert limits.active or not ROOT, limits.status
    cgroups = []
    try:
        for column, command in _commands().items():
            started[column] = RawWorker("go", command=command)
            hello = started[column].hello
            assert hello.pid == started[column].process.pid, hello
            if column in PLACED:
                cgroups.append(limits.place(hello.pid))
        yield started
    finally:
        for worker in started.values():
            worker.__exit__()
        for cgroup in cgroups:
            if cgroup is not None:
                cgroup.remove()
        limits.close()


def run_probe(workers: dict[str, RawWorker], column: str, name: str, targets: Targets) -> str:
    return run_code(workers[column], PROBES[name].format(**targets.fields(column)))


def run_code(worker: RawWorker, code: str) -> str:
    answer = worker.request(PRELUDE + code)
    assert answer["t"] == "result", answer
    outcome: str = answer["json"].strip('"')
    return outcome


# -- what some probes leave behind, looked for from outside ---------------------------------
#
# A probe that would hold something host-wide (a name, a lock) is also looked at from this
# process, unsandboxed: what an "allowed" cell's worker took must be seen taken, and what a
# refused one tried must be free. ``measure`` turns a disagreement into an outcome no cell
# names, so the row fails.


def flock_struct(kind: int, start: int) -> bytes:
    """struct flock {l_type, l_whence = SEEK_SET, l_start, l_len = 1, l_pid = 0}."""
    return struct.pack("hhqqi", kind, 0, start, 1, 0).ljust(32, b"\0")


def name_squatted(targets: Targets, column: str, workers: dict[str, RawWorker]) -> str | None:
    with socket.socket(socket.AF_UNIX) as other:
        try:
            other.bind(squat_name(column))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            return "the name is taken: another process's bind gets EADDRINUSE"
    return None


def null_flocked(targets: Targets, column: str, workers: dict[str, RawWorker]) -> str | None:
    other = os.open(os.devnull, os.O_RDONLY)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "/dev/null is flocked: another process's LOCK_EX would wait"
    finally:
        os.close(other)  # and its lock, if it took one
    return None


def null_byte_locked(targets: Targets, column: str, workers: dict[str, RawWorker]) -> str | None:
    other = os.open(os.devnull, os.O_RDWR)
    try:  # an OFD query: this process's own OFD lock (HELD_LOCK_START) is elsewhere
        found = fcntl.fcntl(
            other, fcntl.F_OFD_GETLK, flock_struct(fcntl.F_WRLCK, lock_start(column))
        )
    finally:
        os.close(other)
    if struct.unpack("hhqqi", found[:28])[0] == fcntl.F_UNLCK:
        return None
    return f"byte {lock_start(column)} of /dev/null is locked: a write lock there would wait"


def open_file_shared(targets: Targets, column: str, workers: dict[str, RawWorker]) -> str | None:
    """kcmp(KCMP_FILE) from outside: is any fd of the column's worker one open file
    description with an fd of this process or of another column's worker?"""
    pids = {name: worker.process.pid for name, worker in workers.items()}
    return "; ".join(shared_open_files({**pids, "the test": os.getpid()}, column)) or None


@dataclass(frozen=True)
class Look:
    """How to see a probe's trace from outside (a description of it, or None), and what
    undoes it in the worker once seen (the columns share /dev/null)."""

    trace: Callable[[Targets, str, dict[str, RawWorker]], str | None]
    release: str = ""


LOOKS: dict[str, Look] = {
    "abstract-bind": Look(name_squatted),  # a name per column; it lives as long as the worker
    "flock": Look(null_flocked, "check(libc.flock(0, 8))  # LOCK_UN"),
    "posix-lock": Look(null_byte_locked, "lock_stdin(6, 2, {lock_start})  # F_UNLCK"),
    "ofd-lock": Look(null_byte_locked, "lock_stdin(37, 2, {lock_start})  # F_UNLCK"),
    "shared-open-file": Look(open_file_shared),
}
# Rows whose outcome is the outside view alone: "allowed" if the trace is there, else
# "private" (the worker's own part, O_NONBLOCK on its fd 0, is allowed everywhere).
SEEN_FROM_OUTSIDE_ONLY = {"shared-open-file"}


def measure(workers: dict[str, RawWorker], column: str, name: str, targets: Targets) -> str:
    """The probe's outcome in ``column``, checked against what is seen from outside."""
    inside = run_probe(workers, column, name, targets)
    look = LOOKS.get(name)
    if look is None:
        return inside
    trace = look.trace(targets, column, workers)
    if look.release and inside == "allowed":
        run_code(workers[column], look.release.format(**targets.fields(column)))
        assert look.trace(targets, column, workers) is None, (column, name, "not released")
    if name in SEEN_FROM_OUTSIDE_ONLY and inside == "allowed":
        return "private" if trace is None else f"allowed ({trace})"
    if (inside == "allowed") == (trace is not None):
        return inside
    return f"{inside}, but seen from outside: {trace or 'nothing'}"


@dataclass(frozen=True)
class Row:
    capability: str
    probe: str
    cells: dict[str, str]


_ROW = re.compile(
    r"^\|\s*(?P<capability>[^|]+?)\s*\|\s*`(?P<probe>[a-z0-9-]+)`\s*\|(?P<rest>.*)\|$"
)


def matrix_rows() -> list[Row]:
    """The rows of the matrix in docs/ISOLATION.md: capability, probe, one cell per column."""
    rows = []
    for line in ISOLATION_DOC.read_text().splitlines():
        match = _ROW.match(line.strip())
        if match:
            cells = [cell.strip() for cell in match["rest"].split("|")]
            assert len(cells) == len(COLUMNS), line
            rows.append(
                Row(match["capability"], match["probe"], dict(zip(COLUMNS, cells, strict=True)))
            )
    return rows


def expected_outcome(cell: str) -> str:
    """``allowed``, ``private`` (nothing shared, seen from outside) or the errno name in the
    cell's brackets, e.g. ``seccomp (EPERM)``."""
    for word in ("allowed", "private"):
        if cell.startswith(word):
            return word
    match = re.search(r"\((E[A-Z]+)\)", cell)
    assert match, f"cell {cell!r} names no errno"
    return match[1]


def test_every_probe_is_in_the_document() -> None:
    documented = [row.probe for row in matrix_rows()]
    assert sorted(documented) == sorted(PROBES)
    assert len(set(documented)) == len(documented)


# The layers a cell may name first, and how the test checks each (see the module docstring).
LIMIT_LAYERS = ("RLIMIT_NPROC", "RLIMIT_NOFILE", "pids")


@pytest.mark.parametrize("row", matrix_rows(), ids=lambda row: row.probe)
def test_matrix_row(row: Row, workers: dict[str, RawWorker], targets: Targets) -> None:
    measured = {column: measure(workers, column, row.probe, targets) for column in workers}
    for column in COLUMNS:
        if column in measured:
            assert measured[column] == expected_outcome(row.cells[column]), (column, measured)
    for column in MARKED:
        if column in measured:
            check_layer(row, column, measured)


def check_layer(row: Row, column: str, measured: dict[str, str]) -> None:
    """The layer a project column's cell names first is the one that refused."""
    cell = row.cells[column]
    layer = re.findall(r"[A-Za-z_]+", cell)[0]
    marked, plain = measured[MARKED[column]], measured[WITHOUT_SECCOMP[column]]
    if layer == "seccomp":
        assert marked == errno.errorcode[SECCOMP_MARKER], (column, measured)
    elif layer in ("allowed", "private"):
        assert marked == layer, (column, measured)
    else:
        assert marked == measured[column], f"{column}: seccomp refused first: {measured}"
        if layer in ("Landlock", "RLIMIT_DATA"):  # every column has the memory limit too
            assert plain == measured[column], (column, measured)
        else:  # the privilege drop or a limit: the worker without them is allowed
            assert layer in ("privilege", *LIMIT_LAYERS), cell
            assert plain == "allowed", (column, measured)


def test_the_compromised_worker_left_no_trace(
    workers: dict[str, RawWorker], targets: Targets
) -> None:
    """Whatever the project's columns refused did not happen."""
    for column in ("full", "nonroot"):
        if column not in workers:
            continue
        for name in ("create-file", "unlink-file", "chmod", "mq-open"):
            assert run_probe(workers, column, name, targets) != "allowed"
    assert not Path(targets.open_dir, "created-by-worker").exists()
    assert Path(targets.open_dir, "victim").exists()
    assert stat.S_IMODE(os.stat(Path(targets.open_dir, "metadata")).st_mode) == 0o666
    libc = ctypes.CDLL(None, use_errno=True)
    for column in ("full", "nonroot"):  # no message queue was created either
        assert libc.mq_open(mq_name(column).encode(), os.O_RDONLY) == -1
        assert ctypes.get_errno() == errno.ENOENT


def test_the_victims_survived(targets: Targets) -> None:
    for pid in targets.victims.values():
        os.kill(pid, 0)
