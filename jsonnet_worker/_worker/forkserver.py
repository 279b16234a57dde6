"""The fork server: a worker's start-up up to the engine, kept, and forked on request.

Goals: a never-used worker for the cost of a fork (a few ms) instead of an interpreter
re-exec (~90 ms), without weakening anything a re-exec worker has: every Go thread born
inside the worker's own Landlock domain, the worker's seccomp filter on every thread, no fd
or channel of the fork server or of a sibling, no way to signal or trace the fork server or
a sibling. The fork server itself never evaluates and never reads untrusted input: the only
bytes it reads are the pool's control messages.

Plan (docs/DESIGN.md, "Forked workers"). The fork server is started like a worker (the same
bootstrap, mode ``FORK_SERVER_COMMAND``), and (``FORK_SERVER``, in order):
  1. ties its life to the parent, moves the control socket (a SOCK_SEQPACKET pair made by
     the pool, given as fd 0) to a private fd, puts /dev/null on fd 0 (its own: no fork
     keeps it);
  2. runs ``startup.RESTRICT``: warm-up, the engine copied into a memfd with its libraries
     loaded, limits, privilege drop, the empty Landlock layer, the self-check, all while it
     has one thread (it never starts another);
  3. applies its own seccomp filter: the worker's deny-list, except that ``clone`` with
     exactly ``FORK_FLAGS`` may make a process (every other process-making clone is still
     refused). A filter is inherited by the children, and a worker needs everything the
     worker's filter allows, so the fork server's cannot be narrower than the worker's; it
     is the worker's plus this one flag word, and each child stacks the worker's own on top;
  4. sends its ``ForkServerHello`` on the control socket, then serves each ``ForkRequest``,
     which carries the new worker's three channels (made by the pool) as SCM_RIGHTS: it
     clones with ``CLONE_PARENT | CLONE_PIDFD`` (the worker is the *pool's* child, so the
     pool reaps it and gets its exit status; the pidfd goes back to the pool in ``Forked``
     over SCM_RIGHTS), then closes every fd of that worker. Between two forks it holds no
     live worker's fd. A request it cannot serve gets a ``ForkRefused`` saying why.
The forked child (``run_forked_worker``), before its hello (``FORKED``, in order):
  1. re-arms PR_SET_PDEATHSIG (cleared by fork; its parent is now the pool's thread that
     started the fork server), leaves the fork server's session, puts a pipe of its own on
     fd 0 (``private_stdin``), its stderr channel on fds 1 and 2, its two other channels on
     private fds, and closes every other fd (the control socket included) but the engine's
     memfd, which step 3 closes once the engine is loaded: from its hello on, no open file
     description it holds is held by the fork server or a sibling (a shared one carries
     locks, ``O_NONBLOCK`` and offsets from one process to another);
  2. adds a nested empty Landlock layer: its own domain, so the signal and abstract-socket
     scopes keep it from the fork server and from its siblings; checks the layer holds;
  3. runs ``startup.FINISH`` (loads the engine from the memfd, its Go threads born in the
     nested domain; the worker's seccomp filter with TSYNC: no fork from here on), then the
     normal hello and evaluation loop (``loop.serve``).
The control messages are ``messages``' (one msgpack map per SEQPACKET datagram, ``control``).

Weak spots: the clone is a raw syscall (CPython has no ``os.clone``, and ``os.fork`` cannot
pass CLONE_PARENT), bracketed by CPython's public ``PyOS_BeforeFork``/``PyOS_AfterFork_*``
so the interpreter's own after-fork work runs; glibc's fork handling does not, which is
sound only because the fork server is single-threaded (no lock can be held by another
thread, no stack cache to reclaim) and registers no pthread_atfork handler; glibc's cached
tid of the child's main thread still holds the fork server's (used only by
recursive/error-checking and PI mutexes, which neither CPython nor the Go runtime uses on
that thread). Forked workers share the fork server's uid: a uid per worker (a root parent's
uid range) is given per fork server, not per worker.

Its values are ``_wire.values.valueclass``es, not dataclasses: every worker imports this
module, and ``dataclasses`` (with ``inspect``) would cost each worker's start ~18 ms.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import resource
import socket
import sys
import threading
import time

from .._sandbox import landlock, seccomp
from .._wire.control import CHANNELS, CONTROL_MAX, FORK_FLAGS, decode_control, encode_control
from .._wire.framing import ProtocolViolation
from .._wire.layers import LayerState, LayerStatus
from .._wire.messages import (
    Forked,
    ForkRefused,
    ForkRequest,
    ForkServerHello,
    StartupFailure,
)
from .._wire.values import compile_pending, replace, valueclass
from . import loop, startup

TYPE_CHECKING = False  # typing's, without importing typing: a worker never loads it
if TYPE_CHECKING:
    from typing import NoReturn

EXIT_STARTUP_FAILED = startup.EXIT_STARTUP_FAILED
EXIT_PROTOCOL = loop.EXIT_PROTOCOL


class Cloner:
    """``clone(FORK_FLAGS)`` from Python, with CPython's fork bookkeeping around it.

    Bound before restriction. The syscall goes through a ``PyDLL`` handle, which keeps the
    GIL across the call as ``os.fork`` does (a ``CDLL`` call would release it around the
    fork and re-take it in the child)."""

    def __init__(self, machine: str | None = None) -> None:
        table = seccomp.table_for_machine(machine)
        if table is None:
            raise startup.StartupError(
                f"no clone syscall number for architecture {machine or os.uname().machine}"
            )
        self.number = table.number("clone")
        libc = ctypes.PyDLL(None, use_errno=True)
        self.syscall = libc.syscall
        self.syscall.restype = ctypes.c_long
        self.api = ctypes.pythonapi

    def __call__(self) -> tuple[int, int]:
        """(pid, pidfd) in the fork server, (0, -1) in the child; raises OSError if refused."""
        pidfd = ctypes.c_int(-1)
        self.api.PyOS_BeforeFork()
        ctypes.set_errno(0)
        # x86_64 and aarch64 agree on the first three arguments: flags, stack (0: the
        # child runs on a copy of this stack, as with fork), and where CLONE_PIDFD writes.
        pid = int(
            self.syscall(
                ctypes.c_long(self.number),
                ctypes.c_ulong(FORK_FLAGS),
                ctypes.c_void_p(None),
                ctypes.byref(pidfd),
                ctypes.c_void_p(None),
                ctypes.c_void_p(None),
            )
        )
        if pid == 0:
            self.api.PyOS_AfterFork_Child()
            return 0, -1
        err = ctypes.get_errno()
        self.api.PyOS_AfterFork_Parent()
        if pid < 0:
            raise OSError(err, f"clone(CLONE_PARENT | CLONE_PIDFD): {os.strerror(err)}")
        return pid, pidfd.value


def seccomp_layer(result: seccomp.SeccompResult) -> LayerStatus:
    if not result.applied:
        return LayerStatus("seccomp", LayerState.MISSING, reason=result.reason)
    return LayerStatus(
        "seccomp",
        LayerState.ACTIVE,
        f"{result.arch}, {result.denied} calls refused, threads and the fork server's one "
        "fork form only, TSYNC",
    )


class ForkedStreams(loop.ProtocolStreams):
    """A forked worker's protocol channels, already on private fds (``ProtocolStreams``
    moves fds 0 and 1, and opens /dev/null, which the fork server's layer now refuses)."""

    def __init__(self, requests: int, responses: int) -> None:
        self.requests = requests
        self.responses = responses


def close_all_but(keep: set[int]) -> None:
    """Close every fd of this process not in ``keep`` (close_range between the keepers)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    end = max(soft, max(keep) + 1)
    low = 0
    for fd in [*sorted(keep), end]:
        if low < fd:  # os.closerange(0, 0) closes every fd: close_range(0, (unsigned) -1)
            os.closerange(low, fd)
        low = fd + 1


@valueclass(frozen=False)
class ForkServer:
    """The fork server's state: what it forks (its start-up up to the engine), and the
    channel it is asked on."""

    restricted: startup.StartUp
    control: socket.socket
    clone: Cloner

    def send(
        self, message: ForkServerHello | Forked | ForkRefused, fds: list[int] | None = None
    ) -> None:
        socket.send_fds(self.control, [encode_control(message.to_message())], fds or [])

    def serve(self) -> int:
        """Fork on request until the pool closes the control socket."""
        # Everything the fork server made so far lives for good: out of the collector's
        # reach, a child's full collections do not write to (and so copy) the pages it
        # shares with the fork server. (No difference measured at a worker's first call; it
        # bounds what a long-lived worker's collections copy.)
        gc.freeze()
        while True:
            data, fds, flags, _ = socket.recv_fds(self.control, CONTROL_MAX, CHANNELS)
            if not data:
                for fd in fds:
                    os.close(fd)
                return 0
            try:
                self.answer(data, fds, flags)
            except ProtocolViolation as exc:  # not even a map with a type: not the pool's
                print(f"fork server: {exc}", file=sys.stderr, flush=True)
                return EXIT_PROTOCOL  # the pool is the only peer: a garbled message is a bug
            finally:
                for fd in fds:  # the worker's channels: never kept past its fork
                    os.close(fd)

    def answer(self, data: bytes, fds: list[int], flags: int) -> None:
        message = decode_control(data)
        try:
            request = ForkRequest.from_message(message)
        except ProtocolViolation as exc:
            self.send(ForkRefused(exc.request_id, exc.reason))
            return
        if len(fds) != CHANNELS or flags & socket.MSG_CTRUNC:
            reason = f"a fork needs {CHANNELS} channels, got {len(fds)}"
            self.send(ForkRefused(request.request_id, reason))
            return
        if threading.active_count() != 1:  # a fork would copy another thread's locks
            reason = f"the fork server has {threading.active_count()} threads"
            self.send(ForkRefused(request.request_id, reason))
            return
        try:
            pid, pidfd = self.clone()
        except OSError as exc:
            self.send(ForkRefused(request.request_id, exc.strerror or str(exc), exc.errno or 0))
            return
        if pid == 0:
            run_forked_worker(self, fds)
        try:
            self.send(Forked(request.request_id, pid), [pidfd])
        finally:
            os.close(pidfd)


def private_stdin() -> None:
    """A forked worker's fd 0: the read end of a pipe made here, whose write end is closed.

    It reads as /dev/null did (end of file at once) and, read-only, refuses writes as the
    read-only /dev/null did; no other process holds it. Not the fork server's /dev/null: one
    open file description shared by every fork and the fork server, it carried an exclusive
    ``flock`` host-wide and past the worker's life, record locks between workers that share
    nothing else, and ``O_NONBLOCK`` set by one fork to the others (issue 22). Not a fresh
    /dev/null: the fork server's Landlock layer refuses the open. Not closed: the next fd the
    engine or its runtime opens would become fd 0, Python's ``sys.stdin`` and Go's
    ``os.Stdin``."""
    read_end, write_end = os.pipe()
    os.close(write_end)
    os.dup2(read_end, 0)
    os.close(read_end)


def run_forked_worker(server: ForkServer, channels: list[int]) -> NoReturn:
    """The child of a fork: never returns into the fork server's loop."""
    code = EXIT_STARTUP_FAILED
    try:
        code = forked_worker_main(server, channels)
    except BaseException as exc:  # before the streams exist: say it on the stderr channel
        try:
            os.write(2, f"forked worker start-up failed: {exc!r}\n".encode())
        except OSError:
            pass
    finally:
        try:
            sys.stderr.flush()
        finally:
            # No interpreter finalisation: the engine's runtime threads are still running.
            os._exit(code)


# Made once, at the fork server's start, before it dropped privileges: a forked worker has
# its fork server's, not one of its own.
PER_FORK_SERVER_LAYERS = ("ipc_namespace", "uid")


def per_fork_server(layers: dict[str, LayerStatus]) -> dict[str, LayerStatus]:
    """A forked worker's report of the layers it shares with its fork server's other workers
    (an IPC namespace and a uid per fork server, not per worker; its seccomp filter refuses
    SysV IPC and mq_* whatever the namespace)."""
    return {
        name: replace(
            layer, detail=f"{layer.detail}; one per fork server, shared by its forked workers"
        )
        if name in PER_FORK_SERVER_LAYERS and layer.active
        else layer
        for name, layer in layers.items()
    }


def nested_landlock_layer(progress: startup.StartUp) -> None:
    progress.landlock = landlock.restrict_self_empty()


# A forked worker's own start-up, after it has taken its channels (step 1 of the child).
FORKED: tuple[startup.Step, ...] = (
    nested_landlock_layer,  # its own domain: the scopes keep it from the fork server
    startup.check_the_layer,  # on the file the fork server's self-check opened
    *startup.FINISH,  # the engine, then the worker's seccomp filter
)


def forked_worker_main(server: ForkServer, channels: list[int]) -> int:
    started = time.monotonic()
    restricted = server.restricted
    options = restricted.options
    requests, responses, errors = channels
    # The parent is now the pool's thread that started the fork server (CLONE_PARENT).
    startup.tie_to_parent(options.parent_pid)
    os.setsid()  # out of the fork server's session and process group
    private_stdin()
    os.dup2(errors, 2)
    os.dup2(errors, 1)  # a stray write lands in the diagnostics, never inside a frame
    streams = ForkedStreams(requests, responses)
    server.control.detach()  # its fd is closed below; the object must not close it again
    assert restricted.prepared is not None
    close_all_but({0, 1, 2, requests, responses, restricted.prepared.memfd})
    own = replace(restricted, started=started, layers=per_fork_server(restricted.layers))
    try:
        startup.run_steps(own, FORKED)
    except startup.STARTUP_ERRORS as exc:
        reason = f"forked worker start-up failed: {exc}"
        print(reason, file=sys.stderr, flush=True)
        streams.send(StartupFailure(reason))
        return EXIT_STARTUP_FAILED
    assert own.engine is not None
    return loop.serve(streams, own.engine, own.hello(), options.max_frame, options.memory_limit)


def fork_server_seccomp(progress: startup.StartUp) -> None:
    try:
        progress.layers["seccomp"] = seccomp_layer(seccomp.install(process_clone=FORK_FLAGS))
    except OSError as exc:
        raise startup.StartupError(f"cannot apply the fork server's seccomp filter: {exc}") from exc


def compile_values(progress: startup.StartUp) -> None:
    compile_pending()


# Steps 2-3 of the plan, after the control socket is taken: no engine is loaded here.
FORK_SERVER: tuple[startup.Step, ...] = (
    *startup.RESTRICT,  # the worker's start-up up to the engine
    compile_values,  # every value class's __init__, once here rather than in each fork
    fork_server_seccomp,  # the worker's filter plus the one clone flag word
)


def start_fork_server(
    options: startup.WorkerOptions, control: socket.socket
) -> tuple[ForkServer, ForkServerHello]:
    """Steps 2-3 of the plan; returns the fork server and its hello."""
    clone = Cloner()  # bound before restriction
    restricted = startup.run_steps(startup.StartUp(options), FORK_SERVER)
    assert restricted.landlock is not None
    hello = ForkServerHello(
        pid=os.getpid(),
        engine=options.engine.value,
        python=sys.version.split()[0],
        landlock=restricted.landlock,
        layers=tuple(restricted.layers.values()),
        self_check=restricted.self_check,
        startup_ms=round((time.monotonic() - restricted.started) * 1000, 3),
        fork_flags=FORK_FLAGS,
    )
    # A fork's layers are its own: the fork server's seccomp layer is not theirs.
    del restricted.layers["seccomp"]
    return ForkServer(restricted, control, clone), hello


def main(argv: list[str]) -> int:
    """Entry point of the fork server mode (``bootstrap.run`` dispatches here)."""
    options = startup.parse_args(argv)
    startup.tie_to_parent(options.parent_pid)
    control = socket.socket(fileno=os.dup(0))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    try:
        server, hello = start_fork_server(options, control)
    except startup.STARTUP_ERRORS as exc:
        reason = f"fork server start-up failed: {exc}"
        print(reason, file=sys.stderr, flush=True)
        try:
            socket.send_fds(control, [encode_control(StartupFailure(reason).to_message())], [])
        except OSError:
            pass
        return EXIT_STARTUP_FAILED
    try:
        server.send(hello)
    except OSError:
        return EXIT_PROTOCOL
    try:
        return server.serve()
    except OSError as exc:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            return 0  # the pool went away
        raise
