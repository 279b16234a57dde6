"""What each worker holds open, seen from outside (issue 22): no open file description is
shared between two workers, nor between a worker and the fork server or the pool, and a
fresh worker holds exactly the fds it should, each named.

An open file description shared by two processes carries state from one to the other: an
exclusive ``flock`` (held until the last of them closes it), POSIX record locks read back
with ``F_GETLK``, ``O_NONBLOCK`` and the file offset. The fork server's /dev/null was one
such description, fd 0 of every fork. ``kcmp(KCMP_FILE)`` tells whether two fds of two
processes are the same description; this test process is their parent and unsandboxed (root
here, or the workers' own uid: a process in no Landlock domain may inspect one inside).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdview import held_elsewhere, open_files, shared_open_files
from jsonnet_worker._pool.connection import WorkerConnection
from jsonnet_worker._pool.forking import ForkServerProcess, fork_server_command
from jsonnet_worker._pool.identities import DEFAULT_WORKER_USER, WorkerIdentities
from jsonnet_worker._pool.launch import await_hello
from jsonnet_worker._pool.processes import WorkerProcess, WorkerSettings
from jsonnet_worker._sandbox.landlock import probe
from jsonnet_worker._wire.framing import DEFAULT_MAX_FRAME
from rawworker import RawWorker

LANDLOCK = probe()
TEMPLATE_HARNESS = Path(__file__).parent / "harness" / "template_harness.py"


def described(pid: int) -> dict[int, str]:
    """Each fd of a process, named: fd 0 (what it is, its access mode), its stderr channel
    on fds 1 and 2, its other channels (sockets); anything else by its /proc link."""
    files = open_files(pid)
    names: dict[int, str] = {}
    stderr = files[1].target if 1 in files else None
    for fd, file in sorted(files.items()):
        if fd == 0:
            names[fd] = f"stdin {file.target.split(':')[0]}, access {file.access}"
        elif fd in (1, 2) and file.target == stderr and file.target.startswith("socket:"):
            names[fd] = "stderr channel"
        elif file.target.startswith("socket:") and file.target != stderr:
            names[fd] = "channel"
        else:
            names[fd] = file.target
    return names


def settings(engine: str) -> WorkerSettings:
    return WorkerSettings(engine, 1 << 30, DEFAULT_MAX_FRAME, WorkerIdentities(DEFAULT_WORKER_USER))


@pytest.fixture(params=["go", "cpp"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def owned() -> Iterator[list[WorkerProcess | ForkServerProcess]]:
    processes: list[WorkerProcess | ForkServerProcess] = []
    yield processes
    for process in reversed(processes):
        process.close()


def greeted(process: WorkerProcess) -> WorkerProcess:
    await_hello(process, WorkerConnection(1 << 20), timeout=20.0)
    return process


def forks(
    engine: str, owned: list[WorkerProcess | ForkServerProcess]
) -> tuple[ForkServerProcess, WorkerProcess, WorkerProcess]:
    server = ForkServerProcess(settings(engine))
    owned.append(server)
    first, second = server.fork_worker(), server.fork_worker()
    owned.extend((first, second))
    return server, greeted(first), greeted(second)


def python_harness() -> list[str]:
    """The fork server's command with tests/harness/template_harness.py in ``python`` mode:
    its forks run each request's snippet as Python, a fully compromised engine."""
    command = fork_server_command(settings("go"))
    return [sys.executable, "-I", str(TEMPLATE_HARNESS), "python", *command[6:]]


needs_forks = pytest.mark.skipif(
    not LANDLOCK.available or LANDLOCK.abi < 6,
    reason="forked workers need Landlock with the signal scope (ABI 6)",
)


@needs_forks
def test_no_open_file_is_shared_by_two_forks_the_fork_server_or_the_pool(
    engine: str, owned: list[WorkerProcess | ForkServerProcess]
) -> None:
    server, first, second = forks(engine, owned)
    pids = {"fork server": server.pid, "first": first.pid, "second": second.pid}
    assert shared_open_files({**pids, "pool": os.getpid()}) == []


@needs_forks
def test_a_fresh_fork_holds_its_own_stdin_and_its_three_channels_only(
    engine: str, owned: list[WorkerProcess | ForkServerProcess]
) -> None:
    server, first, second = forks(engine, owned)
    for worker in (first, second):
        names = described(worker.pid)
        # fd 0: a pipe of its own, read-only; 1 and 2: its stderr channel; two more: its
        # requests and responses. No control socket, no memfd, nothing of the fork server.
        assert sorted(names.values()) == sorted(
            ["stdin pipe, access 0", "stderr channel", "stderr channel", "channel", "channel"]
        ), names
        stdin = open_files(worker.pid)[0].target
        # Its write end is closed, and no other process holds the pipe.
        others = [server.pid, first.pid, second.pid, os.getpid()]
        assert held_elsewhere(stdin, worker.pid, others) == []
        assert [fd for fd, file in open_files(worker.pid).items() if file.target == stdin] == [0]


@needs_forks
def test_the_fork_server_holds_its_own_null_its_control_and_the_engine(
    engine: str, owned: list[WorkerProcess | ForkServerProcess]
) -> None:
    server, _, _ = forks(engine, owned)
    files = open_files(server.pid)
    names = described(server.pid)
    memfds = [fd for fd, file in files.items() if file.target.startswith("/memfd:")]
    assert names[0] == "stdin /dev/null, access 0" and len(memfds) == 1, names
    assert sorted(name for fd, name in names.items() if fd not in (0, *memfds)) == sorted(
        ["stderr channel", "stderr channel", "channel"]  # the channel: its control socket
    ), names


def test_re_exec_workers_share_no_open_file_with_each_other_or_the_pool(
    engine: str, owned: list[WorkerProcess | ForkServerProcess]
) -> None:
    workers = [greeted(WorkerProcess(settings(engine))) for _ in range(2)]
    owned.extend(workers)
    pids = {"first": workers[0].pid, "second": workers[1].pid, "pool": os.getpid()}
    assert shared_open_files(pids) == []
    for worker in workers:
        names = described(worker.pid)
        # fd 0: /dev/null, opened by the worker itself (an open file description of its own;
        # its seccomp filter refuses flock and record locks on it).
        assert sorted(names.values()) == sorted(
            ["stdin /dev/null, access 0", "stderr channel", "stderr channel", "channel", "channel"]
        ), names
        assert stat.S_ISCHR(os.stat(f"/proc/{worker.pid}/fd/0").st_mode)


# Run in a compromised fork: each call issue 22 found open, on what the fork holds (its
# stderr channel, a connected socket; fd 0), and O_NONBLOCK on fd 0, for its sibling to see.
COMPROMISED_FORK = """
import ctypes, errno, os, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
def attempt(call):
    ctypes.set_errno(0)
    try:
        failed = call() == -1
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return errno.errorcode[ctypes.get_errno()] if failed else "allowed"
def lock(command):
    request = ctypes.create_string_buffer(struct.pack("hhqqi", 0, 0, 0, 1, 0), 32)
    return libc.fcntl(0, command, request)  # F_RDLCK on byte 0 of fd 0
channel = socket.socket(fileno=os.dup(2))
result = {
    "bind": attempt(lambda: channel.bind(NAME)),
    "listen": attempt(lambda: channel.listen(1)),
    "accept": attempt(lambda: libc.accept(2, None, None)),
    "accept4": attempt(lambda: libc.accept4(2, None, None, 0)),
    "connect": attempt(lambda: channel.connect(NAME)),
    "flock": attempt(lambda: libc.flock(0, 2 | 4)),
    **{f"fcntl {command}": attempt(lambda command=command: lock(command))
       for command in (5, 6, 7, 36, 37, 38)},
    "O_NONBLOCK on fd 0": attempt(lambda: os.set_blocking(0, False)),
}
channel.close()
"""


@needs_forks
def test_a_compromised_fork_can_squat_lock_or_signal_nothing(
    owned: list[WorkerProcess | ForkServerProcess],
) -> None:
    """From inside: each call refused (EPERM: Landlock refuses none of them, so the filter
    did; the matrix's marked twin shows it for re-exec workers). From outside: the name is
    free, and the sibling's fd 0 never saw the bit."""
    server = ForkServerProcess(settings("go"), python_harness())
    owned.append(server)
    attacker, sibling = (RawWorker(process=server.fork_worker()) for _ in range(2))
    owned.extend((attacker.process, sibling.process))
    name = f"\0jsonnet-worker-fork-squat-{os.getpid()}"
    answer = attacker.request(COMPROMISED_FORK.replace("NAME", repr(name)))
    assert answer["t"] == "result", answer
    refused = json.loads(answer["json"])
    bit = refused.pop("O_NONBLOCK on fd 0")
    assert bit == "allowed" and set(refused.values()) == {"EPERM"}, refused
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(name)  # not squatted
    answer = sibling.request("import os\nresult = os.get_blocking(0)")
    assert json.loads(answer["json"]) is True  # its own fd 0: the attacker's bit is not there
