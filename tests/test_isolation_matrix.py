"""The capability matrix of docs/ISOLATION.md, measured: a fully compromised worker tries
everything, under three stacks of layers, and each row of the document must hold.

A harness worker (tests/harness/worker_harness.py, mode ``python``) runs arbitrary Python
after the complete start-up: a model of an engine an attacker fully controls. Each probe
reports ``allowed`` or the errno that refused it. The columns:

  kratos    Landlock filesystem rights only (what Ory Kratos applies)
  landlock  Landlock with the ABI 4 net rights and the ABI 6 scopes (no seccomp, no new
            limits, no privilege drop)
  full      this project's worker, unchanged (dropping to nobody when the tests run as root)

A fourth worker, ``marked``, is ``full`` with the seccomp filter answering
ENOTRECOVERABLE instead of EPERM: a probe refused with that errno was refused by seccomp, so
a cell naming seccomp is checked, not assumed. A cell naming another layer is checked by
taking layers away: Landlock refuses the same way without seccomp; the privilege drop and the
limits refuse in ``full`` what the root ``landlock`` worker is allowed.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import stat
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import harness_command
from jsonnet_worker._landlock import probe
from jsonnet_worker._privileges import resolve_identity
from rawworker import RawWorker

pytestmark = pytest.mark.skipif(
    not probe().available or probe().abi < 6,
    reason=f"the matrix is written for Landlock ABI >= 6 (kernel: {probe().state.value})",
)

ISOLATION_DOC = Path(__file__).parent.parent / "docs" / "ISOLATION.md"
SECCOMP_MARKER = errno.ENOTRECOVERABLE
ROOT = os.geteuid() == 0
COLUMNS = ("kratos", "landlock", "full")

# What every probe starts with. ``outcome`` turns an action into "allowed" or an errno name.
PRELUDE = """
import ctypes, errno, os, socket, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
L = ctypes.c_long  # variadic syscall() arguments must be full machine words
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
    "thread-bomb": """
def bomb():
    release = threading.Event()
    started = []
    threading.stack_size(65536)  # small stacks: RLIMIT_DATA alone would allow thousands
    try:
        for _ in range(1000):
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
    """What the test opens for the probes: files, listeners, a mount point."""

    open_dir: str  # mode 0777 under /tmp: the worker user passes every permission check
    private_dir: str  # mode 0700, owned by the test's user
    tcp_port: int
    udp_port: int
    unix_path: str
    unix_abstract: str

    def fields(self) -> dict[str, object]:
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
        }


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
    try:
        yield Targets(
            open_dir,
            private_dir,
            tcp.getsockname()[1],
            udp.getsockname()[1],
            unix_path,
            abstract_name,
        )
    finally:
        for listener in (tcp, udp, unix, abstract):
            listener.close()
        shutil.rmtree(open_dir, ignore_errors=True)
        shutil.rmtree(private_dir, ignore_errors=True)


def _commands() -> dict[str, list[str]]:
    identity = resolve_identity("nobody")
    return {
        "kratos": harness_command("python", without=("seccomp", "limits", "landlock-net-scopes")),
        "landlock": harness_command("python", without=("seccomp", "limits")),
        "full": harness_command("python", identity=identity),
        "marked": harness_command("python", identity=identity, seccomp_errno=SECCOMP_MARKER),
    }


@pytest.fixture(scope="module")
def workers() -> Iterator[dict[str, RawWorker]]:
    started: dict[str, RawWorker] = {}
    try:
        for column, command in _commands().items():
            started[column] = RawWorker("go", command=command)
            hello = started[column].hello
            assert hello.pid == started[column].process.pid, hello
        yield started
    finally:
        for worker in started.values():
            worker.__exit__()


def run_probe(worker: RawWorker, name: str, targets: Targets) -> str:
    code = PRELUDE + PROBES[name].format(**targets.fields())
    answer = worker.request(code)
    assert answer["t"] == "result", answer
    outcome = answer["json"].strip('"')
    return outcome


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
    """``allowed`` or the errno name in the cell's brackets, e.g. ``seccomp (EPERM)``."""
    if cell.startswith("allowed"):
        return "allowed"
    match = re.search(r"\((E[A-Z]+)\)", cell)
    assert match, f"cell {cell!r} names no errno"
    return match[1]


def test_every_probe_is_in_the_document() -> None:
    documented = [row.probe for row in matrix_rows()]
    assert sorted(documented) == sorted(PROBES)
    assert len(set(documented)) == len(documented)


@pytest.mark.parametrize("row", matrix_rows(), ids=lambda row: row.probe)
def test_matrix_row(row: Row, workers: dict[str, RawWorker], targets: Targets) -> None:
    full_cell = row.cells["full"]
    layer = re.findall(r"[A-Za-z_]+", full_cell)[0]  # the layer that refuses first
    if layer == "privilege" and not ROOT:
        pytest.skip("the privilege drop happens only when the parent runs as root")
    measured = {column: run_probe(workers[column], row.probe, targets) for column in workers}
    for column in COLUMNS:
        assert measured[column] == expected_outcome(row.cells[column]), (column, measured)
    # Which layer refused, in this project's column.
    marker = errno.errorcode[SECCOMP_MARKER]
    if layer == "seccomp":
        assert measured["marked"] == marker, measured
    elif layer == "allowed":
        assert measured["marked"] == "allowed", measured
    else:
        assert measured["marked"] == measured["full"], f"seccomp refused first: {measured}"
        if layer == "Landlock":
            assert measured["landlock"] == measured["full"], measured
        else:  # the privilege drop or a limit: the root worker without them is allowed
            assert layer in ("privilege", "RLIMIT_NPROC", "RLIMIT_NOFILE"), full_cell
            assert measured["landlock"] == "allowed", measured


def test_the_compromised_worker_left_no_trace(
    workers: dict[str, RawWorker], targets: Targets
) -> None:
    """Whatever the full stack refused did not happen."""
    for name in ("create-file", "unlink-file", "chmod"):
        assert run_probe(workers["full"], name, targets) != "allowed"
    assert not Path(targets.open_dir, "created-by-worker").exists()
    assert Path(targets.open_dir, "victim").exists()
    assert stat.S_IMODE(os.stat(Path(targets.open_dir, "metadata")).st_mode) == 0o666
